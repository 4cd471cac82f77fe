"""Build two fine-tuning tasks from the Python standard library installed with this
interpreter, deterministically:

- `summarize_{train,valid}.jsonl`: a docstring's body -> its summary line (SFT, `prompt` /
  `response`): functions, classes and methods whose docstring has a one-line summary and a
  body of at least `--min-body` characters.
- `package_{train,valid}.jsonl`: a docstring paragraph -> which part of the standard library
  it comes from (`text` / `label`, classification), for the packages in `--packages`.

Usage: python examples/finetune/stdlib_tasks.py OUT_DIR [--valid-fraction 0.1]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sysconfig
from pathlib import Path

PACKAGES = ("asyncio", "email", "json", "unittest", "xml", "http", "logging", "multiprocessing")


def docstrings(path: Path):
    """(qualified name, docstring) of every function and class in `path`."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            text = ast.get_docstring(node)
            if text:
                yield node.name, text


def in_valid(key: str, fraction: float) -> bool:
    """A stable split by hash, independent of file order."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    parser.add_argument("--min-body", type=int, default=80)
    parser.add_argument("--max-chars", type=int, default=600)
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES))
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    summaries = {"train": [], "valid": []}
    paragraphs = {"train": [], "valid": []}
    seen = set()
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if relative.parts[0] in ("test", "idlelib", "site-packages", "lib2to3", "tkinter"):
            continue
        package = relative.parts[0].removesuffix(".py")
        for name, text in docstrings(path):
            summary, _, body = text.partition("\n\n")
            key = f"{relative}:{name}:{summary}"
            split = "valid" if in_valid(key, args.valid_fraction) else "train"
            if ("\n" not in summary and len(body) >= args.min_body and key not in seen
                    and len(summary) < 120):
                seen.add(key)
                summaries[split].append({"prompt": body[:args.max_chars].strip() + "\nSummary:",
                                         "response": " " + summary.strip()})
            if package in args.packages:
                for paragraph in text.split("\n\n"):
                    paragraph = " ".join(paragraph.split())
                    if len(paragraph) >= 40:
                        paragraphs[split].append({"text": paragraph[:args.max_chars],
                                                  "label": package})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for task, data in (("summarize", summaries), ("package", paragraphs)):
        for split, records in data.items():
            path = args.out_dir / f"{task}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            print(f"{path}: {len(records)} records")


if __name__ == "__main__":
    main()
