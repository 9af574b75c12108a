"""Training loop, optimizer, checkpoints, metrics and command-line entry points."""
