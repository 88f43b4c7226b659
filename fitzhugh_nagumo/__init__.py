"""The fitzhugh_nagumo experiment (docs/paper.md): data.py and train.py."""
