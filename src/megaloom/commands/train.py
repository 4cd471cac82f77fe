"""`megaloom train [CONFIG] [key.sub=value ...]`: pretrain or continue training a GPT."""

from __future__ import annotations

import argparse
import logging

from megaloom.config import Config, ConfigError, load_config
from megaloom.utils.launch import relaunch_under_torchrun, under_torchrun
from megaloom.utils.run_lock import hold_output_dir

NAME = "train"
HELP = "train a GPT (default: the tiny recipe on the embedded corpus)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML recipe (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. train.lr=3e-4 model.num_layers=4")
    parser.add_argument("--out", help="output directory (same as train.out_dir=...)")
    parser.add_argument("--no-resume", action="store_true",
                        help="refuse to continue when the output directory has a checkpoint")
    parser.add_argument("--samples", type=int, default=3,
                        help="sample texts to print at the end (0 for none)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="start N processes on this machine with torchrun "
                             "(dp = N / (parallel.tp x parallel.pp))")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="K",
                        help="elastic restarts: when a rank dies, torchrun restarts all ranks "
                             "up to K times and the run resumes from its newest checkpoint")


def run(args: argparse.Namespace) -> int:
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # only overrides were given
        config_path, overrides = None, [config_path, *overrides]
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    config = load_config(config_path, overrides)
    relaunch = (args.nproc > 1 or args.max_restarts) and not under_torchrun()
    if relaunch:
        from megaloom.layout_rules import launch_problem

        if args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        if not config.model.init_from and (problem := launch_problem(config, args.nproc)):
            raise ConfigError(problem)
    with hold_output_dir(config.train.out_dir):  # the launcher holds it for its ranks
        if relaunch:
            return relaunch_under_torchrun(args.nproc, args.command_line, args.max_restarts)
        return _train(args, config)


def _train(args: argparse.Namespace, config: Config) -> int:
    from megaloom.model.registry import family_of
    from megaloom.train.metrics import plot_run
    from megaloom.train.run import build_trainer

    trainer = build_trainer(config, resume=not args.no_resume)
    result, is_main = trainer.run(), trainer.is_main
    del trainer  # the plot reuses the model's memory rather than adding to the peak
    if not is_main:
        return 130 if result.interrupted else 0
    plot_run(config.train.out_dir)
    if result.val_loss is not None:
        print(f"validation loss {result.val_loss:.4f} (perplexity "
              f"{min(2.718281828 ** result.val_loss, 1e12):.2f}) at step {result.step}")
    print(f"checkpoint: {result.checkpoint}")
    if args.samples and not result.interrupted:
        if family_of(config.model).generates:
            print_samples(result.checkpoint, args.samples)
        elif config.task.name == "mlm":
            print_fill_mask(result.checkpoint, args.samples)
    return 130 if result.interrupted else 0


SAMPLE_PROMPTS = ("The", "In Python,", "def ")
SPAN_PROMPTS = ("Return a new <extra_id_0> of the items.", "Import the <extra_id_0> module "
                "<extra_id_1>.", "This function raises a <extra_id_0> when the file is missing.")
FILL_PROMPTS = ("Return a new [MASK] of the items.", "Import the [MASK] module first.",
                "This function raises a [MASK] when the file is missing.")


def print_fill_mask(checkpoint, count: int) -> None:
    """Print an encoder's three likeliest tokens for the blank of a few sentences."""
    from megaloom.data.tokenizer import Tokenizer
    from megaloom.infer.fill_mask import fill_mask
    from megaloom.loading import load_model

    model, config, tokenizer_path = load_model(checkpoint)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    mlm = config.task.mlm
    print("fill-mask:")
    for prompt in (FILL_PROMPTS[i % len(FILL_PROMPTS)] for i in range(count)):
        (best,) = fill_mask(model, tokenizer, prompt.replace("[MASK]", mlm.mask_token), 3, mlm)
        print(f"--- {prompt!r}: " + ", ".join(f"{t!r} {p:.3f}" for t, p in best))


def print_samples(checkpoint, count: int) -> None:
    """Print a few short top-p generations from the final checkpoint: continuations of a
    decoder's prompts, an encoder-decoder's fillings of the sentinels in its sources."""
    from megaloom.data.tokenizer import Tokenizer
    from megaloom.infer import Engine, Request, SamplingParams
    from megaloom.loading import load_model

    model, _, tokenizer_path = load_model(checkpoint)
    engine = Engine(model, Tokenizer.from_file(tokenizer_path), max_batch_size=count)
    spans = getattr(model, "encoder_decoder", False)
    pool = SPAN_PROMPTS if spans else SAMPLE_PROMPTS
    prompts = [pool[i % len(pool)] for i in range(count)]
    params = SamplingParams(max_tokens=24 if spans else 48, temperature=0.8, top_p=0.95, seed=0)
    outputs = engine.generate([Request(prompt, params) for prompt in prompts])
    print("samples:" if not spans else "span fillings:")
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"--- {prompt!r}\n{'' if spans else prompt}{output.completions[0].text}")
