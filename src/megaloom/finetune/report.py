"""The end-of-run report of a fine-tuning run on its validation file: `DIR/eval.json` and, for
classifiers, `DIR/confusion.png`. Metrics come from `megaloom.evaluate.metrics`.

- classification: predictions through the trained shards on every layout (`Trainer.predict`,
  label scores gathered over tp), then accuracy, per-class precision/recall/F1, macro/micro/
  weighted averages and the confusion matrix (scikit-learn).
- SFT: loss and perplexity over the response tokens of the validation rows (whole
  micro-batches), and ROUGE of
  greedy generations for the first `task.eval_samples` prompts (one process: the saved model,
  adapters merged, through the inference engine).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from megaloom.evaluate import metrics
from megaloom.tasks.classify import ClassifyData
from megaloom.tasks.sft import SFTData
from megaloom.train.trainer import Trainer
from megaloom.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def classification_report(trainer: Trainer, data: ClassifyData, labels: list[str]) -> dict:
    axis = trainer.topo.tp_axis
    scores = trainer.predict(data.rows, lambda out, batch: trainer.task.scores(out, batch, axis))
    predicted = np.argmax(np.asarray(scores), axis=1).tolist()
    return metrics.classification(data.labels, predicted, labels)


def sft_report(trainer: Trainer, data: SFTData, checkpoint: Path | None) -> dict:
    loss = trainer.evaluate(data.rows, limit=None)
    report: dict = {"protocol": "mean next-token NLL over the response tokens (and end token) "
                                "of the validation rows, whole micro-batches",
                    "samples": data.samples, "trained_tokens": data.trained_tokens,
                    "loss": loss, "perplexity": math.exp(min(loss, 50.0)) if loss else None}
    count = min(trainer.config.task.eval_samples, data.samples)
    if count and trainer.topo.world_size == 1 and checkpoint is not None:
        generations = greedy_generations(checkpoint, data.prompts[:count],
                                         trainer.config.task.max_new_tokens)
        report["rouge"] = metrics.rouge(generations, data.references[:count])
        report["generations"] = [{"prompt": p, "reference": r, "generation": g}
                                 for p, r, g in zip(data.prompts, data.references, generations,
                                                    strict=False)]
    elif count:
        report["rouge"] = None
        log.info("ROUGE on generations is computed in one-process runs; for this run use "
                 "megaloom generate on %s", checkpoint)
    return report


def greedy_generations(checkpoint: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of `prompts` by the saved model, prompts cut from the left so that
    prompt and completion fit the model (`Engine.prompt_budget`)."""
    from megaloom.data.tokenizer import Tokenizer
    from megaloom.infer import Engine, Request, SamplingParams
    from megaloom.loading import load_model

    model, _, tokenizer_path = load_model(checkpoint)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    engine = Engine(model, tokenizer, max_batch_size=min(8, len(prompts)))
    new_tokens = min(max_new_tokens, engine.room(1))
    room = max(1, engine.prompt_budget(new_tokens))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    outputs = engine.generate([Request(tokenizer.encode(p)[-room:], params) for p in prompts])
    return [o.completions[0].text.strip() for o in outputs]


def write_report(trainer: Trainer, valid, checkpoint: Path | None) -> dict | None:
    """Compute the task's report (collective) and write it on rank 0; None without data."""
    if valid is None:
        return None
    task = trainer.config.task
    if task.name == "classify":
        report = classification_report(trainer, valid, task.labels)
    else:
        report = sft_report(trainer, valid, checkpoint)
    report = {"task": task.name, "checkpoint": str(checkpoint), **report}
    if trainer.is_main:
        out = Path(trainer.config.train.out_dir)
        atomic_write_text(out / "eval.json", json.dumps(report, indent=2) + "\n")
        if task.name == "classify":
            metrics.plot_confusion(report["confusion_matrix"], task.labels,
                                   out / "confusion.png")
    return report
