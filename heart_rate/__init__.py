"""The heart_rate experiment (docs/paper.md): data.py and train.py."""
