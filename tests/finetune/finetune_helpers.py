"""Helpers of the fine-tuning tests (a module with its own name, so spawned workers import
it): task data records, configs, and a fine-tuning `Trainer` built the way `megaloom
finetune` builds it."""

import json
import random

from megaloom.config import Config, LoraConfig, ParallelConfig, TaskConfig, TrainConfig
from megaloom.finetune.run import FinetunePreparation
from megaloom.train.trainer import Trainer

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "theta",
    "kappa",
    "lambda",
    "sigma",
    "omega",
    "river",
    "stone",
    "cloud",
    "paper",
    "green",
    "small",
    "large",
    "quick",
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def sft_records(count, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(2, 6))
        out.append({"prompt": "Repeat: " + " ".join(words), "response": " " + " ".join(words)})
    return out


def chat_records(count, seed):
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.sample(WORDS, 3))},
                {"role": "assistant", "content": " ".join(rng.sample(WORDS, 2))},
            ]
        }
        for _ in range(count)
    ]


def cls_records(count, seed):
    rng = random.Random(seed)
    out = []
    for i in range(count):
        label = ("green", "stone", "river")[i % 3]
        out.append({"text": " ".join(rng.sample(WORDS, 4) + [label]), "label": label})
    return out


def finetune_config(
    out_dir,
    task="sft",
    lora=0,
    tp=1,
    pp=1,
    sp=False,
    zero=False,
    max_steps=4,
    exit_at_step=None,
    micro=2,
    global_batch=8,
    **task_fields,
):
    return Config(
        train=TrainConfig(
            out_dir=str(out_dir),
            micro_batch_size=micro,
            global_batch_size=global_batch,
            max_steps=max_steps,
            exit_at_step=exit_at_step,
            lr=1e-2,
            min_lr=1e-3,
            warmup_steps=1,
            weight_decay=0.0,
            eval_interval=2,
            eval_iters=2,
            save_interval=100,
        ),
        parallel=ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp, distributed_optimizer=zero),
        task=TaskConfig(name=task, lora=LoraConfig(rank=lora, alpha=2.0 * lora or 16.0),
                        **task_fields),
    )


def make_trainer(
    workdir,
    out_dir,
    arch="gpt2",
    task="sft",
    train="sft.jsonl",
    valid="sft_valid.jsonl",
    topo=None,
    **config_fields,
):
    """A fine-tuning trainer built exactly as `megaloom finetune` builds it (resumed when
    `out_dir` has a checkpoint)."""
    from megaloom.checkpoint.reader import find_latest

    config = finetune_config(out_dir, task=task, **config_fields)
    preparation = FinetunePreparation(
        str(workdir / f"base-{arch}"), workdir / train, workdir / valid if valid else None
    )
    prepared = preparation(config)
    trainer = Trainer.create(
        config,
        prepared.train,
        prepared.valid,
        config.data.tokenizer,
        topo,
        prepared.source,
        prepared.task,
        prepared.adapt,
    )
    if find_latest(out_dir) is not None:
        trainer.resume(out_dir)
    trainer.preparation = preparation
    return trainer
