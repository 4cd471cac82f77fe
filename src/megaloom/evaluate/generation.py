"""The `generate` task: batched generations for JSONL `prompt` + `reference`, scored by ROUGE
(and optionally BLEU/chrF), each generation saved with its reference and scores.

Prompts go through the inference engine (continuous batching, the user's sampling flags, one
draft each). A prompt is cut from the left so prompt + `max_tokens` fit the model (an
encoder-decoder: the prompt fits the encoder, `max_tokens` the decoder; counted as
truncated); a prompt that cannot leave room for one new token is a bad line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from megaloom.errors import DataError
from megaloom.evaluate import metrics
from megaloom.infer.sinks import records_from
from megaloom.tasks.records import BadRecords, Record


@dataclass(frozen=True)
class Reference:
    where: str
    prompt: str
    reference: str


def read_reference(record: Record) -> Reference:
    return Reference(record.where, record.text("prompt"), record.text("reference"))


@dataclass(frozen=True)
class RougeOptions:
    stem: bool = True
    tokenizer: str = "default"
    bootstrap: int = 1000
    seed: int = 0
    bleu: bool = False


def generate(engine, tokenizer, model_name: str, records: Sequence[Record], params,
             options: RougeOptions, sinks: Sequence, bad: BadRecords) -> dict:
    """Generate for every valid record, score, write each record to `sinks`; the report."""
    from megaloom.infer import Request

    items = [r for r in (bad.check(read_reference, record) for record in records) if r]
    if not items:
        raise DataError("no prompt left to evaluate")
    room = engine.prompt_budget(params.max_tokens)
    if room < 1:
        raise DataError(f"--max-tokens {params.max_tokens} leaves no room for a prompt in the "
                        f"model's {engine.max_len}-token context")
    params = replace(params, n=1)
    requests, truncated = [], 0
    for i, item in enumerate(items):
        ids = tokenizer.encode(item.prompt)
        truncated += len(ids) > room
        requests.append(Request(ids[-room:], params, request_id=f"eval-{i}"))
    outputs = engine.generate(requests, progress=sys.stderr.isatty())
    generations = [o.completions[0].text.strip() for o in outputs]
    references = [item.reference for item in items]
    rouge = metrics.rouge(generations, references, stem=options.stem,
                          tokenizer=options.tokenizer, bootstrap=options.bootstrap,
                          seed=options.seed)
    per_sample = rouge.pop("per_sample_f1")
    report = {"protocol": "one draft per prompt through the inference engine; "
                          + rouge["protocol"],
              "documents": len(items), "truncated": truncated,
              "generated_tokens": sum(len(o.completions[0].token_ids) for o in outputs),
              "params": params.to_dict(), "rouge": rouge}
    if options.bleu:
        report.update(metrics.bleu_chrf(generations, references))
    for i, (item, output) in enumerate(zip(items, outputs, strict=True)):
        record = records_from(output, model_name)[0]
        record.prompt = item.prompt
        record.extra = {"reference": item.reference, "where": item.where,
                        "scores": {kind: values[i] for kind, values in per_sample.items()}}
        for sink in sinks:
            sink.write([record])
    return report
