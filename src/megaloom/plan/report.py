"""Readable text for plans: one plan as a broken-down table, a search as a ranked table.

Units: memory in GiB (2^30 bytes), parameters in B (1e9) / M (1e6), FLOP rates in TFLOP/s
(1e12). `Plan.to_dict()` gives the same figures in base units for `--json`.
"""

from __future__ import annotations

from megaloom.plan.estimate import Plan
from megaloom.plan.gpus import GIB, TERA

UNITS = "Units: memory in GiB (2^30 bytes); parameters in B = 1e9, M = 1e6; TFLOP/s = 1e12 FLOP/s."


def format_count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:g}"


def format_duration(seconds: float) -> str:
    for scale, unit in ((86400.0, "days"), (3600.0, "h"), (60.0, "min"), (1.0, "s")):
        if seconds >= scale:
            return f"{seconds / scale:.2f} {unit}"
    return f"{seconds * 1e3:.2f} ms"


def gib(n: float) -> str:
    value = n / GIB
    return f"{value:,.2f}" if value >= 0.01 or value == 0 else f"{value:.2g}"


def describe_model(plan: Plan) -> str:
    m = plan.model
    heads = f"{m.num_heads} heads" + (f" ({m.num_kv_heads} kv)" if m.num_kv_heads != m.num_heads
                                      else "")
    layers = (f"{m.num_layers} encoder + {m.decoder_layers} decoder layers" if m.decoder_layers
              else f"{m.num_layers} layers")
    return (f"{m.arch}: {layers}, hidden {m.hidden_size}, {heads}, "
            f"ffn {m.ffn_hidden_size} ({m.activation}), seq {m.seq_len}, "
            f"vocab {m.padded_vocab_size} padded")


def describe_layout(plan: Plan) -> list[str]:
    lay = plan.layout
    return [
        f"{lay.gpus} x {plan.gpu.name}: tp {lay.tp} x pp {lay.pp} (vpp {lay.vpp}) x dp {lay.dp}; "
        f"micro-batch {lay.micro_batch}, global batch {lay.global_batch}, "
        f"{lay.num_micro_batches} micro-batches per pipeline",
        f"{lay.precision} weights, {'fp32' if lay.precision == 'fp32' else lay.grad_dtype} "
        f"gradients, recompute {lay.recompute}, sequence parallel "
        f"{'on' if lay.sequence_parallel else 'off'}, {_ZERO_WORDS[lay.zero]}",
    ]


_ZERO_WORDS = {0: "distributed optimizer off", 1: "distributed optimizer on (ZeRO-1)",
               2: "ZeRO-2 (optimizer state and gradients sharded over dp)",
               3: "ZeRO-3 (optimizer state, gradients and weights sharded over dp)"}


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [f"  {label:<{width}}  {value}" for label, value in rows]


def format_plan(plan: Plan, title: str) -> str:
    """The full breakdown of one plan."""
    lines = [f"megaloom plan: {title}", f"  {describe_model(plan)}", UNITS, "", "Layout"]
    lines += [f"  {text}" for text in describe_layout(plan)]

    lines += ["", "Parameters"]
    first, last = plan.stages[0], plan.stages[-1]
    rows = [("total", f"{format_count(plan.parameters)} ({plan.parameters:,})")]
    if len(plan.stages) > 1:
        rows.append((f"stage 0 / stage {last.stage}",
                     f"{format_count(first.total)} / {format_count(last.total)} "
                     f"({first.num_layers} layers each; embedding first, final norm and head "
                     "last)"))
    lines += _rows(rows)

    stage_names = [f"stage {m.stage}" for m in plan.memory]
    lines += ["", f"Memory per GPU, GiB ({' | '.join(stage_names)})"]
    keys = [("parameters per GPU", None), ("weights", "weights"), ("gradients", "gradients"),
            ("optimizer state", "optimizer"), ("activations", "activations"),
            ("recompute working set", "recompute_working"),
            ("head inputs and logits", "output_activations"), ("fixed allowance", "allowance")]
    rows = []
    for label, key in keys:
        if key is None:
            values = [format_count(m.params_per_gpu) for m in plan.memory]
        else:
            values = [gib(getattr(m, key)) for m in plan.memory]
        rows.append((label, " | ".join(values)))
    rows.append(("total", " | ".join(gib(m.total) for m in plan.memory)))
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    rows.append((f"{plan.gpu.name} ({gib(plan.gpu.memory_bytes)} GiB)", verdict))
    lines += _rows(rows)

    lines += ["", "Compute"]
    rows = [
        ("model FLOPs per token", f"{plan.model_flops_per_token:.4g} (6N + 12Lhs)"),
        ("hardware FLOPs per token",
         f"{plan.hardware_flops_per_token:.4g} (recompute {plan.layout.recompute})"),
        ("FLOPs per iteration", f"model {plan.model_flops_per_iteration:.4g}, "
                                f"hardware {plan.hardware_flops_per_iteration:.4g}"),
        ("pipeline bubble", f"{plan.bubble:.2%} of compute time ((p-1)/(m v))"),
        ("rate per GPU while busy", f"{plan.rate_flops / TERA:.1f} TFLOP/s "
                                    f"({plan.rate_flops / plan.peak_flops:.1%} of "
                                    f"{plan.peak_flops / TERA:g} peak)"),
        ("time per iteration", format_duration(plan.seconds_per_iteration)),
        ("tokens per second", f"{plan.tokens_per_second:,.0f}"),
        ("end-to-end MFU", f"{plan.mfu:.1%}"),
    ]
    if plan.tokens is not None:
        rows.append(("training", f"{format_count(plan.tokens)} tokens: {plan.iterations:,} "
                                 f"iterations, {format_duration(plan.total_seconds)}"))
    lines += _rows(rows)
    return "\n".join(lines)


def format_search(plans: list[Plan], title: str, gpus: int, gpu_name: str) -> str:
    """A ranked table of searched layouts."""
    head = [f"megaloom plan --search: {title} on {gpus} x {gpu_name}", UNITS, ""]
    if not plans:
        return "\n".join(head + ["No layout fits: more GPUs, a larger GPU, or a smaller "
                                 "global batch may help."])
    head[0] += f"; {len(plans)} fitting layouts, fastest first"
    header = ("rank", "tp", "pp", "vpp", "dp", "micro", "recompute", "SP", "mem GiB",
              "s/iter", "tokens/s", "MFU", "total")
    table = [header]
    for rank, plan in enumerate(plans, 1):
        lay = plan.layout
        total = plan.total_seconds
        table.append((
            str(rank), str(lay.tp), str(lay.pp), str(lay.vpp), str(lay.dp), str(lay.micro_batch),
            lay.recompute, "on" if lay.sequence_parallel else "off",
            gib(plan.peak_memory_bytes), f"{plan.seconds_per_iteration:.4g}",
            f"{plan.tokens_per_second:,.0f}", f"{plan.mfu:.1%}",
            "-" if total is None else format_duration(total),
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    body = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(head + body)
