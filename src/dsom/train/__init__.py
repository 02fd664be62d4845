"""Training: the loop, checkpoints and result tracking."""
