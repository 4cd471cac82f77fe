"""Interoperability with other tools' checkpoint formats (Hugging Face GPT-2 and Llama)."""

from megaloom.interop.hf import export_hf, import_hf, load_hf_model
from megaloom.interop.hf_config import UnsupportedModelError

__all__ = ["UnsupportedModelError", "export_hf", "import_hf", "load_hf_model"]
