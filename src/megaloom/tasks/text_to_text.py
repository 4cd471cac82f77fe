"""Teacher-forced encoder-decoder training (T5): span corruption and text-to-text
fine-tuning (summaries) share this loss.

A sample holds the source `tokens` (padded to `model.seq_len`), `keep` (True on the real
source tokens) and the `target` ids, with `target_mask` where targets are padded. The decoder
reads `[decoder_start_id] + target[:-1]`; the loss is the summed vocab-parallel cross-entropy
over the real target tokens, and the trainer divides it by their global count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megaloom.parallel.loss import parallel_lm_loss
from megaloom.parallel.topology import Axis
from megaloom.tasks.base import stack


class TextToTextTask:
    """Teacher-forced decoder loss on (source, target) samples; targets are padded to a
    multiple of `multiple` (the tp size under sequence parallelism)."""

    name = "text_to_text"

    def __init__(self, vocab_size: int, decoder_start_id: int, multiple: int = 1):
        self.vocab_size, self.start, self.multiple = vocab_size, decoder_start_id, multiple

    def batch(self, samples: Sequence[dict[str, np.ndarray]], device: torch.device
              ) -> dict[str, torch.Tensor]:
        target = stack(samples, "target", device)
        mask = (stack(samples, "target_mask", device, torch.float32)
                if "target_mask" in samples[0] else torch.ones(target.shape, device=device))
        padding = -target.shape[1] % self.multiple
        if padding:
            target = torch.nn.functional.pad(target, (0, padding))
            mask = torch.nn.functional.pad(mask, (0, padding))
        decoder = torch.cat([torch.full_like(target[:, :1], self.start), target[:, :-1]], dim=1)
        return {"tokens": stack(samples, "tokens", device),
                "attn_mask": stack(samples, "keep", device, torch.bool),
                "decoder_tokens": decoder, "targets": target, "loss_mask": mask}

    def loss_sum(self, output: torch.Tensor, batch: dict[str, torch.Tensor], axis: Axis
                 ) -> torch.Tensor:
        return parallel_lm_loss(output, batch["targets"], axis, self.vocab_size,
                                batch["loss_mask"])

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["loss_mask"].sum().item())
