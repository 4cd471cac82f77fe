"""BERT pretraining (`task.name=mlm`): masked-LM on the `.bin`/`.idx` token windows, with the
sentence-order objective when the model has its binary head.

`MaskedLMDataset` turns window `i` (`seq_len - 3` tokens of a `GPTDataset`) into
`[CLS] A [SEP] B [SEP]`, cut at a random point, the halves swapped half the time for
sentence-order prediction (Lan et al. 2019, Megatron's BERT), and masked by
`data.masking.mask_for_mlm`. Every draw comes from `sample_rng`, so sample `i` is a pure
function of (seed, split, i): resume and every data-parallel split see the same masks.

The loss per micro-batch is the summed cross-entropy over the masked tokens (vocab-parallel:
tp ranks never gather logits), plus each row's sentence-order cross-entropy weighted by its
masked-token count; the trainer divides by the global masked-token count, so the total is
the masked-LM mean plus a masked-token-weighted sentence-order mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megaloom.config import MaskedLMConfig
from megaloom.data.masking import IGNORE, MLMMasking, mask_for_mlm, sample_rng, word_starts
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError
from megaloom.parallel.loss import parallel_lm_loss
from megaloom.parallel.topology import Axis
from megaloom.tasks.base import stack

FRAMING_TOKENS = 3  # [CLS], [SEP], [SEP]


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    mask: int
    never_masked: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer: Tokenizer, cfg: MaskedLMConfig) -> SpecialIds:
        """The framing and mask ids; a missing token is an error that says how to add it."""
        ids = {}
        for key, token in (("mask", cfg.mask_token), ("cls", cfg.cls_token),
                           ("sep", cfg.sep_token)):
            ids[key] = tokenizer.token_to_id(token)
            if ids[key] is None:
                raise DataError(f"the tokenizer {tokenizer.source} has no {token} token "
                                f"(task.mlm.{key}_token) for masked-LM training; train one "
                                f"with `megaloom tokenizer train --bert-tokens`")
        never = (ids["cls"], ids["sep"], ids["mask"], tokenizer.eod_id)
        return cls(ids["cls"], ids["sep"], ids["mask"], never)


class MaskedLMDataset(Sequence):
    """`windows[i]` (int arrays of `seq_len - 3` tokens) as masked BERT samples."""

    def __init__(self, windows: Sequence[np.ndarray], tokenizer: Tokenizer,
                 cfg: MaskedLMConfig, seed: int, sentence_order: bool):
        self.windows, self.seed, self.sentence_order = windows, seed, sentence_order
        self.special = SpecialIds.of(tokenizer, cfg)
        self.vocab_size = tokenizer.vocab_size
        self.masking = MLMMasking(cfg.rate, cfg.mask, cfg.random, cfg.max_ngram, cfg.whole_word)
        self.word_start = word_starts(tokenizer) if cfg.whole_word else None

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        window = np.asarray(self.windows[index], dtype=np.int64)
        rng = sample_rng(self.seed, int(index))
        cut = int(rng.integers(1, len(window)))
        first, second = window[:cut], window[cut:]
        swapped = self.sentence_order and bool(rng.random() < 0.5)
        if swapped:
            first, second = second, first
        sp = self.special
        tokens = np.concatenate([[sp.cls], first, [sp.sep], second, [sp.sep]])
        token_types = np.zeros(len(tokens), dtype=np.int64)
        token_types[len(first) + 2:] = 1
        inputs, labels = mask_for_mlm(tokens, rng, self.masking, sp.mask, self.vocab_size,
                                      sp.never_masked, self.word_start)
        return {"tokens": inputs, "labels": labels, "token_types": token_types,
                "order": np.int64(swapped)}


class MaskedLMTask:
    """Masked-LM (+ sentence-order) loss on `MaskedLMDataset` batches."""

    name = "mlm"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def batch(self, samples: Sequence[dict[str, np.ndarray]], device: torch.device
              ) -> dict[str, torch.Tensor]:
        labels = stack(samples, "labels", device)
        return {"tokens": stack(samples, "tokens", device),
                "token_types": stack(samples, "token_types", device),
                "targets": labels.clamp(min=0), "loss_mask": (labels != IGNORE).float(),
                "order": stack(samples, "order", device)}

    def loss_sum(self, output, batch: dict[str, torch.Tensor], axis: Axis) -> torch.Tensor:
        logits, order_scores = output if isinstance(output, tuple) else (output, None)
        loss = parallel_lm_loss(logits, batch["targets"], axis, self.vocab_size,
                                batch["loss_mask"])
        if order_scores is not None:
            wide = order_scores.to(torch.promote_types(order_scores.dtype, torch.float32))
            per_row = F.cross_entropy(wide, batch["order"], reduction="none")
            loss = loss + (per_row * batch["loss_mask"].sum(dim=1)).sum()
        return loss

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["loss_mask"].sum().item())
