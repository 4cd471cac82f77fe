"""`megaloom plan`: parameters, memory, FLOPs and training time of a model on a layout.

Reads a YAML recipe (its model, and its train/parallel sections as defaults where the file
has them) or a preset name, applies the shape flags and the command-line options and prints a
table (or `--json`). With `--search` it ranks every layout of `--gpus` GPUs that fits. All
arithmetic lives in `megaloom.plan`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from megaloom.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    load_config,
    read_yaml_mapping,
)
from megaloom.model.presets import PRESETS, preset_config
from megaloom.plan import Layout, PlanError, estimate, get_gpu, search
from megaloom.plan.flops import HFU_CONVENTIONS
from megaloom.plan.gpus import GIB, GPUS
from megaloom.plan.layout import PRECISIONS, RECOMPUTE_CHOICES, ZERO_STAGES
from megaloom.plan.report import format_plan, format_search
from megaloom.plan.search import candidate_layouts

NAME = "plan"
HELP = "Estimate parameters, memory per GPU, FLOPs and training time of a model and layout."

_SHAPE_FLAGS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_heads",
                "kv-heads": "num_kv_heads", "ffn": "ffn_hidden_size", "vocab": "vocab_size",
                "seq-len": "seq_len"}
_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> float:
    """'270B', '2.7e11', '300M' -> a number (K, M, B/G, T suffixes)."""
    raw = text.strip().lower()
    scale = _SUFFIXES.get(raw[-1:], 1.0)
    number = raw[:-1] if raw[-1:] in _SUFFIXES else raw
    try:
        return float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 270e9 or 270B)") from None


CONVENTIONS = """\
conventions:
  memory      GiB (2^30 bytes) per GPU of its fullest pipeline stage: weights, gradients,
              optimizer state, activations (Korthikanti et al. 2022, 16-bit, dropout masks
              and attention scores counted), a fixed --allowance-gib
  model FLOPs 6 N + 12 L h s per token (MFU's numerator); N counts every parameter used in a
              matrix product: biases, norms and the padded vocabulary's head included, the
              input lookups (untied token embedding, learned positions) not
  hardware    model FLOPs plus recomputation (HFU's numerator): full recompute repeats each
              layer's forward, selective recompute the attention scores (--hfu-convention)
  time        hardware FLOPs / rate, plus the pipeline bubble (p - 1) / (m v), except with
              --achieved-tflops (an end-to-end rate, bubble inside)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = CONVENTIONS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", metavar="CONFIG|PRESET",
                        help=f"a YAML recipe or a preset ({', '.join(PRESETS)})")
    parser.add_argument("--gpus", type=int, help="GPU count (default tp x pp, i.e. dp = 1)")
    parser.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS), type=str.lower,
                        help="GPU type (default a100-80gb)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per node; tp stays within a node (default 8)")
    parser.add_argument("--tp", type=int,
                        help="tensor-parallel size (default: the recipe's parallel.tp, else 1)")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size, must divide the layers "
                        "(default: the recipe's parallel.pp, else 1)")
    parser.add_argument("--vpp", type=int, default=1,
                        help="virtual stages per pipeline rank (interleaved 1F1B; default 1)")
    parser.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: "
                        "the recipe's train.micro_batch_size, else 1)")
    parser.add_argument("--global-batch", type=int, help="sequences per iteration (default: "
                        "the recipe's train.global_batch_size, else micro-batch x dp)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="training precision (default: the recipe's train.precision, "
                             "else bf16)")
    parser.add_argument("--grad-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="gradient dtype in 16-bit training (default fp32, as Megatron)")
    parser.add_argument("--distributed-optimizer", action="store_true", default=None,
                        help="shard optimizer state over dp, i.e. --zero 1 (default: the "
                             "recipe's parallel.distributed_optimizer, else off)")
    parser.add_argument("--zero", type=int, choices=ZERO_STAGES,
                        help="ZeRO stage: 1 shards the optimizer state over dp, 2 also the "
                             "gradients, 3 also the weights (megaloom train runs stage 1, "
                             "parallel.distributed_optimizer; 2 and 3 are planning figures)")
    parser.add_argument("--sequence-parallel", action="store_true", default=None,
                        help="shard norms/dropout activations over tp (default: the recipe's "
                             "parallel.sequence_parallel, else off)")
    parser.add_argument("--recompute", choices=RECOMPUTE_CHOICES,
                        help="activation recomputation (default: full if the recipe's "
                             "train.activation_checkpointing is on, else none)")
    parser.add_argument("--hfu-convention", choices=HFU_CONVENTIONS, default="eq8",
                        help="FLOPs of selective recomputation: eq8 (default) Korthikanti et "
                             "al.'s printed Eq. 8, 12 L h s more per token; prose: their text, "
                             "the attention matmuls' forward once more, 4 L h s")
    shape = parser.add_argument_group(
        "model shape", "override the shape of CONFIG (a preset or the file's model section)")
    for flag, field in _SHAPE_FLAGS.items():
        shape.add_argument(f"--{flag}", type=int, dest=field, metavar="N",
                           help=f"model.{field}" + (" (default: recomputed from --hidden)"
                                                    if field == "ffn_hidden_size" else ""))
    parser.add_argument("--tokens", type=parse_count,
                        help="training tokens, e.g. 270B (default: the recipe's max_steps)")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--mfu", type=float,
                      help="fraction of the GPU's dense peak sustained while computing "
                           "(default 0.4)")
    rate.add_argument("--tflops", type=float,
                      help="hardware TFLOP/s per GPU while computing, recomputation counted; "
                           "the pipeline bubble is added on top")
    rate.add_argument("--achieved-tflops", type=float, metavar="TFLOPS",
                      help="end-to-end hardware TFLOP/s per GPU, bubble included (a measured "
                           "or published figure, e.g. MT-NLG's 126); not with --search")
    parser.add_argument("--allowance-gib", type=float, default=2.0,
                        help="fixed memory allowance per GPU: CUDA context, buffers (default 2)")
    parser.add_argument("--search", action="store_true",
                        help="rank every fitting (tp, pp, dp, micro-batch, recompute) layout")
    parser.add_argument("--top", type=int, default=10, help="layouts shown by --search (0: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@dataclass(frozen=True)
class _Source:
    """What CONFIG provided: the model and the run sections a recipe file holds (None where
    it has none, so the planner's own defaults apply, not the trainer's)."""

    title: str
    model: ModelConfig
    train: TrainConfig | None
    parallel: ParallelConfig | None


def _load_source(name: str) -> _Source:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        config = load_config(path)
        sections = read_yaml_mapping(path)
        return _Source(str(path), config.model, config.train if "train" in sections else None,
                       config.parallel if "parallel" in sections else None)
    if name in PRESETS:
        return _Source(name, preset_config(name), None, None)
    raise PlanError(f"CONFIG {name!r} is neither a YAML file nor a preset; presets: "
                    f"{', '.join(PRESETS)}")


def _reshape(model: ModelConfig, args: argparse.Namespace) -> ModelConfig:
    """The model with the shape flags applied; a new hidden size recomputes the FFN width
    unless --ffn is given."""
    changes = {field: getattr(args, field) for field in _SHAPE_FLAGS.values()
               if getattr(args, field) is not None}
    if not changes:
        return model
    if "hidden_size" in changes and "ffn_hidden_size" not in changes:
        changes["ffn_hidden_size"] = None
    if "hidden_size" in changes or "num_heads" in changes:
        changes["head_dim"] = None
    if ("num_heads" in changes and "num_kv_heads" not in changes
            and model.num_kv_heads == model.num_heads):  # plain multi-head attention stays so
        changes["num_kv_heads"] = None
    reshaped = replace(model, **changes)
    try:
        reshaped.validate()
    except ConfigError as exc:
        raise PlanError(str(exc)) from None
    return reshaped


def _pick(value, recipe_value, default):
    if value is not None:
        return value
    return default if recipe_value is None else recipe_value


def _layout(args: argparse.Namespace, source: _Source) -> Layout:
    train, parallel = source.train, source.parallel
    tp = _pick(args.tp, parallel and parallel.tp, 1)
    pp = _pick(args.pp, parallel and parallel.pp, 1)
    gpus = args.gpus if args.gpus is not None else tp * pp
    micro = _pick(args.micro_batch, train and train.micro_batch_size, 1)
    dp = max(gpus // max(tp * pp, 1), 1)  # `Layout.validate` reports a bad product
    recipe_recompute = ("full" if train.activation_checkpointing else "none") if train else None
    return Layout(
        gpus=gpus, tp=tp, pp=pp, vpp=args.vpp, micro_batch=micro,
        global_batch=_pick(args.global_batch, train and train.global_batch_size, micro * dp),
        recompute=_pick(args.recompute, recipe_recompute, "none"),
        sequence_parallel=bool(_pick(args.sequence_parallel,
                                     parallel and parallel.sequence_parallel, False)),
        zero=_zero_stage(args, parallel),
        precision=_pick(args.precision, train and train.precision, "bf16"),
        grad_dtype=args.grad_dtype,
    )


def _zero_stage(args: argparse.Namespace, parallel) -> int:
    """--zero, else 1 where --distributed-optimizer or the recipe shards the optimizer."""
    distributed = bool(_pick(args.distributed_optimizer,
                             parallel and parallel.distributed_optimizer, False))
    if args.zero is None:
        return int(distributed)
    if args.zero == 0 and args.distributed_optimizer:
        raise PlanError("--zero 0 contradicts --distributed-optimizer (which is --zero 1)")
    return args.zero


_SEARCHED = ("tp", "pp", "micro_batch", "recompute", "sequence_parallel")


_POSITIVE_INTS = ("gpus", "gpus_per_node", "tp", "pp", "vpp", "micro_batch", "global_batch",
                  *_SHAPE_FLAGS.values())


def _check_options(args: argparse.Namespace) -> None:
    """Every numeric flag finite and in range, as one line naming it."""
    for name in _POSITIVE_INTS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PlanError(f"--{_flag(name)} must be >= 1, got {value}")
    for name, value, low, high in (("tokens", args.tokens, 0.0, math.inf),
                                   ("tflops", args.tflops, 0.0, math.inf),
                                   ("achieved-tflops", args.achieved_tflops, 0.0, math.inf),
                                   ("mfu", args.mfu, 0.0, 1.0)):
        if value is not None and not (math.isfinite(value) and low < value <= high):
            rule = "in (0, 1]" if high == 1.0 else "a finite number > 0"
            raise PlanError(f"--{name} must be {rule}, got {value}")
    if not (math.isfinite(args.allowance_gib) and args.allowance_gib >= 0):
        raise PlanError(f"--allowance-gib must be a finite number >= 0, got "
                        f"{args.allowance_gib}")
    if args.top < 0:
        raise PlanError(f"--top must be >= 0, got {args.top}")
    if args.search:
        given = [name for name in _SEARCHED if getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + _flag(name) for name in given)
            raise PlanError(f"--search chooses {flags} itself; drop them or drop --search")
        if args.gpus is None:
            raise PlanError("--search needs --gpus")
        if args.achieved_tflops is not None:
            raise PlanError("--achieved-tflops is the end-to-end rate of one layout; --search "
                            "compares layouts by a busy rate (--tflops or --mfu)")


def _flag(field: str) -> str:
    names = {v: k for k, v in _SHAPE_FLAGS.items()}
    return names.get(field, field.replace("_", "-"))


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    source = _load_source(args.config)
    model = _reshape(source.model, args)
    tokens = args.tokens
    if tokens is None and source.train is not None:
        tokens = float(source.train.max_steps * source.train.global_batch_size * model.seq_len)
    options = dict(mfu=args.mfu, tflops=args.tflops, tokens=tokens,
                   allowance_bytes=args.allowance_gib * GIB, hfu_convention=args.hfu_convention)
    if args.achieved_tflops is not None:
        options["achieved_tflops"] = args.achieved_tflops
    gpu = get_gpu(args.gpu)
    if args.search:
        if args.global_batch is None and source.train is None:
            raise PlanError("--search needs --global-batch (or a recipe whose train section "
                            "sets it)")
        base = _layout(argparse.Namespace(**{**vars(args), "tp": 1, "pp": 1}), source)
        plans = search(model, base, gpu, gpus_per_node=args.gpus_per_node, top=args.top,
                       **options)
        if not plans and not any(candidate_layouts(model, base, args.gpus_per_node)):
            raise PlanError(f"no layout exists for {model.num_layers} layers and "
                            f"{model.num_heads} heads on --gpus {base.gpus} (tp x pp must "
                            "divide it, tp the heads, and dp the global batch)")
        if args.json:
            print(json.dumps({"plans": [p.to_dict() for p in plans]}, indent=2))
        else:
            print(format_search(plans, source.title, base.gpus, gpu.name))
        return 0
    plan = estimate(model, _layout(args, source), gpu, gpus_per_node=args.gpus_per_node,
                    **options)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan, source.title))
    return 0
