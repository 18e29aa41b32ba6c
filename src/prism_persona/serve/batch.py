"""The single model worker of ``prism serve``: a bounded queue and dynamic batching.

HTTP handler threads :meth:`Batcher.submit` a :class:`Job` and wait on it; one worker thread takes
the first queued job, collects more for up to ``max_wait_s`` (or until ``max_batch``), groups them by
their ``key`` (requests with different sampling parameters are never mixed in one call), and hands
each group to ``process(jobs)``, which fills in ``job.result`` (or ``job.error``). An exception in
``process`` becomes the error of every job of that group that has no result yet; the worker keeps
running. A full queue is refused at once (the caller answers 429), never waited on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The request queue is at capacity."""


class Stopped(Exception):
    """The batcher is shutting down and takes no new jobs."""


@dataclass(eq=False)
class Job:
    """One request waiting for the model worker."""

    payload: Any
    key: Any = None
    result: Any = None
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)
    info: dict = field(default_factory=dict)

    def wait(self, timeout: Optional[float]) -> bool:
        return self.done.wait(timeout)


class Batcher:
    """One worker thread; ``process(jobs)`` is called with up to ``max_batch`` jobs sharing a key."""

    def __init__(
        self,
        process: Callable[[list], None],
        max_batch: int = 8,
        max_wait_s: float = 0.01,
        queue_size: int = 64,
        name: str = "prism-worker",
    ):
        self.process = process
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self.batch_sizes: list[int] = []
        self._stop = threading.Event()
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        return self.queue.qsize()

    def submit(self, job: Job) -> Job:
        """Queue ``job`` or raise :class:`QueueFull` / :class:`Stopped` immediately."""
        if not self._accepting:
            raise Stopped()
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new jobs, finish the queued ones, then end the worker thread."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while not self.queue.empty() and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            job.error = Stopped()
            job.done.set()

    def _collect(self) -> list:
        try:
            first = self.queue.get(timeout=0.05)
        except queue.Empty:
            return []
        jobs = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                jobs.append(self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _loop(self) -> None:
        while not self._stop.is_set():
            jobs = self._collect()
            if not jobs:
                continue
            groups: dict = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, group: list) -> None:
        self.batch_sizes.append(len(group))
        try:
            self.process(group)
        except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
            log.exception("model worker: a batch of %d failed", len(group))
            for job in group:
                if job.result is None and job.error is None:
                    job.error = exc
        finally:
            for job in group:
                if job.result is None and job.error is None:
                    job.error = RuntimeError("the model worker returned no result for this request")
                job.done.set()
