"""GPT model (both flavours), presets and the language-model loss."""

from megaloom.model.gpt import GPT, lm_loss
from megaloom.model.presets import PRESETS, preset_config

__all__ = ["GPT", "PRESETS", "lm_loss", "preset_config"]
