"""Generation throughput: megaloom's engine against Hugging Face `transformers` `generate()`.

Both run the same weights (a ~30M-parameter GPT-2 flavour model built with random weights and
copied into `GPT2LMHeadModel` through `megaloom.interop.weights`), fp32, on CPU, in the same
process after a warm-up; greedy by default, sampled with `--temperature` (and `--top-p`), where
megaloom's exact greedy shortcut (`megaloom.infer.head`) does not apply. For each batch size
it measures:

- time to first token (TTFT): a run with one new token (prefill + first sample),
- prefill tokens/s: batch * prompt_len / TTFT,
- decode tokens/s: batch * (new_tokens - 1) / (time of the full run - TTFT).

Each figure is the best of `--repeats` runs, alternating the two frameworks, so a noisy shared
machine penalises both alike. The greedy outputs of the two are compared as a sanity check.

    python -m benchmarks.generate_throughput [--temperature 0.8 --top-p 0.95] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.common import machine_info, write_json
from megaloom.config import ModelConfig
from megaloom.infer import Engine, Request, SamplingParams
from megaloom.interop.weights import megaloom_to_hf
from megaloom.model.gpt import GPT


def build_models(args: argparse.Namespace) -> tuple[GPT, GPT2LMHeadModel]:
    config = ModelConfig(arch="gpt2", num_layers=args.layers, hidden_size=args.hidden,
                         num_heads=args.heads, seq_len=args.seq_len, vocab_size=50257)
    torch.manual_seed(0)
    ours = GPT(config).eval()
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.seq_len,
                           n_embd=config.hidden_size, n_layer=config.num_layers,
                           n_head=config.num_heads, activation_function="gelu_new",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           layer_norm_epsilon=config.norm_eps, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_config).eval()
    state = megaloom_to_hf(ours.state_dict(), config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    leftovers = [k for k in missing if not k.endswith("lm_head.weight")
                 and not k.endswith("attn.bias") and not k.endswith("masked_bias")]
    if leftovers or unexpected:
        raise RuntimeError(f"weight copy failed: missing {leftovers}, unexpected {unexpected}")
    hf.tie_weights()
    return ours, hf


def run_megaloom(engine: Engine, prompts: torch.Tensor, new_tokens: int, args
                 ) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=0)
    outputs = engine.generate([Request(p, params) for p in prompts.tolist()])
    return [o.completions[0].token_ids for o in outputs]


def run_hf(model: GPT2LMHeadModel, prompts: torch.Tensor, new_tokens: int, args
           ) -> list[list[int]]:
    sampling = ({"do_sample": True, "temperature": args.temperature, "top_p": args.top_p,
                 "top_k": 0} if args.temperature > 0 else {"do_sample": False})
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, eos_token_id=None, **sampling)
    start = 1 if model.config.is_encoder_decoder else prompts.shape[1]  # T5: the start token
    return out[:, start:].tolist()


def timed(fn, *args) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def measure(name: str, fn, model, prompts: torch.Tensor, args, results: dict) -> None:
    ttft, _ = timed(fn, model, prompts, 1, args)
    total, tokens = timed(fn, model, prompts, args.new_tokens, args)
    best = results.setdefault(name, {"ttft_s": float("inf"), "total_s": float("inf")})
    best["ttft_s"] = min(best["ttft_s"], ttft)
    best["total_s"] = min(best["total_s"], total)
    best["tokens"] = tokens


def bench_batch(batch: int, ours: GPT, hf: GPT2LMHeadModel, args) -> dict:
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_len),
                            generator=generator)
    engine = Engine(ours, max_batch_size=batch)
    runners = {"megaloom": (run_megaloom, engine), "transformers": (run_hf, hf)}
    for fn, model in runners.values():  # warm-up
        fn(model, prompts, 8, args)
    results: dict = {}
    for _ in range(args.repeats):
        for name, (fn, model) in runners.items():
            measure(name, fn, model, prompts, args, results)
    report = {"batch": batch}
    for name, r in results.items():
        decode_s = r["total_s"] - r["ttft_s"]
        report[name] = {
            "ttft_ms": 1e3 * r["ttft_s"],
            "prefill_tokens_per_s": batch * args.prompt_len / r["ttft_s"],
            "decode_tokens_per_s": batch * (args.new_tokens - 1) / decode_s,
        }
    if args.temperature == 0:
        report["same_greedy_tokens"] = (results["megaloom"]["tokens"]
                                        == results["transformers"]["tokens"])
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
        report[f"{key}_ratio"] = report["megaloom"][key] / report["transformers"][key]
    report["ttft_speedup"] = report["transformers"]["ttft_ms"] / report["megaloom"]["ttft_ms"]
    return report


def parse_arguments(doc: str, **defaults) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) decodes greedily; above 0 both sides sample")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both (default: torch's choice); 1 gives "
                             "steadier figures on a busy shared machine")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.set_defaults(**defaults)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def run_benchmark(ours, hf, args: argparse.Namespace, flavour: str) -> None:
    """Time every batch size, print the table and write the JSON."""
    machine = {**machine_info(), "transformers": transformers.__version__}
    info = {"machine": machine, "params_m": ours.num_parameters() / 1e6,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": []}
    print(f"machine: {info['machine']}")
    decoding = (f"sampled (temperature {args.temperature}, top-p {args.top_p})"
                if args.temperature > 0 else "greedy")
    info["decoding"] = decoding
    print(f"model: {flavour}, {info['params_m']:.1f}M parameters, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {decoding}, fp32")
    for batch in args.batches:
        report = bench_batch(batch, ours, hf, args)
        info["runs"].append(report)
        for name in ("megaloom", "transformers"):
            r = report[name]
            print(f"batch {batch:2d} {name:12s} decode {r['decode_tokens_per_s']:8.1f} tok/s  "
                  f"prefill {r['prefill_tokens_per_s']:8.1f} tok/s  TTFT {r['ttft_ms']:7.1f} ms")
        print(f"batch {batch:2d} ratios: decode {report['decode_tokens_per_s_ratio']:.2f}x  "
              f"prefill {report['prefill_tokens_per_s_ratio']:.2f}x  "
              f"TTFT {report['ttft_speedup']:.2f}x  same greedy tokens: "
              f"{report.get('same_greedy_tokens', 'n/a (sampled)')}")
    write_json(args.json, info)


def main() -> None:
    args = parse_arguments(__doc__)
    ours, hf = build_models(args)
    run_benchmark(ours, hf, args, "gpt2 flavour")


if __name__ == "__main__":
    main()
