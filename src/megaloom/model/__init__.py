"""GPT model (both flavours), presets and the language-model loss.

`GPT` and `lm_loss` load lazily so that `megaloom.model.presets` (and the CLI) stay free of
the torch import cost.
"""

from megaloom.model.presets import PRESETS, preset_config

__all__ = ["GPT", "PRESETS", "lm_loss", "preset_config"]


def __getattr__(name: str):
    if name in ("GPT", "lm_loss"):
        from megaloom.model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
