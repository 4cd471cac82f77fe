"""The inference engine: KV-cached prefill and decode with step-level continuous batching.

Owns `Engine` and the request/result types. A request becomes `n` sequences; each `step()`
admits waiting sequences into free cache slots (prefill, grouped by prompt length so a group
is one batched forward with plain causal attention), advances every running sequence by one
token (one batched decode forward with a per-row key mask, since rows sit at different
lengths), and retires finished or cancelled ones, so requests join and leave the batch at
every step. `generate()` is the blocking loop over `step()`; the HTTP server drives `step()`
itself. Sampling lives in `megaloom.infer.sampling`, text and stop strings in
`megaloom.infer.stop`, the caches and the family's forward calls in `megaloom.infer.runners`
(a decoder-only prompt is prefilled into the cache; an encoder-decoder's prompt is encoded and
its decoder starts from the start token).
"""

from __future__ import annotations

import copy
import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from megaloom.infer.head import LogitsHead, PackedHead, packing_supported
from megaloom.infer.params import SamplingError, SamplingParams
from megaloom.infer.runners import make_runner
from megaloom.infer.sampling import BatchSampler, StepSample, token_logprobs
from megaloom.infer.stop import TextStream
from megaloom.model.gpt import GPT
from megaloom.model.registry import family_of


@dataclass
class TokenLogprob:
    """Log-probability of one token under the model, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """Something that happened to one draft during a step: a new token (with the text it made
    safe to show, possibly ""), and on its last event the finish reason."""

    request_id: str
    index: int
    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


@dataclass
class Request:
    """A prompt (text, or token ids used exactly as given) and how to continue it.
    `on_event` is called with every `Event` of this request as it happens (streaming)."""

    prompt: str | Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    on_event: Callable[[Event], None] | None = None


@dataclass
class Completion:
    """One draft. `finish_reason` is "stop", "length" or "cancelled" once finished;
    `text` is None without a tokenizer; `token_ids` include a stop token when one ended it."""

    index: int
    text: str | None = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """Everything about one request; filled in as it runs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[Completion]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    @property
    def latency_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


class RequestHandle:
    """What `add_request` returns: the live output and a way to cancel."""

    def __init__(self, engine: Engine, output: RequestOutput):
        self._engine = engine
        self.output = output

    @property
    def request_id(self) -> str:
        return self.output.request_id

    @property
    def finished(self) -> bool:
        return self.output.finished

    def cancel(self) -> None:
        self._engine.cancel(self.request_id)


class _Sequence:
    """One draft in flight: its tokens, sampling state and cache slot. `number` is unique for
    the life of the process (unlike `id()`, which a new object may reuse)."""

    _numbers = itertools.count()

    def __init__(self, output: RequestOutput, index: int, request: Request,
                 stream: TextStream | None, generator: torch.Generator | None,
                 stop_ids: frozenset[int], offset: int):
        self.output = output
        self.completion = output.completions[index]
        self.params = output.params
        self.prompt_ids = output.prompt_token_ids
        self.output_ids = self.completion.token_ids
        self.on_event = request.on_event
        self.stream = stream
        self.generator = generator
        self.stop_ids = stop_ids
        self.offset = offset  # decoder positions before the first generated token
        self.slot = -1
        self.cancelled = False
        self.number = next(self._numbers)

    @property
    def length(self) -> int:
        """Decoder positions so far (the cache length once the last token is fed back)."""
        return self.offset + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.completion.finish_reason is not None


class Engine:
    """Batched, KV-cached generation on one `GPT` (either flavour) or `T5`, on any device.

    `max_batch_size` is the number of cache slots (sequences decoded together); prompts plus
    completions are limited to the model's `seq_len` (T5: prompts to `seq_len`, completions
    to `decoder_seq_len`). `tokenizer` (anything with `encode`,
    `decode` and optionally `eod_id`) is needed for text prompts, text output and stop strings.
    `packed_head` (default: on CPU where the torch build can) applies the output head with
    `megaloom.infer.head.PackedHead`: prepacked weights, and on CPUs with native bf16 a
    screened exact greedy path, at the cost of a copy of the head; build a new engine after
    changing the model's weights. Not thread-safe: call `add_request`, `cancel` and
    `step` from one thread (an asyncio server runs `step` in a worker and serialises them).
    """

    def __init__(self, model: GPT, tokenizer: object | None = None, max_batch_size: int = 8,
                 packed_head: bool | None = None):
        if max_batch_size < 1:
            raise SamplingError(f"invalid max_batch_size={max_batch_size}: must be >= 1")
        if not family_of(model.config).generates:
            raise SamplingError(f"model.arch={model.config.arch} is an encoder: it fills in "
                                "masked tokens and scores texts but cannot generate")
        if model.config.num_labels:
            raise SamplingError(f"this model is a sequence classifier ({model.config.num_labels}"
                                " labels): it scores texts and cannot generate; use "
                                "`megaloom finetune --task classify` metrics or convert it")
        model.eval()
        param = next(model.parameters())
        config = model.config
        lm_head = getattr(model, "lm_head", None)
        can_pack = (isinstance(lm_head, nn.Linear) and lm_head.bias is None
                    and packing_supported(lm_head.weight))
        if packed_head is None:
            packed_head = can_pack
        elif packed_head and not can_pack:
            raise SamplingError("packed_head needs a bias-free nn.Linear output head on CPU in "
                                "fp32 (or bf16 where the CPU has bf16 kernels), and a torch "
                                "build with oneDNN")
        if packed_head:
            with torch.no_grad():
                self.head = PackedHead(lm_head, config.vocab_size, max_batch_size)
            self.model = copy.copy(model)  # the same model, returning final hidden states
            self.model._modules = {**model._modules, "lm_head": None}
        else:
            self.head = LogitsHead(config.vocab_size)
            self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = config.vocab_size
        self.device = param.device
        self.slots = max_batch_size
        self.eod_id = getattr(tokenizer, "eod_id", None) if tokenizer is not None else None
        with torch.inference_mode():
            self.runner = make_runner(self.model, max_batch_size, param.dtype, self.device)
            self.max_len = self.runner.max_len
            self._rows = torch.arange(max_batch_size, device=self.device)
            self._tokens = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
            self._positions = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
            self._valid = torch.zeros(max_batch_size, self.max_len, dtype=torch.bool,
                                      device=self.device)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self._outputs: dict[str, RequestOutput] = {}
        self._sampler_key: tuple[int, ...] = ()
        self._sampler: BatchSampler | None = None

    # ------------------------------------------------------------------ requests

    def add_request(self, request: Request) -> RequestHandle:
        """Validate and queue a request; it joins the batch at the next `step()`."""
        params = request.params.validate().for_vocabulary(self.vocab_size)
        prompt_ids = self._prompt_ids(request.prompt)
        if params.echo and self.runner.offset(len(prompt_ids)) != len(prompt_ids):
            raise SamplingError("echo (prompt log-probabilities) needs a decoder-only model; "
                                "an encoder-decoder's prompt is its source, not its output")
        if params.stop and self.tokenizer is None:
            raise SamplingError("stop strings need a tokenizer")
        request_id = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        if request_id in self._outputs:
            raise SamplingError(f"request id {request_id!r} is already in use")
        output = RequestOutput(
            request_id=request_id,
            prompt=request.prompt if isinstance(request.prompt, str) else None,
            prompt_token_ids=prompt_ids,
            params=params,
            completions=[Completion(index=i, text="" if self.tokenizer else None,
                                    logprobs=[] if params.logprobs is not None else None)
                         for i in range(params.n)],
            arrival_time=time.perf_counter(),
        )
        stop_ids = set(params.stop_token_ids)
        if self.eod_id is not None and not params.ignore_eos:
            stop_ids.add(int(self.eod_id))
        for i in range(params.n):
            stream = (TextStream(self.tokenizer, prompt_ids, params.stop)
                      if self.tokenizer is not None else None)
            self.waiting.append(_Sequence(output, i, request, stream,
                                          self._generator(params, i), frozenset(stop_ids),
                                          self.runner.offset(len(prompt_ids))))
        self._outputs[request_id] = output
        return RequestHandle(self, output)

    def cancel(self, request_id: str) -> None:
        """Stop a request; its drafts finish with reason "cancelled" at the next step."""
        for seq in itertools.chain(self.waiting, self.running):
            if seq.output.request_id == request_id:
                seq.cancelled = True

    def abort_all(self) -> None:
        """Drop every waiting and running request (after a failed `step()`): the engine is
        empty again and takes new requests."""
        self.waiting.clear()
        self.running.clear()
        self._outputs.clear()
        self._sampler_key, self._sampler = (), None

    def room(self, prompt_len: int) -> int:
        """How many tokens a prompt of `prompt_len` tokens leaves to generate (<= 0: none,
        or a prompt longer than the model reads)."""
        if prompt_len > self.runner.max_prompt:
            return 0
        return self.max_len - self.runner.offset(prompt_len)

    def prompt_budget(self, new_tokens: int) -> int:
        """The longest prompt that leaves room for `new_tokens` new ones (0: none does)."""
        return next((n for n in range(self.runner.max_prompt, 0, -1)
                     if self.room(n) >= new_tokens), 0)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(self, requests: Iterable[Request], progress: bool = False
                 ) -> list[RequestOutput]:
        """Run requests to completion (continuous batching) and return their outputs in order."""
        handles: list[RequestHandle] = []
        try:
            for request in requests:
                handles.append(self.add_request(request))
        except Exception:
            for handle in handles:
                handle.cancel()
            self.step()
            raise
        with tqdm(total=len(handles), disable=not progress, desc="generate",
                  unit="prompt") as bar:
            while not all(h.finished for h in handles):
                self.step()
                bar.n = sum(h.finished for h in handles)
                bar.refresh()
        return [h.output for h in handles]

    # ------------------------------------------------------------------ scheduling

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting sequences, advance every running one by a token, retire finished ones."""
        events: list[Event] = []
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled", "", events)
        for seq in self.running:
            if seq.cancelled and not seq.finished:
                self._finish(seq, "cancelled", "", events)
        self._retire()
        if self.running:
            self._decode(events)
        admitted = self._admit()
        if admitted:
            self._prefill(admitted, events)
        self._retire()
        return events

    def _admit(self) -> list[_Sequence]:
        free = self.slots - len(self.running)
        admitted = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        admitted.sort(key=lambda s: len(s.prompt_ids))
        for seq in admitted:
            seq.slot = len(self.running)
            self.running.append(seq)
        return admitted

    def _retire(self) -> None:
        for seq in sorted((s for s in self.running if s.finished), key=lambda s: -s.slot):
            last = self.running.pop()
            if last is not seq:
                self.running[seq.slot] = last
                self._move(last.slot, seq.slot, last.length)
                last.slot = seq.slot
        for request_id in [r for r, o in self._outputs.items() if o.finished]:
            del self._outputs[request_id]

    def _move(self, src: int, dst: int, length: int) -> None:
        self.runner.move(src, dst, length)
        self._tokens[dst] = self._tokens[src]
        self._positions[dst] = self._positions[src]
        self._valid[dst] = self._valid[src]

    # ------------------------------------------------------------------ forward passes

    def _prefill(self, seqs: list[_Sequence], events: list[Event]) -> None:
        for _, group_iter in itertools.groupby(seqs, key=lambda s: len(s.prompt_ids)):
            group = list(group_iter)
            start, length = group[0].slot, group[0].length
            tokens = torch.tensor([s.prompt_ids for s in group], device=self.device)
            echo = any(s.params.echo and s.output.prompt_logprobs is None for s in group)
            out = self.runner.prefill(tokens, start, keep_last=0 if echo else 1)
            rows = slice(start, start + len(group))
            self._valid[rows] = False
            self._valid[rows, :length] = True
            self._positions[rows] = length
            if echo:
                self._record_prompt_logprobs(group, tokens, self.head.logits(out))
            self._sample(group, out[:, -1], rows, events)

    def _decode(self, events: list[Event]) -> None:
        batch = len(self.running)
        positions = self._positions[:batch]
        self._valid[self._rows[:batch], positions] = True
        kv_len = max(s.length for s in self.running)
        out = self.runner.decode(self._tokens[:batch], positions, self._valid[:batch, :kv_len])
        positions += 1
        self._sample(self.running, out[:, -1], slice(0, batch), events)

    def _sample(self, seqs: list[_Sequence], out: torch.Tensor, rows: slice,
                events: list[Event]) -> None:
        """Choose the next token of each sequence from the model's output at its last
        position (logits, or final hidden states when the engine applies the head)."""
        key = tuple(s.number for s in seqs)  # never id(): a finished draft's id is reused
        if key != self._sampler_key:
            self._sampler_key = key
            self._sampler = BatchSampler([s.params for s in seqs], [s.generator for s in seqs],
                                         self.vocab_size, self.device)
        if self._sampler.argmax_only:
            sample = StepSample(self.head.greedy(out).tolist())
        else:
            sample = self._sampler.sample(self.head.logits(out), [s.prompt_ids for s in seqs],
                                          [s.output_ids for s in seqs])
        self._tokens[rows] = torch.tensor(sample.tokens, device=self.device)
        now = time.perf_counter()
        for i, seq in enumerate(seqs):
            logprob = None
            if sample.logprobs is not None and seq.params.logprobs is not None:
                logprob = TokenLogprob(sample.tokens[i], sample.logprobs[i],
                                       sample.top_logprobs[i][: seq.params.logprobs])
            self._accept(seq, sample.tokens[i], logprob, events)
            if seq.output.first_token_time is None:
                seq.output.first_token_time = now

    def _record_prompt_logprobs(self, group: list[_Sequence], tokens: torch.Tensor,
                                logits: torch.Tensor) -> None:
        k = max(s.params.logprobs or 0 for s in group)
        for row, seq in enumerate(group):
            if not seq.params.echo or seq.output.prompt_logprobs is not None:
                continue
            targets = tokens[row, 1:]
            picked, top = token_logprobs(logits[row, :-1, : self.vocab_size], targets, k)
            entries: list[TokenLogprob | None] = [None]
            for token, lp, alts in zip(targets.tolist(), picked, top, strict=True):
                entries.append(TokenLogprob(token, lp, alts[: seq.params.logprobs or 0]))
            seq.output.prompt_logprobs = entries

    # ------------------------------------------------------------------ bookkeeping

    def _accept(self, seq: _Sequence, token: int, logprob: TokenLogprob | None,
                events: list[Event]) -> None:
        if seq.finished:
            return
        if seq.params.max_tokens == 0:
            self._finish(seq, "length", "", events)
            return
        seq.output_ids.append(token)
        if seq.completion.logprobs is not None:
            seq.completion.logprobs.append(logprob)
        if token in seq.stop_ids:
            self._finish(seq, "stop", "", events, token, logprob)
            return
        text = seq.stream.add(token) if seq.stream is not None else ""
        if seq.stream is not None and seq.stream.stopped:
            self._finish(seq, "stop", text, events, token, logprob)
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.length >= self.max_len:
            self._finish(seq, "length", text, events, token, logprob)
        else:
            self._emit(seq, Event(seq.output.request_id, seq.completion.index, token, text,
                                  logprob), events)

    def _finish(self, seq: _Sequence, reason: str, text: str, events: list[Event],
                token: int | None = None, logprob: TokenLogprob | None = None) -> None:
        if seq.stream is not None:
            text += seq.stream.finish()
        seq.completion.finish_reason = reason
        if seq.output.finished:
            seq.output.finish_time = time.perf_counter()
        self._emit(seq, Event(seq.output.request_id, seq.completion.index, token, text,
                              logprob, reason), events)

    def _emit(self, seq: _Sequence, event: Event, events: list[Event]) -> None:
        if seq.completion.text is not None:
            seq.completion.text += event.text
        events.append(event)
        if seq.on_event is not None:
            seq.on_event(event)

    # ------------------------------------------------------------------ helpers

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise SamplingError("text prompts need a tokenizer; pass token ids instead")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise SamplingError(f"prompt token id {bad[0]} is outside the vocabulary "
                                    f"[0, {self.vocab_size})")
        if not ids:
            raise SamplingError("empty prompt: give at least one token of text")
        if len(ids) > self.runner.max_prompt:
            raise SamplingError(f"prompt is {len(ids)} tokens, longer than the model's context "
                                f"of {self.runner.max_prompt}")
        return ids

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.greedy:
            return None
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed + index)
        return generator
