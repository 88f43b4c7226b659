"""The google12 experiment (docs/paper.md): data.py and train.py."""
