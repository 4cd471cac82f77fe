"""Inference: the batched KV-cached engine, sampling controls and generation sinks.

Names load lazily so that importing a submodule (or the CLI) does not pay for torch.
"""

from importlib import import_module

_EXPORTS = {
    "Completion": "engine",
    "Engine": "engine",
    "Event": "engine",
    "Request": "engine",
    "RequestHandle": "engine",
    "RequestOutput": "engine",
    "TokenLogprob": "engine",
    "SamplingError": "params",
    "SamplingParams": "params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"megaloom.infer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
