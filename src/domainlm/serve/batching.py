"""The queue every protocol of `domainlm serve` submits to, and the two threads behind it.

The event loop parses and checks requests, submits a `Job` (texts, pairs) and awaits its future; it also builds
each protocol's answer from the probabilities. Behind the queue:
- the gatherer takes the first waiting job, gathers more for up to --max-wait-ms or a model batch's worth of texts,
  tokenizes them in one call and asks the runtime for its batches (`Runtime.plan`: the one batching rule of
  predict, evaluate and serve, within the runtime's rows and token budget);
- the model thread only runs those batches (`Runtime.run`) and hands each job its rows of probabilities back to
  the event loop (`loop.call_soon_threadsafe`, one wake-up per gathering).
While the model runs one gathering, the gatherer prepares the next, so that a GPU is not waiting on the host.
When --queue-size requests already wait, a new one is refused at once (503) instead of waiting longer and longer.
No exception of a request escapes its answer, so one bad batch never stops the server.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from domainlm.classify.runtime import CPU_ROWS, ClassifierRuntime, Plan, Runtime
from domainlm.serve.config import ServeConfig
from domainlm.serve.metrics import ServerMetrics
from domainlm.serve.requests import BadRequest


@dataclass
class Job:
    texts: list[str]
    pairs: list[str] | None
    strict: bool  # a text over the model's length is refused (413), not cut
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class Gathering:
    """Jobs prepared for the model: their encoded texts cut into the runtime's batches (token models)."""

    jobs: list[Job]
    plan: Plan | None = None
    sizes: list[int] = field(default_factory=list)


class Batcher:
    def __init__(self, runtime: ClassifierRuntime, cfg: ServeConfig, metrics: ServerMetrics | None = None):
        self.runtime, self.cfg, self.metrics = runtime, cfg, metrics
        self.tokens = isinstance(runtime, Runtime)
        # texts gathered at most: one model batch's worth of rows, as the runtime counts them
        self.rows = runtime.batch_limits(cfg.max_batch)[0] if self.tokens else cfg.max_batch or CPU_ROWS
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self.ready: queue.Queue = queue.Queue(maxsize=1)  # one gathering prepared while the model runs the last
        self.stopping = threading.Event()
        self.gatherer = threading.Thread(target=self._gather_loop, name="domainlm-gatherer", daemon=True)
        self.worker = threading.Thread(target=self._model_loop, name="domainlm-model", daemon=True)

    @property
    def alive(self) -> bool:
        return self.gatherer.is_alive() and self.worker.is_alive()

    def start(self) -> None:
        self.gatherer.start()
        self.worker.start()

    def stop(self) -> None:
        self.stopping.set()
        self.gatherer.join(timeout=5)
        self.worker.join(timeout=5)

    def submit(self, job: Job) -> bool:
        try:
            self.queue.put_nowait(job)
            return True
        except queue.Full:
            return False

    # ---- the gatherer -------------------------------------------------------------------------------------------

    def _gather_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = self._gather(first)
            try:
                gathering = self._prepare(jobs)
            except Exception as e:  # noqa: BLE001 - answered as 500, the server goes on
                settle(jobs, error=e)
                continue
            while gathering.jobs and not self.stopping.is_set():
                try:
                    self.ready.put(gathering, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _gather(self, first: Job) -> list[Job]:
        jobs, n = [first], len(first.texts)
        if not self.cfg.batching:
            return jobs
        deadline = time.perf_counter() + self.cfg.max_wait_ms / 1000
        while n < self.rows:
            left = deadline - time.perf_counter()
            try:
                job = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            n += len(job.texts)
        return jobs

    def _prepare(self, jobs: list[Job]) -> Gathering:
        """Token models: the jobs' texts encoded (one tokenizer call per kind of job), a job with a text over the
        model's length answered at once if it asked not to cut, the rest planned into the runtime's batches."""
        if not self.tokens:
            return Gathering(jobs)
        rt: Runtime = self.runtime  # type: ignore[assignment]
        features: list[list] = [[None] * len(job.texts) for job in jobs]
        for strict in (False, True):
            subset = [i for i, job in enumerate(jobs) if job.strict == strict]
            for where, texts, pairs in _by_pairing([jobs[i] for i in subset]):
                # asked not to cut: one token more than the model takes tells a text that is too long
                encoded = rt.encode(texts, pairs, rt.max_seq_len + 1 if strict else None)
                for (k, row), f in zip(where, encoded):
                    features[subset[k]][row] = f
        kept, refused = [], []
        for job, rows in zip(jobs, features):
            too_long = [i for i, f in enumerate(rows) if len(f["input_ids"]) > rt.max_seq_len] if job.strict else []
            if too_long:
                i = too_long[0]
                refused.append(
                    (
                        job,
                        BadRequest(
                            413,
                            f"inputs[{i}] has more than {rt.max_seq_len} tokens, the "
                            'model\'s length; send "truncate": true to cut it',
                        ),
                    )
                )
            else:
                kept.append((job, rows))
        for job, error in refused:
            settle([job], error=error)
        if not kept:
            return Gathering([])
        flat = [f for _, rows in kept for f in rows]
        plan = rt.plan(flat, self.cfg.max_batch)
        return Gathering([job for job, _ in kept], plan, [len(r) for r in plan.rows])

    # ---- the model thread ---------------------------------------------------------------------------------------

    def _model_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                gathering = self.ready.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._run(gathering)
            except Exception as e:  # noqa: BLE001 - answered as 500, the worker goes on
                settle(gathering.jobs, error=e)

    def _run(self, gathering: Gathering) -> None:
        started = time.perf_counter()
        jobs, rt = gathering.jobs, self.runtime
        if gathering.plan is not None:
            probs = rt.run(gathering.plan)  # type: ignore[attr-defined]
            sizes, tokens = gathering.sizes, gathering.plan.tokens
        else:  # any other kind (the linear floor): its own predict, once per kind of job
            probs = np.empty((sum(len(job.texts) for job in jobs), len(rt.labels)), dtype=np.float32)
            sizes, tokens = [], []
            offsets = np.cumsum([0] + [len(job.texts) for job in jobs])
            for where, texts, pairs in _by_pairing(jobs):
                probs[[offsets[i] + r for i, r in where]] = rt.predict(texts, pairs)
                sizes.append(len(texts))
        if self.metrics is not None:
            self.metrics.ran(len(probs), sizes, tokens, len(jobs), time.perf_counter() - started)
        results, start = [], 0
        for job in jobs:
            results.append(probs[start : start + len(job.texts)])
            start += len(job.texts)
        settle(jobs, results)


def _by_pairing(jobs: list[Job]):
    """((job index, row) of each text, texts, pairs or None) of the jobs without a text pair, then of those with
    one: one tokenizer call each (a fast tokenizer's call has a fixed cost that a call per request repeats)."""
    for paired in (False, True):
        where, texts, pairs = [], [], []
        for i, job in enumerate(jobs):
            if (job.pairs is not None) == paired:
                where += [(i, r) for r in range(len(job.texts))]
                texts += job.texts
                pairs += job.pairs or []
        if texts:
            yield where, texts, pairs if paired else None


def settle(jobs: list[Job], results: list | None = None, error: BaseException | None = None) -> None:
    """Settle the futures of jobs with one wake-up of the event loop (a wake-up per request costs the loop, which
    parses the next requests meanwhile, a system call and a pass through its ready queue)."""

    def answer() -> None:
        for i, job in enumerate(jobs):
            if job.future.done():  # the client went away
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(results[i])

    if jobs:
        jobs[0].loop.call_soon_threadsafe(answer)
