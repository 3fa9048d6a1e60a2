"""Continuous batching: one thread owns the engine and runs it step by step; requests wait in a bounded queue.

Between two decode steps the thread takes the requests that arrived (up to `max_batch` rows in all), runs their
images through the vision tower in one call, prefills them as one batch and joins them to the running one, so a
new request starts at the next step rather than after the running answers end (the engine's rows are
independent: joining changes no answer). A finished or cancelled row leaves at the step that finishes it. With
`batching=False` one request runs at a time (the baseline bench/serve_load.py compares against).

Admission in a group: when nothing is running and a request is waiting while others are still being read and
checked by the HTTP handlers (`arriving`), the thread waits for them, at most `admit_wait` seconds, so that
requests sent together are prefilled together (one tower call, one prefill) instead of the first alone and the
rest a step later. Likewise right after a step finished the last n rows: until `admit_wait` after it, the thread
waits for up to n requests (clients that send their next request as soon as an answer ends come back together).
A request that arrives alone, at any other time, waits for nothing.

Each request's events reach its handler on the event loop: ("text", piece), then ("done", sequence) or
("error", ApiError).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from ..engine.core import Batch, Sequence
from .schema import ApiError


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Job:
    seq: Sequence
    image: Optional[object]  # PIL image, encoded by the vision tower on the engine thread
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed (server shutting down): nobody listens
            pass


class Scheduler:
    def __init__(self, answerer, max_batch: int = 16, max_queue: int = 64, batching: bool = True, admit_wait: float = 0.05):
        self.answerer = answerer
        self.engine = answerer.engine
        self.engine.trace_experts = bool(answerer.model.sparse_layers)  # the page shows them; cheap hooks per step
        self.max_batch = max_batch if batching else 1
        self.max_queue = max_queue
        self.admit_wait = admit_wait
        self.incoming = 0  # requests whose handlers are reading and checking them (not yet submitted or refused)
        self.last_finished, self.finished_at = 0, 0.0  # rows finished by the step that emptied the batch, and when
        self.pending: deque[Job] = deque()
        self.jobs: dict[Sequence, Job] = {}  # running rows -> their requests
        self.running: Optional[Batch] = None
        self.cond = threading.Condition()
        self.stopping = False
        self.tasks: deque = deque()  # (function, future): other model work (relevancy maps), run between steps
        self.thread = threading.Thread(target=self._loop, name="llava-gm-engine", daemon=True)

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    # ---- called from the event loop ------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise QueueFull()
            self.pending.append(job)
            self.cond.notify()

    @contextlib.contextmanager
    def arriving(self):
        """Around a request handler's reading, checking and `submit`: the engine thread knows more may come."""
        with self.cond:
            self.incoming += 1
        try:
            yield
        finally:
            with self.cond:
                self.incoming -= 1
                self.cond.notify()

    def run_exclusive(self, fn) -> concurrent.futures.Future:
        """Run fn() on the engine thread between two decode steps (it may use the model freely: sparse layers'
        masks, gradients); its result or exception comes back through the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            self.tasks.append((fn, future))
            self.cond.notify()
        return future

    def cancel(self, job: Job) -> None:
        """The client is gone: a waiting request leaves the queue now, a running one at the next step."""
        job.seq.cancelled = True
        with self.cond:
            if job in self.pending:  # never ran: it ends here (a grouped admission may hold a request ~50 ms)
                self.pending.remove(job)
                job.seq.finish_reason = "cancelled"

    def load(self) -> dict:
        return {"running": len(self.jobs), "queued": len(self.pending), "max_batch": self.max_batch, "max_queue": self.max_queue}

    # ---- the engine thread ---------------------------------------------------------------------
    def _admit(self) -> list[Job]:
        with self.cond:
            while self.running is None and not self.pending and not self.tasks and not self.stopping:
                self.cond.wait()
            room = self.max_batch - len(self.jobs)
            if self.running is None and self.pending and not self.tasks:  # gather the requests sent together
                now = time.monotonic()
                reading_until = now + self.admit_wait  # handlers still reading
                # rows that emptied the batch just now: their clients (8 clients in a loop) are likely sending again
                back, back_until = self.last_finished, self.finished_at + self.admit_wait
                while len(self.pending) < room and not self.stopping:
                    now = time.monotonic()
                    waits = [t for t, on in ((reading_until, self.incoming > 0), (back_until, len(self.pending) + self.incoming < back)) if on and t > now]
                    if not waits:
                        break
                    self.cond.wait(max(waits) - now)
            return [self.pending.popleft() for _ in range(min(room, len(self.pending)))]

    def _loop(self) -> None:
        while not self.stopping:
            while self.tasks:
                fn, future = self.tasks.popleft()
                try:
                    future.set_result(fn())
                except Exception as e:
                    future.set_exception(e)
            new = [job for job in self._admit() if not job.seq.cancelled]
            if new:
                self._prefill(new)
            if self.running is not None:
                self._step()

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        error = e if isinstance(e, ApiError) else ApiError(500, f"generation failed: {type(e).__name__}: {e}", None, "engine_error")
        for job in jobs:
            job.emit("error", error)
            self.jobs.pop(job.seq, None)

    def _encode(self, jobs: list[Job]) -> None:
        """The jobs' images through the vision tower in one call (one row per distinct image)."""
        keys = {}
        for job in jobs:
            if job.image is not None:
                keys.setdefault(job.seq.image_key if job.seq.image_key is not None else id(job), job.image)
        feats = self.answerer.image_features(list(keys.values()))
        by_key = dict(zip(keys, (feats[i] for i in range(len(keys)))))
        for job in jobs:
            if job.image is not None:
                job.seq.image = by_key[job.seq.image_key if job.seq.image_key is not None else id(job)]
                job.image = None

    def _prefill(self, jobs: list[Job]) -> None:
        try:
            self._encode(jobs)
            batch = self.engine.prefill([job.seq for job in jobs])
        except Exception as e:
            if len(jobs) > 1:  # a bad request slipped through the checks: it fails alone, the others go on
                for job in jobs:
                    self._prefill([job])
                return
            self._fail(jobs, e)
            return
        self.jobs.update((job.seq, job) for job in jobs)
        try:
            self.running = self.engine.join(self.running, batch)
        except Exception as e:
            self._fail(list(self.jobs.values()), e)
            self.running = None

    def _step(self) -> None:
        seqs = self.running.seqs
        try:
            self.running = self.engine.step(self.running)
        except Exception as e:  # nothing of this batch can go on
            self._fail([self.jobs[s] for s in seqs if s in self.jobs], e)
            self.running = None
            return
        for seq in seqs:
            job = self.jobs.get(seq)
            if job is None:
                continue
            piece = seq.take_text()
            if piece:
                job.emit("text", piece)
            if seq.finish_reason:
                job.emit("done", seq)
                del self.jobs[seq]
        if self.running is None:
            self.last_finished, self.finished_at = len(seqs), time.monotonic()
