"""Who hears of the PubSub services' events: a list of observers, each called in turn.

The services emit one event per state change (published, retracted, subscribed, configured,
deleted ...); the broadcaster turns them into notifications, the offline purge keeps its list
of nodes from them, and anything else (PEP, the event pusher, an extension) registers here
rather than being wired in by hand.
"""

from collections.abc import Callable

from twisted.logger import Logger

from mim_twisted.pubsub.core import PubSubEvent

log = Logger()

Observer = Callable[[PubSubEvent], object]


class PubSubObservers:
    """Called with each event; hands it to every observer, in the order they were added."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def __call__(self, event: PubSubEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                # One failing observer must not keep the event from the others (or fail the
                # request that caused it: the change is stored already).
                log.failure(
                    "PubSub observer {observer!r} on {event!r}", observer=observer, event=event
                )
