"""T5 generation throughput: megaloom's engine (encoder once, self- and cross-attention KV
caches) against Hugging Face `T5ForConditionalGeneration.generate()`, same weights.

A T5 v1.0-shaped model (ReLU MLP, tied and scaled head; 6 encoder and 6 decoder layers,
hidden 384, 6 heads of 64, d_ff 1536, vocabulary 32128 by default) is built with megaloom's
T5 initialisation and copied into `transformers` through `megaloom.interop.weights`; fp32 on
CPU, greedy by default. The timing protocol (TTFT = encoder + first decoder step, prefill and
decode tokens/s, best of `--repeats` alternating runs) and the printout are
`generate_throughput`'s; the greedy tokens of the two are compared.

    python -m benchmarks.t5_generate_throughput [--batches 1 8] [--json out.json]
"""

from __future__ import annotations

import torch
from transformers import T5Config, T5ForConditionalGeneration

from benchmarks.generate_throughput import parse_arguments, run_benchmark
from megaloom.config import ModelConfig
from megaloom.interop.weights import megaloom_to_hf
from megaloom.model.t5 import T5


def build_models(args) -> tuple[T5, T5ForConditionalGeneration]:
    config = ModelConfig(arch="t5", num_layers=args.layers, hidden_size=args.hidden,
                         num_heads=args.heads, ffn_hidden_size=4 * args.hidden,
                         seq_len=args.seq_len, vocab_size=32128, dropout=0.0)
    torch.manual_seed(0)
    ours = T5(config).eval()
    hf = T5ForConditionalGeneration(T5Config(
        vocab_size=config.vocab_size, d_model=config.hidden_size, d_kv=config.head_dim,
        d_ff=config.ffn_hidden_size, num_layers=config.num_layers, num_heads=config.num_heads,
        feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=None)).eval()
    state = megaloom_to_hf(ours.state_dict(), config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    leftovers = [k for k in missing if not k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    if leftovers or unexpected:
        raise RuntimeError(f"weight copy failed: missing {leftovers}, unexpected {unexpected}")
    hf.tie_weights()
    return ours, hf


def main() -> None:
    args = parse_arguments(__doc__, seq_len=256, new_tokens=64)
    ours, hf = build_models(args)
    run_benchmark(ours, hf, args, "t5 v1.0 shape (encoder-decoder)")


if __name__ == "__main__":
    main()
