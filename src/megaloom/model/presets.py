"""Named model shapes, from a 1M-parameter toy to MT-NLG 530B.

Sources: GPT-2 (Radford et al. 2019), Megatron-LM 8.3B (Shoeybi et al. 2019), GPT-3 175B
(Brown et al. 2020), MT-NLG 530B (Smith et al. 2022). All use the GPT-2 BPE vocabulary.
The large ones are meant for `megaloom plan` or for building on the `meta` device.
"""

from __future__ import annotations

from typing import Any

from megaloom.config import ModelConfig

GPT2_VOCAB = 50257

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(arch="gpt2", num_layers=4, hidden_size=128, num_heads=4, seq_len=128,
                 vocab_size=4096),
    "tiny-llama": dict(arch="llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2,
                       seq_len=128, vocab_size=4096),
    "gpt2-124m": dict(arch="gpt2", num_layers=12, hidden_size=768, num_heads=12, seq_len=1024,
                      vocab_size=GPT2_VOCAB),
    "gpt2-355m": dict(arch="gpt2", num_layers=24, hidden_size=1024, num_heads=16, seq_len=1024,
                      vocab_size=GPT2_VOCAB),
    "gpt2-774m": dict(arch="gpt2", num_layers=36, hidden_size=1280, num_heads=20, seq_len=1024,
                      vocab_size=GPT2_VOCAB),
    "gpt2-1.5b": dict(arch="gpt2", num_layers=48, hidden_size=1600, num_heads=25, seq_len=1024,
                      vocab_size=GPT2_VOCAB),
    "megatron-8.3b": dict(arch="gpt2", num_layers=72, hidden_size=3072, num_heads=32,
                          seq_len=1024, vocab_size=GPT2_VOCAB),
    "gpt3-175b": dict(arch="gpt2", num_layers=96, hidden_size=12288, num_heads=96, seq_len=2048,
                      vocab_size=GPT2_VOCAB),
    "mt-nlg-530b": dict(arch="gpt2", num_layers=105, hidden_size=20480, num_heads=128,
                        seq_len=2048, vocab_size=GPT2_VOCAB),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
