"""Compression: gradual pruning while training (`gradual`), one-shot pruning (`oneshot`) and
the masks both compute (`masks`)."""
