"""The psmnist experiment (docs/paper.md): data.py and train.py."""
