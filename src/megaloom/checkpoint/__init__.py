"""Checkpoint files below the trainer and the loaders: sharded tensor storage (`shards`)."""
