"""The PubSub worker pool: per-node order, concurrency across nodes, bounded queues."""

from twisted.internet import defer
from twisted.trial import unittest

from mim_twisted.pubsub.queues import MAX_GROUP, Grouped, QueueFull, WorkerPool


def node_on_queue(pool: WorkerPool, index: int, avoid: set[str] = frozenset()) -> str:
    """A node name whose requests land on queue `index`."""
    for n in range(10_000):
        name = f"node{n}"
        if name not in avoid and pool.queue_index("pubsub.localhost", name) == index:
            return name
    raise AssertionError("no such node name")


class WorkerPoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = WorkerPool(workers=2, max_queue_length=3)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.addCleanup(self.release_all)
        self.started: list[str] = []
        self.gates: dict[str, defer.Deferred] = {}

    def release_all(self) -> None:
        """Let every held job finish (each release may start the next queued job)."""
        while held := [g for g in self.gates.values() if not g.called]:
            for gate in held:
                gate.callback(None)

    def job(self, name: str):
        async def run() -> str:
            self.started.append(name)
            gate = self.gates[name] = defer.Deferred()
            await gate
            return name

        return run

    def test_queue_choice_is_stable(self) -> None:
        other = WorkerPool(workers=2, max_queue_length=3)
        for node in ("a", "b", "urn:xmpp:omemo:2:devices"):
            self.assertEqual(
                self.pool.queue_index("pubsub.localhost", node),
                other.queue_index("pubsub.localhost", node),
            )

    def test_one_nodes_requests_run_in_order(self) -> None:
        node = node_on_queue(self.pool, 0)
        first = self.pool.submit("pubsub.localhost", node, self.job("first"))
        second = self.pool.submit("pubsub.localhost", node, self.job("second"))
        self.assertEqual(self.started, ["first"])
        self.gates["first"].callback(None)
        self.assertEqual(self.successResultOf(first), "first")
        self.assertEqual(self.started, ["first", "second"])
        self.gates["second"].callback(None)
        self.assertEqual(self.successResultOf(second), "second")

    def test_other_queues_are_not_held_up(self) -> None:
        slow = node_on_queue(self.pool, 0)
        fast = node_on_queue(self.pool, 1)
        self.pool.submit("pubsub.localhost", slow, self.job("slow"))
        done = self.pool.submit("pubsub.localhost", fast, self.job("fast"))
        self.assertEqual(self.started, ["slow", "fast"])
        self.gates["fast"].callback(None)
        self.assertEqual(self.successResultOf(done), "fast")

    def test_full_queue_refuses_at_once(self) -> None:
        node = node_on_queue(self.pool, 0)
        self.pool.submit("pubsub.localhost", node, self.job("running"))
        for n in range(3):
            self.pool.submit("pubsub.localhost", node, self.job(f"waiting{n}"))
        self.assertEqual(self.pool.pending()[0], 3)
        self.assertRaises(QueueFull, self.pool.submit, "pubsub.localhost", node, self.job("x"))
        # The other queue still takes work.
        self.pool.submit("pubsub.localhost", node_on_queue(self.pool, 1), self.job("other"))
        self.assertIn("other", self.started)

    def test_a_failing_job_fails_its_request_only(self) -> None:
        node = node_on_queue(self.pool, 0)

        async def broken() -> None:
            raise ValueError("boom")

        failed = self.pool.submit("pubsub.localhost", node, broken)
        after = self.pool.submit("pubsub.localhost", node, self.job("after"))
        self.failureResultOf(failed, ValueError)
        self.gates["after"].callback(None)
        self.assertEqual(self.successResultOf(after), "after")

    def test_stop_finishes_queued_work(self) -> None:
        node = node_on_queue(self.pool, 0)
        done = self.pool.submit("pubsub.localhost", node, self.job("queued"))
        stopped = self.pool.stop()
        self.assertNoResult(stopped)
        self.gates["queued"].callback(None)
        self.successResultOf(done)
        self.successResultOf(stopped)

    def test_refusing_requests_waits_for_the_queued_ones_and_their_answers(self) -> None:
        node = node_on_queue(self.pool, 0)
        answered: list[str] = []
        for name in ("first", "second"):
            done = self.pool.submit("pubsub.localhost", node, self.job(name))
            done.addCallback(answered.append)  # as the protocol layer sends the answer
        drained = self.pool.refuse_requests()
        drained.addCallback(lambda _: list(answered))  # what was answered when it fired
        self.assertTrue(self.pool.refusing_requests)
        self.gates["first"].callback(None)
        self.assertNoResult(drained)
        # The workers go on: the server's own work is still taken.
        other_node = node_on_queue(self.pool, 1)
        purge = self.pool.submit("pubsub.localhost", other_node, self.job("purge"))
        self.gates["purge"].callback(None)
        self.assertEqual(self.successResultOf(purge), "purge")
        self.assertNoResult(drained)
        self.gates["second"].callback(None)
        self.assertEqual(self.successResultOf(drained), ["first", "second"])


class GroupedJobTests(unittest.TestCase):
    """Jobs of one group waiting together in a queue run with one call of their runner."""

    def setUp(self) -> None:
        self.pool = WorkerPool(workers=1, max_queue_length=100)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.calls: list[list[str]] = []
        self.gate: defer.Deferred | None = None
        self.answered: list[str] = []

    async def runner(self, requests: list[str]):
        self.calls.append(requests)
        if self.gate is not None:
            await self.gate
        for index, request in enumerate(requests):
            # Each is answered before the runner goes on to the next.
            self.assertEqual([r for r in requests if r in self.answered], requests[:index])
            if request.startswith("bad"):
                yield ValueError(request)
            elif request == "crash":
                raise RuntimeError("the whole group")
            else:
                yield f"ok {request}"

    def submit(self, request: str, group: str = "news") -> defer.Deferred:
        done = self.pool.submit("pubsub.localhost", group, Grouped(group, request, self.runner))
        done.addBoth(lambda result: self.answered.append(request) or result)
        return done

    def plain(self, name: str) -> defer.Deferred:
        async def job() -> str:
            self.calls.append([name])
            return name

        return self.pool.submit("pubsub.localhost", "news", job)

    def test_the_waiting_jobs_of_a_group_run_together_in_order(self) -> None:
        self.gate = defer.Deferred()
        first = self.submit("1")
        waiting = [self.submit(str(n)) for n in range(2, 5)]
        self.assertEqual(self.calls, [["1"]])
        self.gate.callback(None)
        self.assertEqual(self.calls, [["1"], ["2", "3", "4"]])
        self.assertEqual(
            [self.successResultOf(d) for d in [first, *waiting]], ["ok 1", "ok 2", "ok 3", "ok 4"]
        )
        self.assertEqual(self.answered, ["1", "2", "3", "4"])

    def test_a_group_is_cut_by_other_jobs_and_groups_and_at_max_group(self) -> None:
        self.gate = defer.Deferred()
        self.submit("1")
        for n in range(MAX_GROUP + 1):
            self.submit(f"a{n}")
        self.plain("plain")
        self.submit("b1")
        self.submit("other", group="other")
        self.submit("b2")
        self.gate.callback(None)
        self.assertEqual(
            self.calls,
            [
                ["1"],
                [f"a{n}" for n in range(MAX_GROUP)],
                [f"a{MAX_GROUP}"],
                ["plain"],
                ["b1"],
                ["other"],
                ["b2"],
            ],
        )

    def test_an_outcome_that_is_an_exception_fails_its_request_only(self) -> None:
        self.gate = defer.Deferred()
        self.submit("1")
        results = [self.submit(r) for r in ("2", "bad", "3")]
        self.gate.callback(None)
        self.assertEqual(self.successResultOf(results[0]), "ok 2")
        self.failureResultOf(results[1], ValueError)
        self.assertEqual(self.successResultOf(results[2]), "ok 3")

    def test_a_runner_that_raises_fails_the_requests_not_answered(self) -> None:
        self.gate = defer.Deferred()
        self.submit("1")
        results = [self.submit(r) for r in ("2", "crash", "3")]
        after = self.plain("after")
        self.gate.callback(None)
        self.assertEqual(self.successResultOf(results[0]), "ok 2")
        self.failureResultOf(results[1], RuntimeError)
        self.failureResultOf(results[2], RuntimeError)
        self.assertEqual(self.successResultOf(after), "after")
        self.assertEqual(self.successResultOf(self.pool.refuse_requests()), None)
