"""Training: optimizer, LR schedule, mixed precision, checkpoints, metrics and the trainer loop."""
