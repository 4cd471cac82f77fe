"""Peak memory of encoding one long document: megaloom's piecewise encoding
(`megaloom.data.long_text.encode_documents`) against encoding the whole text with `tokenizers`
(what preprocessing did before), on the same text and tokenizer, each in a fresh process.

The text is `--mb` megabytes of words drawn from the README on one line; the tokenizer is
trained on the README. Both sides must produce the same ids (the script checks). Printed: peak
resident memory above the process's baseline, seconds, and the ratios.

    python -m benchmarks.long_document_memory [--mb 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, write_json

README = Path(__file__).parents[1] / "README.md"


def measure(mode: str, text_path: str, tokenizer_path: str) -> dict:
    """In this (fresh) process: encode the text one way; peak RSS growth, seconds, digest."""
    import hashlib

    import numpy as np

    from megaloom.data.long_text import encode_documents
    from megaloom.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    text = Path(text_path).read_text(encoding="utf-8")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if mode == "whole":
        ids = np.asarray(tokenizer.encode(text), dtype=np.uint16)
    else:
        ids = encode_documents(tokenizer, [text], np.uint16)[0]
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - baseline) / 1024, "seconds": seconds, "tokens": int(ids.size),
            "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def run_child(mode: str, text_path: str, tokenizer_path: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.long_document_memory", "--child",
                          mode, text_path, tokenizer_path], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=30.0, help="document size in MB")
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return

    from megaloom.data.tokenizer import train_bpe

    words = README.read_text(encoding="utf-8").split()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        text_path, tokenizer_path = Path(tmp) / "long.txt", Path(tmp) / "tokenizer.json"
        target, parts, size = int(args.mb * 1e6), [], 0
        while size < target:
            parts.append(rng.choice(words))
            size += len(parts[-1]) + 1
        text_path.write_text(" ".join(parts), encoding="utf-8")
        readme = Path(tmp) / "readme.txt"
        readme.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
        train_bpe([readme], 4096, tokenizer_path, show_progress=False)
        results = {mode: run_child(mode, str(text_path), str(tokenizer_path))
                   for mode in ("pieces", "whole")}
    if results["pieces"]["sha256"] != results["whole"]["sha256"]:
        raise SystemExit("the piecewise ids differ from the whole encoding")
    info = machine_info()
    print(f"one {args.mb:g} MB line, {results['whole']['tokens']:,} tokens, byte-level BPE "
          f"(vocab 4096), {info['cpu']} ({info['cores']} cores)")
    print(f"{'encoding':<10} {'peak MiB':>10} {'seconds':>9}")
    for mode, result in results.items():
        print(f"{mode:<10} {result['peak_mib']:>10.0f} {result['seconds']:>9.2f}")
    memory = results["whole"]["peak_mib"] / results["pieces"]["peak_mib"]
    speed = results["whole"]["seconds"] / results["pieces"]["seconds"]
    print(f"whole / pieces: {memory:.1f}x the memory, {speed:.2f}x the time; ids identical")
    write_json(args.json, {"machine": info, "mb": args.mb, "results": results,
                           "memory_ratio": memory, "time_ratio": speed})


if __name__ == "__main__":
    main()
