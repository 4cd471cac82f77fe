"""Fill-in-the-blank with a masked-LM encoder (BERT): the likeliest tokens for each mask token
of a text, as Hugging Face's `fill-mask` pipeline ranks them (softmax over the real
vocabulary at the masked position, text framed `[CLS] text [SEP]`)."""

from __future__ import annotations

import torch

from megaloom.config import MaskedLMConfig
from megaloom.errors import DataError


@torch.inference_mode()
def fill_mask(model, tokenizer, text: str, top_k: int = 3,
              tokens: MaskedLMConfig | None = None) -> list[list[tuple[str, float]]]:
    """For every mask token in `text`, the `top_k` (token text, probability) pairs."""
    tokens = tokens or MaskedLMConfig()
    ids = [tokenizer.token_to_id(t) for t in (tokens.cls_token, tokens.sep_token,
                                              tokens.mask_token)]
    if None in ids:
        raise DataError(f"the tokenizer has no {tokens.mask_token}, {tokens.cls_token} or "
                        f"{tokens.sep_token} token, so it cannot frame a fill-mask query")
    cls, sep, mask = ids
    row = [cls, *tokenizer.encode(text), sep]
    positions = [i for i, token in enumerate(row) if token == mask]
    if not positions:
        raise DataError(f"{text!r} holds no {tokens.mask_token} token to fill")
    device = next(model.parameters()).device
    output = model(torch.tensor([row], device=device))
    logits = output[0] if isinstance(output, tuple) else output
    probs = logits[0, positions, :model.config.vocab_size].float().softmax(-1)
    best = probs.topk(top_k, dim=-1)
    return [[(tokenizer.decode([int(i)]), float(p)) for p, i in zip(values, indices, strict=True)]
            for values, indices in zip(best.values, best.indices, strict=True)]
