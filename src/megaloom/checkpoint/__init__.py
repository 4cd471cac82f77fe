"""Checkpoint files, below the trainer (which writes them) and `megaloom.loading` (which
reads them for every command): file names, atomic writes, manifest and schema checks
(`files`), sharded tensor storage (`shards`), and finding and opening a checkpoint
(`reader`)."""
