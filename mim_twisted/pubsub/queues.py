"""The PubSub request worker pool: bounded DeferredQueues, one worker each.

A request goes to the queue chosen by a stable hash of its (service, node), so the requests for
one node run one after another in arrival order and never race in the database, while other
nodes' requests run concurrently on the other workers. A queue that is full refuses the request
at once (`QueueFull`), which the protocol layer answers with <wait/><resource-constraint/>:
overload turns into back pressure instead of unbounded memory.

A `Grouped` job is run together with the jobs of its group waiting right behind it (up to
`MAX_GROUP`): while one node's publication waits for its transaction, those that arrive queue up,
and the next turn stores them all in one (group commit) instead of one transaction each.
"""

import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mim_twisted.inflight import InFlight

log = Logger()

Job = Callable[[], Awaitable[object]]

# The most jobs of one group a worker takes at once: a bound on one transaction's size and on
# how long the first request of a group waits for the last one's work.
MAX_GROUP = 32


@dataclass(frozen=True)
class Grouped:
    """A job that may run with the jobs of the same ``group`` waiting right behind it in its
    queue: ``run`` is called once with their ``request``s, in queue order, and yields an outcome
    for each in that order, an Exception failing that one request. Each request is answered
    as its outcome is yielded, before ``run`` goes on; if ``run`` raises, the requests not
    answered yet fail with that error."""

    group: Hashable
    request: Any
    run: Callable[[list[Any]], AsyncIterator[object]]


class QueueFull(Exception):
    """The request's queue holds `max_queue_length` requests already."""


class WorkerPool:
    def __init__(self, workers: int, max_queue_length: int) -> None:
        self.queues = [
            defer.DeferredQueue(size=max_queue_length, backlog=1) for _ in range(workers)
        ]
        self._workers: list[defer.Deferred] = []
        self._stopping = object()
        self.stopped = False
        # Set when the server begins to stop: clients' requests are refused (the protocol layer
        # asks), while the server's own work (offline purges, access rechecks) still runs.
        self.refusing_requests = False
        self._jobs = InFlight()

    def queue_index(self, service: str, node: str) -> int:
        """Stable across processes (unlike hash()), so a node keeps its queue."""
        return zlib.crc32(f"{service}\0{node}".encode()) % len(self.queues)

    def submit(self, service: str, node: str, job: Job | Grouped) -> defer.Deferred:
        """Queue `job` for the node; fires with its result once a worker has run it.

        Raises QueueFull synchronously when the node's queue is full, or the pool is stopping.
        """
        if self.stopped:
            # Behind the stop marker it would never run: refused like a full queue (<wait/>).
            raise QueueFull(f"{service} is stopping")
        done: defer.Deferred = defer.Deferred()
        # Fired after `done` and whatever its callbacks do (send the answer): see `_work`.
        handled: defer.Deferred = defer.Deferred()
        try:
            self.queues[self.queue_index(service, node)].put((job, done, handled))
        except defer.QueueOverflow:
            raise QueueFull(f"queue for {service} {node!r} is full") from None
        self._jobs.track(handled)
        return done

    def refuse_requests(self) -> defer.Deferred:
        """Clients' requests are refused from now on; fires once every job queued so far, and
        any queued meanwhile, has run and its answer has been sent (the workers go on)."""
        self.refusing_requests = True
        return self._jobs.idle()

    def pending(self) -> list[int]:
        """How many requests wait in each queue (for metrics and tests)."""
        return [len(q.pending) for q in self.queues]

    def start(self) -> None:
        self._workers = [defer.ensureDeferred(self._work(q)) for q in self.queues]

    def stop(self) -> defer.Deferred:
        """Let the workers finish what is queued, then end them; new requests are refused."""
        self.stopped = True
        for queue in self.queues:
            queue.size = None  # the stop marker must fit even in a full queue
            queue.put(self._stopping)
        return defer.DeferredList(self._workers)

    async def _work(self, queue: defer.DeferredQueue) -> None:
        while True:
            entry = await queue.get()
            if entry is self._stopping:
                return
            job, done, handled = entry
            if isinstance(job, Grouped):
                await self._run_group(queue, entry)
                continue
            try:
                result = await job()
            except Exception:
                done.errback()
            else:
                done.callback(result)
            handled.callback(None)

    async def _run_group(self, queue: defer.DeferredQueue, first: tuple) -> None:
        group = first[0].group
        entries = [first]
        while (
            len(entries) < MAX_GROUP
            and queue.pending
            and queue.pending[0] is not self._stopping
            and isinstance(queue.pending[0][0], Grouped)
            and queue.pending[0][0].group == group
        ):
            entries.append(queue.pending.pop(0))
        outcomes = first[0].run([job.request for job, _, _ in entries])
        failed: Failure | None = None
        for _, done, handled in entries:
            if failed is None:
                try:
                    outcome = await anext(outcomes)
                except Exception:
                    failed = Failure()
            if failed is not None:
                done.errback(failed)
            elif isinstance(outcome, Exception):
                done.errback(Failure(outcome))
            else:
                done.callback(outcome)
            handled.callback(None)
