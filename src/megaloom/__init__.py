"""megaloom: GPT-style language models from raw text to a served model, on one CPU or many GPUs."""

__version__ = "0.1.0"
