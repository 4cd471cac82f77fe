"""Token ids -> completion text, incrementally, with stop strings matched across tokens.

Owns `TextStream`: it decodes only a short window of recent tokens per step (so a long
completion costs linear time), holds back an incomplete UTF-8 character, finds stop strings
however the tokens split them, cuts the text at the first stop, and never releases text that
could still turn out to be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

WINDOW = 4
"""Tokens decoded before the new ones, so tokenizers that treat a leading space specially
decode the new text as they would in context."""


class Detokenizer(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class TextStream:
    """The text of one completion as its tokens arrive."""

    def __init__(self, tokenizer: Detokenizer, prompt_ids: Sequence[int], stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.stop = list(stop)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.prefix = max(len(self.ids) - WINDOW, 0)
        self.read = len(self.ids)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now safe to stream (possibly "")."""
        self.ids.append(token_id)
        self._extend(final=False)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """No more tokens: release everything still held back."""
        self._extend(final=True)
        return self._release(final=True)

    def _extend(self, final: bool) -> None:
        if self.stopped or len(self.ids) == self.read:
            return
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if not final and (after.endswith("\ufffd") or not after.startswith(before)):
            return  # an incomplete character: wait for its remaining bytes
        searched_to = len(self.text)
        self.text += after[len(before):] if after.startswith(before) else after
        self.read = len(self.ids)
        self.prefix = max(self.read - WINDOW, self.prefix)
        if self.stop:
            self._find_stop(max(searched_to - self.longest_stop + 1, 0))

    def _find_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        for size in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            suffix = self.text[-size:]
            if any(s.startswith(suffix) for s in self.stop):
                return size
        return 0
