"""`megaloom evaluate MODEL --task TASK --data FILE [--json OUT] [--db URL] [--nproc N]`:
score a model with a named protocol (`megaloom.evaluate`).

Tasks: `perplexity` (strided, chunks or megatron protocol), `lambada` (cloze, last word),
`choice` (multiple choice by log-likelihood), `generate` (ROUGE of generations against
references) and `classify` (fine-tuned classifiers, or a language model zero-shot by label
words; scikit-learn metrics). MODEL is a run
directory, a fine-tuned run or `hf:DIR`. The results table goes to stdout, the whole report to
`--json`, and with `--db` to the `evaluations` table (generations too, with their scores).
`--nproc N` splits the model over N tensor-parallel ranks; every rank computes the same
numbers and rank 0 reports them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from megaloom.commands.generate import add_sampling_arguments, open_sinks
from megaloom.infer.sinks import DEFAULT_DB_URL
from megaloom.utils.launch import Launch, relaunch_under_torchrun, under_torchrun

NAME = "evaluate"
HELP = "evaluate a model: perplexity, lambada, multiple choice, ROUGE or classification"
TASKS = ("perplexity", "lambada", "choice", "generate", "classify")
HEADLINE = {"perplexity": ("perplexity", "word_perplexity", "bits_per_byte",
                           "adjusted_perplexity", "nll"),
            "lambada": ("acc", "perplexity"), "choice": ("acc", "acc_norm"),
            "classify": ("accuracy", "majority_baseline")}

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="run dir, checkpoint dir or hf:DIR")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="JSONL (perplexity also takes a .txt file as one document)")
    parser.add_argument("--json", metavar="OUT", help="write the whole report here")
    parser.add_argument("--db", nargs="?", const=DEFAULT_DB_URL, default=None, metavar="URL",
                        help="store the report (and generations) in a SQL database "
                             f"(default URL: {DEFAULT_DB_URL})")
    parser.add_argument("--field", default="text",
                        help="text field of JSONL records (perplexity, lambada; default text)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip invalid lines (counted and reported) instead of stopping")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or an accelerator")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="split the model over N tensor-parallel processes (torchrun)")
    ppl = parser.add_argument_group("perplexity")
    ppl.add_argument("--protocol", default="strided", choices=("strided", "chunks", "megatron"),
                     help="strided: Hugging Face guide (default); chunks: non-overlapping, tail "
                          "dropped (Wanda/SparseGPT); megatron: word-adjusted perplexity")
    ppl.add_argument("--max-length", type=int, default=None,
                     help="tokens per window or chunk (default: the model's seq_len)")
    ppl.add_argument("--stride", type=int, default=None,
                     help="window step for strided/megatron (default: max-length // 2)")
    cloze = parser.add_argument_group("lambada and choice")
    cloze.add_argument("--truncate", action="store_true",
                       help="cut contexts longer than the model from the left (counted) "
                            "instead of stopping")
    gen = parser.add_argument_group("generate (sampling as in megaloom generate)")
    add_sampling_arguments(gen)
    gen.add_argument("--output", metavar="FILE.jsonl",
                     help="append each generation with its reference and scores")
    gen.add_argument("--no-stem", action="store_true", help="ROUGE without Porter stemming")
    gen.add_argument("--rouge-tokenizer", default="default", choices=("default", "unicode"),
                     help="default: rouge-score's (ASCII only); unicode: any script")
    gen.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                     help="bootstrap resamples for the 95%% interval (0: none; default 1000)")
    gen.add_argument("--bootstrap-seed", type=int, default=0)
    gen.add_argument("--bleu", action="store_true", help="also BLEU and chrF (sacrebleu)")
    cls = parser.add_argument_group("classify")
    cls.add_argument("--confusion", metavar="PNG",
                     help="confusion-matrix image (default: beside --json)")
    cls.add_argument("--prompt", default=None,
                     help="language models (zero-shot): the text before the label word, with "
                          "{text} for the record's text (default: '{text}\\nAnswer:')")
    cls.add_argument("--label-words", default=None, metavar="LABEL=WORD,...",
                     help="language models (zero-shot): the word scored for each label "
                          "(default: the labels themselves)")


def run(args: argparse.Namespace) -> int:
    from megaloom.evaluate.run import Evaluation, check_arguments

    check_arguments(args)
    if args.nproc > 1 and not under_torchrun():
        return relaunch_under_torchrun(args.nproc, args.command_line)
    leader = Launch.from_environment().is_leader
    sinks = open_sinks(args) if leader else []
    try:
        evaluation = Evaluation.load(args)
        report = evaluation.run(args, [s for s in sinks if args.task == "generate"])
        if report is None:
            return 0
        report = {"task": args.task, "model": args.model, "data": str(args.data), **report}
        print(table(report))
        if args.json:
            from megaloom.utils.io import atomic_write_text

            atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
            print(f"report: {args.json}")
        for sink in sinks:
            if hasattr(sink, "write_evaluation"):  # a database keeps the report too
                sink.write_evaluation(args.model, args.task, report)
        if args.task == "classify":
            path = confusion_path(args)
            if path is not None:
                from megaloom.evaluate.metrics import plot_confusion

                plot_confusion(report["confusion_matrix"], report["labels"], path)
                print(f"confusion matrix: {path}")
    finally:
        for sink in sinks:
            sink.close()
    return 0


def confusion_path(args: argparse.Namespace) -> Path | None:
    if args.confusion:
        return Path(args.confusion)
    if args.json:
        return Path(args.json).with_suffix(".confusion.png")
    return None


def table(report: dict) -> str:
    """The headline numbers and counts as an aligned two-column table."""
    rows = [("task", report["task"]), ("protocol", report["protocol"])]
    for key in ("documents", "windows", "tokens_scored", "truncated", "skipped"):
        if key in report:
            rows.append((key, report[key]))
    if report["task"] == "generate":
        rouge = report["rouge"]
        for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            f1 = rouge[kind]
            interval = f1.get("f1_ci95")
            ci = f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
            rows.append((f"{kind} P/R/F1", f"{f1['precision']:.4f} / {f1['recall']:.4f} / "
                                           f"{f1['f1']:.4f}{ci}"))
        for name in ("bleu", "chrf"):
            if name in report:
                rows.append((name, f"{report[name]['score']:.2f}"))
    else:
        for key in HEADLINE[report["task"]]:
            if key in report:
                rows.append((key, f"{report[key]:.4f}"))
    if report["task"] == "classify":
        for average in ("macro", "micro", "weighted"):
            rows.append((f"{average} F1", f"{report[average]['f1']:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
