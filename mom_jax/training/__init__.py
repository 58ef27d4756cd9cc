"""Training pieces: optimiser, jitted steps, checkpoints."""
