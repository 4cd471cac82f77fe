"""`megaloom finetune BASE --task sft|classify --data TRAIN.jsonl [--valid VALID.jsonl] --out
DIR [key.sub=value ...] [--nproc N]`: adapt a trained model to a task."""

from __future__ import annotations

import argparse

from megaloom.utils.launch import relaunch_under_torchrun, under_torchrun
from megaloom.utils.run_lock import hold_output_dir

NAME = "finetune"
HELP = "fine-tune a model for generation (SFT) or classification, fully or with LoRA"

DEFAULTS = ("train.lr=1e-4", "train.min_lr=1e-5", "train.warmup_steps=10",
            "train.weight_decay=0.0", "train.eval_interval=50", "train.save_interval=1000",
            "task.epochs=3")
"""Fine-tuning defaults applied before the recipe's and the command line's overrides."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base model: a megaloom run directory or hf:DIR")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. task.lora.rank=8 train.lr=3e-4")
    parser.add_argument("--task", required=True, choices=("sft", "classify"),
                        help="sft: prompt -> response generation; classify: text -> label")
    parser.add_argument("--data", required=True, metavar="TRAIN.jsonl", help="training data")
    parser.add_argument("--valid", metavar="VALID.jsonl",
                        help="validation data: validation loss while training, and the final "
                             "report (DIR/eval.json)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output run directory")
    parser.add_argument("--config", metavar="YAML", help="recipe with more settings")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="start N processes on this machine with torchrun")


def run(args: argparse.Namespace) -> int:
    from megaloom.finetune.run import check_files

    check_files(args.data, args.valid)
    with hold_output_dir(args.out):  # the launcher holds it for its ranks
        if args.nproc > 1 and not under_torchrun():
            return relaunch_under_torchrun(args.nproc, args.command_line, 0)
        return _finetune(args)


def _finetune(args: argparse.Namespace) -> int:
    from megaloom.config import load_config
    from megaloom.finetune.report import write_report
    from megaloom.finetune.run import FinetunePreparation
    from megaloom.train.metrics import plot_run
    from megaloom.train.run import build_trainer

    overrides = [*DEFAULTS, f"task.name={args.task}", *args.overrides,
                 f"train.out_dir={args.out}"]
    config = load_config(args.config, overrides)
    preparation = FinetunePreparation(args.base, args.data, args.valid)
    trainer = build_trainer(config, prepare=preparation)
    result = trainer.run()
    report = None if result.interrupted else write_report(trainer, preparation.valid,
                                                          result.checkpoint)
    is_main = trainer.is_main
    del trainer  # the plot reuses the model's memory rather than adding to the peak
    if not is_main:
        return 130 if result.interrupted else 0
    plot_run(args.out)
    if result.val_loss is not None:
        print(f"validation loss {result.val_loss:.4f} at step {result.step}")
    if report is not None:
        print(summary(report))
        print(f"report: {args.out}/eval.json")
    print(f"checkpoint: {result.checkpoint}")
    return 130 if result.interrupted else 0


def summary(report: dict) -> str:
    """One or two lines of the headline metrics."""
    if report["task"] == "classify":
        return (f"accuracy {report['accuracy']:.4f}, macro F1 {report['macro']['f1']:.4f}, "
                f"weighted F1 {report['weighted']['f1']:.4f} on {report['samples']} texts")
    text = f"response loss {report['loss']:.4f} (perplexity {report['perplexity']:.2f})"
    if report.get("rouge"):
        rouge = report["rouge"]
        text += (f"; ROUGE-1/2/L F1 {rouge['rouge1']['f1']:.4f}/{rouge['rouge2']['f1']:.4f}/"
                 f"{rouge['rougeL']['f1']:.4f} on {rouge['samples']} greedy generations")
    return text
