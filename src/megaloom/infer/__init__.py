"""Inference: the batched KV-cached engine, sampling controls and generation sinks."""

from megaloom.infer.engine import (
    Completion,
    Engine,
    Event,
    Request,
    RequestHandle,
    RequestOutput,
    TokenLogprob,
)
from megaloom.infer.params import SamplingError, SamplingParams

__all__ = [
    "Completion",
    "Engine",
    "Event",
    "Request",
    "RequestHandle",
    "RequestOutput",
    "SamplingError",
    "SamplingParams",
    "TokenLogprob",
]
