"""Tokenizer files of a Hugging Face model directory: `tokenizer.json`, `tokenizer_config.json`
and `special_tokens_map.json`.

Owns copying them between HF directories and megaloom checkpoints, and writing the two JSON
side files when only a `tokenizer.json` is known (e.g. one trained by `megaloom tokenizer
train`), so `AutoTokenizer.from_pretrained` loads the export. Special tokens come from an
existing `tokenizer_config.json` when there is one, else from well-known spellings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megaloom.data.special_tokens import special_tokens
from megaloom.data.tokenizer import Tokenizer

TOKENIZER_JSON = "tokenizer.json"
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def find_tokenizer(directory: str | Path) -> Path | None:
    path = Path(directory) / TOKENIZER_JSON
    return path if path.is_file() else None


def copy_side_files(source_dir: Path, out_dir: Path) -> None:
    """Copy `tokenizer_config.json` / `special_tokens_map.json` when `source_dir` has them."""
    for name in SIDE_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)


def write_tokenizer_files(tokenizer_path: str | Path, out_dir: Path, model_max_length: int
                          ) -> dict[str, int | None]:
    """Put a loadable HF tokenizer into `out_dir`; return `bos_token_id` / `eos_token_id`."""
    tokenizer_path = Path(tokenizer_path)
    tokens = special_tokens(tokenizer_path)
    shutil.copyfile(tokenizer_path, out_dir / TOKENIZER_JSON)
    if (tokenizer_path.parent / SIDE_FILES[0]).is_file():
        copy_side_files(tokenizer_path.parent, out_dir)
    else:
        present = {k: v for k, v in tokens.items() if v is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
                  **present}
        for name, data in zip(SIDE_FILES, (config, present), strict=True):
            (out_dir / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    return {f"{key}_id": (tokenizer.token_to_id(text) if text else None)
            for key, text in tokens.items()}
