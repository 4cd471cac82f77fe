"""Chat messages -> prompt text: the tokenizer's own chat template, or megaloom's default.

Owns `ChatTemplate`, the one renderer `megaloom serve` (chat completions) and `megaloom
finetune --task sft` (training prompts) share, so a model is trained on the prompts it is
served. A Hugging Face checkpoint's `tokenizer_config.json` (beside
`tokenizer.json`) may carry a Jinja `chat_template`; it is rendered in Jinja's sandbox with
`messages`, `add_generation_prompt=True`, `bos_token` and `eos_token`, as `transformers`
does. Without one, `DEFAULT_TEMPLATE` writes each message as `Role: content` followed by a
blank line and ends with `Assistant:`, a plain-text layout base models continue sensibly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from megaloom.data.special_tokens import special_tokens, tokenizer_config
from megaloom.errors import MegaloomError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(MegaloomError):
    """The chat template refused the messages (its `raise_exception`, or a rendering error)."""


class ChatTemplate:
    def __init__(self, source: str = DEFAULT_TEMPLATE, bos_token: str | None = None,
                 eos_token: str | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.source = source
        self.is_default = source == DEFAULT_TEMPLATE
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = env.from_string(source)

    @classmethod
    def for_tokenizer(cls, tokenizer_path: str | Path | None, eos_token: str | None
                      ) -> ChatTemplate:
        """The template of `tokenizer_config.json` beside the tokenizer, else the default."""
        config = tokenizer_config(tokenizer_path)
        template = config.get("chat_template")
        tokens = special_tokens(tokenizer_path) if tokenizer_path is not None else {}
        bos = tokens.get("bos_token")
        eos = tokens.get("eos_token") or eos_token
        if isinstance(template, list):  # named templates: take "default"
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(template, str) and template.strip():
            return cls(template, bos, eos)
        return cls(DEFAULT_TEMPLATE, bos, eos)

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self.bos_token or "",
                                         eos_token=self.eos_token or "")
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused the messages: {exc}") from None


def _raise(message: str) -> None:
    raise TemplateError(message)
