"""Write the local data of the example lm-evaluation-harness tasks in this folder.

    python examples/lm_eval/make_data.py --out examples/lm_eval/data

A toy grammar in which the verb decides the object ("the fox walks to the long road."), so a
model trained on `corpus.txt` can answer the tasks: `choice.jsonl` (pick the object after
subject and verb), `cloze.jsonl` (the last word) and `generate.jsonl` (continue after the
verb). Items are short (they fit a 64-token context) and seeded, so every run makes the same
files. The YAMLs read `data/*.jsonl` relative to the directory `lm_eval` runs in.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SUBJECTS = ["the fox", "a writer", "the old sailor", "my neighbour", "the river", "a small cat"]
OBJECT_OF = {"walks to": "the long road", "writes about": "an empty house",
             "dreams of": "the quiet sea", "looks at": "a red kite",
             "sings to": "the winter garden", "remembers": "a bright morning"}


def clause(rng: random.Random) -> tuple[str, str, str]:
    verb = rng.choice(list(OBJECT_OF))
    return rng.choice(SUBJECTS), verb, OBJECT_OF[verb]


def corpus(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(f"{' '.join(clause(rng))}.\n" for _ in range(count))


def tasks(count: int, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    choice, cloze, generate = [], [], []
    for _ in range(count):
        subject, verb, obj = clause(rng)
        others = rng.sample([o for o in OBJECT_OF.values() if o != obj], rng.randint(1, 3))
        options = [obj, *others]
        rng.shuffle(options)
        choice.append({"context": f"{subject} {verb}", "choices": options,
                       "label": options.index(obj)})
        subject, verb, obj = clause(rng)
        cloze.append({"text": f"{subject} {verb} {obj}"})
        subject, verb, obj = clause(rng)
        generate.append({"prompt": f"{subject} {verb}", "reference": f"{obj}."})
    return {"choice": choice, "cloze": cloze, "generate": generate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--count", type=int, default=24, help="items per task (default 24)")
    parser.add_argument("--corpus-lines", type=int, default=2000,
                        help="sentences in corpus.txt (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text(corpus(args.corpus_lines, args.seed), encoding="utf-8")
    print(f"{out / 'corpus.txt'}: {args.corpus_lines} sentences")
    for name, records in tasks(args.count, args.seed + 1).items():
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        print(f"{path}: {len(records)} items")


if __name__ == "__main__":
    main()
