"""The ptb experiment (docs/paper.md): data.py and train.py."""
