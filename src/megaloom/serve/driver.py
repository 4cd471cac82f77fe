"""Continuous batching for the server: one thread drives the synchronous engine.

Owns `EngineDriver` and `Job`. The engine (`megaloom.infer.Engine`) is not thread-safe, so
every call into it (`add_request`, `cancel`, `step`) happens on the driver thread. Between
two decode steps the thread admits newly submitted requests and applies cancellations, so
requests join and leave the running batch at every step. Events go back to the asyncio side
through `loop.call_soon_threadsafe` into the `Job` of the HTTP request that asked for them.

Capacity is counted in sequences (a prompt with `n` drafts is `n` sequences): at most
`max_batch_size` run and `max_queue` wait; a submission that does not fit is refused with
`QueueFull` (HTTP 429). `stop()` refuses new work and lets in-flight requests finish. If a
step raises, the requests in that batch fail (HTTP 500) and the engine is emptied; the driver
keeps serving the requests that come after.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from megaloom.infer import Engine, Event, Request, RequestOutput, SamplingParams
from megaloom.serve.errors import APIError
from megaloom.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


class QueueFull(APIError):
    def __init__(self, retry_after: int):
        super().__init__(429, "the server is at capacity: too many requests are waiting; "
                         "retry later", code="queue_full",
                         headers={"Retry-After": str(retry_after)})


class DriverStopped(APIError):
    def __init__(self, reason: str):
        super().__init__(503, reason, code="engine_unavailable")


class JobTimeout(APIError):
    def __init__(self, seconds: float):
        super().__init__(504, f"generation did not finish within the server's timeout of "
                         f"{seconds:g} s", code="timeout")


@dataclass
class _PromptRun:
    """One engine request of a job (one prompt with its n drafts)."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    submitted: float = 0.0
    output: RequestOutput | None = None
    first_token: bool = False
    open_sequences: int = 0


@dataclass
class Job:
    """The generations of one HTTP request: one engine request per prompt, one event queue.

    `events()` yields `(prompt_index, Event)` as they happen until every draft finished;
    `outputs[i]` is the engine's `RequestOutput` of prompt `i` (complete once finished).
    """

    driver: EngineDriver
    runs: list[_PromptRun]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    remaining: int = 0
    cancelled: bool = False

    @property
    def outputs(self) -> list[RequestOutput | None]:
        return [s.output for s in self.runs]

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    async def events(self, timeout: float | None) -> AsyncIterator[tuple[int, Event]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.remaining:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                item = await asyncio.wait_for(self.queue.get(), wait)
            except asyncio.TimeoutError:
                self.cancel()
                raise JobTimeout(timeout) from None
            if isinstance(item, BaseException):
                self.remaining = 0
                raise item
            index, event = item
            if event.finish_reason is not None:
                self.remaining -= 1
            yield index, event

    async def wait(self, timeout: float | None) -> list[RequestOutput]:
        """Run to the end; return the finished outputs, one per prompt."""
        async for _ in self.events(timeout):
            pass
        return [s.output for s in self.runs]

    def cancel(self) -> None:
        """Stop every unfinished draft (client gone, timeout); idempotent."""
        if not self.cancelled and self.remaining:
            self.cancelled = True
            self.driver.cancel([s.request_id for s in self.runs])


class EngineDriver:
    """Runs `engine.step()` on a background thread while there is work."""

    def __init__(self, engine: Engine, max_queue: int = 64,
                 metrics: ServeMetrics | None = None):
        if max_queue < 0:
            raise ValueError(f"invalid max_queue={max_queue}: must be >= 0")
        self.engine = engine
        self.capacity = engine.slots + max_queue
        self.metrics = metrics or ServeMetrics()
        self._lock = threading.Condition()
        self._inbox: list[tuple[Job, int]] = []
        self._cancels: list[str] = []
        self._outstanding = 0  # sequences submitted and not finished
        self._stopping = False
        self._counter = 0
        self._jobs: dict[int, Job] = {}  # jobs with unfinished sequences, by id()
        self._outbox: list[tuple[Job, tuple[int, Event]]] = []  # this step's events
        self._thread = threading.Thread(target=self._run, name="megaloom-engine", daemon=True)

    # ------------------------------------------------------------------ asyncio side

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, prompts: Sequence[list[int]], params: SamplingParams) -> Job:
        """Queue one engine request per prompt (validated by the caller); all or nothing."""
        loop = asyncio.get_running_loop()
        sequences = len(prompts) * params.n
        with self._lock:
            if self._stopping:
                raise DriverStopped("the server is shutting down")
            if self._outstanding + sequences > self.capacity:
                if sequences > self.capacity:
                    raise APIError(400, f"the request asks for {sequences} sequences (prompts x "
                                   f"n) but the server holds at most {self.capacity}",
                                   param="n", code="too_many_sequences")
                raise QueueFull(retry_after=1)
            now = time.perf_counter()
            runs = []
            for ids in prompts:
                self._counter += 1
                runs.append(_PromptRun(list(ids), params, f"srv-{self._counter}", now,
                                   open_sequences=params.n))
            job = Job(self, runs, loop, remaining=sequences)
            self._outstanding += sequences
            self._jobs[id(job)] = job
            self._inbox.extend((job, i) for i in range(len(runs)))
            self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
            self._lock.notify()
        return job

    def cancel(self, request_ids: Sequence[str]) -> None:
        with self._lock:
            self._cancels.extend(request_ids)
            self._lock.notify()

    async def stop(self) -> None:
        """Refuse new work, finish what is in flight, join the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ driver thread

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while not (self._inbox or self._cancels or engine.has_unfinished()
                           or self._stopping):
                    self._lock.wait()
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                if self._stopping and not inbox and not engine.has_unfinished():
                    return
            for job, index in inbox:
                self._add(job, index)
            for request_id in cancels:
                engine.cancel(request_id)
            if not engine.has_unfinished():
                continue
            try:
                engine.step()
            except Exception as exc:  # a bug or a device failure: fail this batch, go on
                log.exception("engine step failed; the requests in flight fail")
                engine.abort_all()
                self._fail_in_flight(exc)
                continue
            self._flush()
            self.metrics.running.set(len(engine.running))
            self.metrics.queue_depth.set(len(engine.waiting))

    def _add(self, job: Job, index: int) -> None:
        run = job.runs[index]

        def on_event(event: Event) -> None:
            self._on_event(job, index, event)

        request = Request(run.prompt_ids, run.params, request_id=run.request_id,
                          on_event=on_event)
        try:
            run.output = self.engine.add_request(request).output
        except Exception as exc:  # validated before submission; this is a safety net
            log.exception("engine refused a request")
            self._release(job, run.open_sequences)
            run.open_sequences = 0
            error = APIError(400, str(exc), code="invalid_request")
            job.loop.call_soon_threadsafe(job.queue.put_nowait, error)

    def _on_event(self, job: Job, index: int, event: Event) -> None:
        run = job.runs[index]
        now = time.perf_counter()
        if event.token_id is not None:
            self.metrics.generation_tokens.inc()
            if not run.first_token:
                run.first_token = True
                self.metrics.ttft.observe(now - run.submitted)
        if event.finish_reason is not None:
            self.metrics.finished.labels(event.finish_reason).inc()
            run.open_sequences -= 1
            if run.open_sequences == 0:
                self.metrics.latency.observe(now - run.submitted)
            self._release(job, 1)
        self._outbox.append((job, (index, event)))

    def _flush(self) -> None:
        """Hand a step's events to the event loop in one wake-up per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, item in self._outbox:
            by_loop.setdefault(job.loop, []).append((job.queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _release(self, job: Job, sequences: int) -> None:
        with self._lock:
            self._outstanding -= sequences
            if not any(s.open_sequences for s in job.runs):
                self._jobs.pop(id(job), None)

    def _fail_in_flight(self, exc: BaseException) -> None:
        error = APIError(500, f"generation failed: {exc!r}", code="engine_error")
        with self._lock:
            self._outbox = []
            waiting = {id(job) for job, _ in self._inbox}  # submitted during the step: kept
            jobs = [job for key, job in self._jobs.items() if key not in waiting]
            for job in jobs:
                del self._jobs[id(job)]
                self._outstanding -= sum(s.open_sequences for s in job.runs)
                for run in job.runs:
                    run.open_sequences = 0
        for job in jobs:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, error)


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
