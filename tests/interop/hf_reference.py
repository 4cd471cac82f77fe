"""Reference helpers for the Hugging Face interop tests: tiny `transformers` reference models built
locally with random weights (never downloaded), and megaloom models of the same shapes."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import GPT2Config, LlamaConfig, PretrainedConfig  # noqa: E402

from megaloom.config import ModelConfig  # noqa: E402

# name -> (HF config kwargs, the megaloom ModelConfig kwargs of the same model)
SHAPES: dict[str, tuple[dict, dict]] = {
    # tied embeddings, vocab 100 padded to 128, default gelu_new
    "gpt2-tied-padded": (
        dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64),
        dict(arch="gpt2", hidden_size=32, num_layers=2, num_heads=4, vocab_size=100, seq_len=64),
    ),
    # untied head, explicit n_inner, exact gelu, another epsilon, vocab already a multiple
    "gpt2-untied-gelu": (
        dict(model_type="gpt2", n_embd=48, n_layer=2, n_head=3, vocab_size=256, n_positions=48,
             n_inner=80, activation_function="gelu", layer_norm_epsilon=1e-6,
             tie_word_embeddings=False),
        dict(arch="gpt2", hidden_size=48, num_layers=2, num_heads=3, vocab_size=256, seq_len=48,
             ffn_hidden_size=80, activation="gelu", norm_eps=1e-6, tie_embeddings=False),
    ),
    # grouped-query attention (4 q heads, 2 kv heads), untied, padded vocab, rope_theta
    "llama-gqa-untied": (
        dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, vocab_size=100,
             max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-5),
        dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=96, vocab_size=100, seq_len=64, rope_theta=500000.0, norm_eps=1e-5),
    ),
    # multi-query attention (1 kv head), tied embeddings
    "llama-mqa-tied": (
        dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, intermediate_size=64, vocab_size=128,
             max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True),
        dict(arch="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1,
             ffn_hidden_size=64, vocab_size=128, seq_len=64, norm_eps=1e-6,
             tie_embeddings=True),
    ),
    # head_dim (24) that is not hidden/heads (32/2): what structured head pruning writes
    "llama-head-dim": (
        dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=24, intermediate_size=40, vocab_size=96,
             max_position_embeddings=64),
        dict(arch="llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
             head_dim=24, ffn_hidden_size=40, vocab_size=96, seq_len=64, norm_eps=1e-6),
    ),
    # plain multi-head Llama, vocab needing padding
    "llama-mha": (
        dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, intermediate_size=48, vocab_size=77,
             max_position_embeddings=64),
        dict(arch="llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
             ffn_hidden_size=48, vocab_size=77, seq_len=64, norm_eps=1e-6),
    ),
}


def hf_config(shape: str) -> PretrainedConfig:
    kwargs = dict(SHAPES[shape][0])
    cls = GPT2Config if kwargs.pop("model_type") == "gpt2" else LlamaConfig
    # no special ids: generation must run its 32 steps, and ids stay inside tiny vocabularies
    return cls(**kwargs, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def megaloom_config(shape: str) -> ModelConfig:
    return ModelConfig(**SHAPES[shape][1])


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter random values (norm weights near 1, biases non-zero), so a mapping
    bug in any tensor shows up in the logits."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        is_norm_weight = param.dim() == 1 and name.endswith("weight")
        param.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.08 * noise)
    return module


def hf_model(shape: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(shape), attn_implementation="eager")
    return randomize_(model, seed).eval()


def tokens(vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, vocab_size: int) -> torch.Tensor:
    """Greedy decoding with the full forward at every step (no cache), real vocabulary only."""
    ids = prompt
    for _ in range(new_tokens):
        logits = model(ids)[:, -1, :vocab_size]
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids
