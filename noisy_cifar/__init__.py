"""The noisy_cifar experiment (docs/paper.md): data.py and train.py."""
