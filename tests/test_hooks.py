"""The hook table: order, waiting for handlers that return Deferreds, failures contained."""

from twisted.internet import defer
from twisted.trial import unittest

from mim_twisted.hooks import Hooks


class HooksTests(unittest.TestCase):
    def setUp(self) -> None:
        self.hooks = Hooks()
        self.calls: list[str] = []

    def handler(self, label: str, result: object = None):
        def handle(*args: object) -> object:
            self.calls.append(f"{label}{args}")
            return result

        return handle

    def test_priority_then_registration_order_at_once(self) -> None:
        self.hooks.add("h", self.handler("late"), priority=60)
        self.hooks.add("h", self.handler("first"), priority=10)
        self.hooks.add("h", self.handler("second"), priority=10)
        running = self.hooks.run("h", 1)
        # Handlers that return nothing have all run when `run` returns.
        self.assertEqual(self.calls, ["first(1,)", "second(1,)", "late(1,)"])
        self.assertIsNone(self.successResultOf(running))

    def test_a_deferred_holds_back_the_next_handlers(self) -> None:
        waiting: defer.Deferred = defer.Deferred()
        self.hooks.add("h", self.handler("a", waiting))
        self.hooks.add("h", self.handler("b"))
        running = self.hooks.run("h")
        self.assertEqual(self.calls, ["a()"])
        self.assertNoResult(running)
        waiting.callback("ignored")
        self.assertEqual(self.calls, ["a()", "b()"])
        self.assertIsNone(self.successResultOf(running))

    def test_coroutine_handlers_are_awaited(self) -> None:
        waiting: defer.Deferred = defer.Deferred()

        async def handler() -> None:
            await waiting
            self.calls.append("coroutine")

        self.hooks.add("h", handler)
        self.hooks.add("h", self.handler("after"))
        running = self.hooks.run("h")
        self.assertEqual(self.calls, [])
        waiting.callback(None)
        self.assertEqual(self.calls, ["coroutine", "after()"])
        self.successResultOf(running)

    def test_failures_are_logged_and_the_next_handler_runs(self) -> None:
        def broken() -> None:
            raise ValueError("broken handler")

        failing = defer.fail(KeyError("failed Deferred"))
        self.hooks.add("h", broken)
        self.hooks.add("h", self.handler("a", failing))
        self.hooks.add("h", broken)
        self.hooks.add("h", self.handler("b"))
        self.assertIsNone(self.successResultOf(self.hooks.run("h")))
        self.assertEqual(self.calls, ["a()", "b()"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_no_handlers(self) -> None:
        self.assertFalse(self.hooks.has_handlers("h"))
        self.assertIsNone(self.successResultOf(self.hooks.run("h")))
        handler = self.handler("a")
        self.hooks.add("h", handler)
        self.hooks.remove("h", handler)
        self.hooks.run("h")
        self.assertEqual(self.calls, [])
