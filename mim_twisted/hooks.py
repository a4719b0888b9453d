"""Named server hooks: the points where other modules (the event pusher, PEP, plugins) join in.

A hook runs its handlers in priority order (lower first, then registration order), waiting for
any Deferred a handler returns. A handler that fails is logged and the next one still runs: a
broken extension never breaks delivery. `run` never fails.
"""

import inspect
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

# Hook names and their arguments.
USER_AVAILABLE = "user_available"  # (session): first available presence of a session
USER_UNAVAILABLE = "user_unavailable"  # (session, presence or None): unavailable or disconnect
MESSAGE_SENT = "message_sent"  # (session, message): a local user sent a message
MESSAGE_DELIVERED = "message_delivered"  # (session, message): written to a local session
PRESENCE_SUBSCRIPTION_CHANGED = "presence_subscription_changed"  # (owner JID, RosterItem)
SESSION_BOUND = "session_bound"  # (session)
SESSION_ENDED = "session_ended"  # (session)

Handler = Callable[..., Any]


class Hooks:
    """The hook table of one server."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[tuple[int, int, Handler]]] = {}
        # The handlers of each hook in order, as `run` walks them (a tuple: a handler added or
        # removed while a hook runs does not change that run).
        self._ordered: dict[str, tuple[Handler, ...]] = {}
        self._added = 0

    def add(self, name: str, handler: Handler, priority: int = 50) -> None:
        self._added += 1
        handlers = self._handlers.setdefault(name, [])
        handlers.append((priority, self._added, handler))
        handlers.sort(key=lambda entry: entry[:2])
        self._ordered[name] = tuple(h for _, _, h in handlers)

    def remove(self, name: str, handler: Handler) -> None:
        # Compared, not identified: `obj.method` is a new bound method object at each access.
        self._handlers[name] = [e for e in self._handlers.get(name, []) if e[2] != handler]
        self._ordered[name] = tuple(h for _, _, h in self._handlers[name])

    def has_handlers(self, name: str) -> bool:
        return bool(self._handlers.get(name))

    def run(self, name: str, *args: Any) -> defer.Deferred:
        """Run the handlers of `name` in order; fires with None when all have finished.

        Handlers run here and now until one returns something to wait for; only then does a
        coroutine take over (the message path runs hooks for every message, and most handlers
        return nothing)."""
        handlers = self._ordered.get(name, ())
        for index, handler in enumerate(handlers):
            try:
                result = handler(*args)
            except Exception:
                log.failure("hook {hook} handler {handler!r} failed", hook=name, handler=handler)
                continue
            if result is None:
                continue  # the usual answer, and inspect.isawaitable is not cheap
            if isinstance(result, defer.Deferred) or inspect.isawaitable(result):
                rest = list(handlers[index + 1 :])
                return defer.ensureDeferred(self._wait(name, handler, result, rest, args))
        return defer.succeed(None)

    async def _wait(
        self, name: str, handler: Handler, waiting: Any, handlers: list[Handler], args: tuple
    ) -> None:
        try:
            await waiting
        except Exception:
            log.failure("hook {hook} handler {handler!r} failed", hook=name, handler=handler)
        for handler in handlers:
            try:
                await defer.maybeDeferred(handler, *args)
            except Exception:
                log.failure("hook {hook} handler {handler!r} failed", hook=name, handler=handler)
