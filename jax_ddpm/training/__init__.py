"""Training: the state, the pure train step, the loop, checkpoints."""
