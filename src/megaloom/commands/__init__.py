"""One module per CLI command (`NAME`, `HELP`, `add_arguments`, `run`); found by `megaloom.cli`."""
