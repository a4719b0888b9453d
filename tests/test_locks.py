"""The lock per key that the roster protocol and the presence layer share."""

from twisted.internet import defer
from twisted.trial import unittest

from mim_twisted.im.locks import KeyedLock


class KeyedLockTests(unittest.TestCase):
    def setUp(self) -> None:
        self.locks = KeyedLock()

    def test_one_holder_per_key_first_come_first_served(self) -> None:
        self.successResultOf(self.locks.acquire("alice"))
        second = self.locks.acquire("alice")
        third = self.locks.acquire("alice")
        self.assertNoResult(second)
        self.locks.release("alice")
        self.successResultOf(second)
        self.assertNoResult(third)
        self.locks.release("alice")
        self.successResultOf(third)
        self.assertTrue(self.locks.locked("alice"))

    def test_keys_do_not_wait_for_each_other(self) -> None:
        self.successResultOf(self.locks.acquire("alice"))
        self.successResultOf(self.locks.acquire("bob"))
        self.assertEqual(len(self.locks), 2)

    def test_a_key_is_forgotten_once_free(self) -> None:
        for _ in range(3):
            self.successResultOf(self.locks.acquire("alice"))
            waiter = self.locks.acquire("alice")
            self.locks.release("alice")
            self.successResultOf(waiter)
            self.locks.release("alice")
        self.assertFalse(self.locks.locked("alice"))
        self.assertEqual(len(self.locks), 0)

    def test_releasing_what_is_not_held(self) -> None:
        self.assertRaises(RuntimeError, self.locks.release, "alice")
        self.successResultOf(self.locks.acquire("alice"))
        self.locks.release("alice")
        self.assertRaises(RuntimeError, self.locks.release, "alice")

    def test_a_cancelled_waiter_gives_up_its_place(self) -> None:
        self.successResultOf(self.locks.acquire("alice"))
        cancelled = self.locks.acquire("alice")
        after = self.locks.acquire("alice")
        cancelled.cancel()
        self.failureResultOf(cancelled, defer.CancelledError)
        self.locks.release("alice")
        self.successResultOf(after)
        self.locks.release("alice")
        self.assertEqual(len(self.locks), 0)

    def test_many_waiters_that_release_at_once_do_not_nest(self) -> None:
        # Each waiter releases as soon as it holds the key: handed over in a loop, not by
        # callbacks calling callbacks, or this would overflow the stack.
        order: list[int] = []

        def run(_: object, n: int) -> None:
            order.append(n)
            self.locks.release("alice")

        self.successResultOf(self.locks.acquire("alice"))
        for n in range(5000):
            self.locks.acquire("alice").addCallback(run, n)
        self.locks.release("alice")
        self.assertEqual(order, list(range(5000)))
        self.assertEqual(len(self.locks), 0)

    def test_a_waiter_may_take_the_key_again_while_it_is_handed_over(self) -> None:
        taken_again: list[defer.Deferred] = []

        def run(_: object) -> None:
            self.locks.release("alice")
            taken_again.append(self.locks.acquire("alice"))

        self.successResultOf(self.locks.acquire("alice"))
        self.locks.acquire("alice").addCallback(run)
        last = self.locks.acquire("alice")
        self.locks.release("alice")
        # The waiter that came first goes first; the key taken again waits behind it.
        self.successResultOf(last)
        self.assertNoResult(taken_again[0])
        self.locks.release("alice")
        self.successResultOf(taken_again[0])
        self.locks.release("alice")
        self.assertEqual(len(self.locks), 0)

    async def test_hold_releases_when_the_block_fails(self) -> None:
        with self.assertRaises(ValueError):
            async with self.locks.hold("alice"):
                self.assertTrue(self.locks.locked("alice"))
                raise ValueError("failed")
        self.assertFalse(self.locks.locked("alice"))

    def test_hold_waits_for_the_key(self) -> None:
        steps: list[str] = []

        async def change(name: str, answer: defer.Deferred) -> None:
            async with self.locks.hold("alice"):
                steps.append(f"{name} read")
                await answer
                steps.append(f"{name} wrote")

        first_answer: defer.Deferred = defer.Deferred()
        first = defer.ensureDeferred(change("first", first_answer))
        second = defer.ensureDeferred(change("second", defer.succeed(None)))
        self.assertEqual(steps, ["first read"])
        first_answer.callback(None)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(steps, ["first read", "first wrote", "second read", "second wrote"])
        self.assertEqual(len(self.locks), 0)
