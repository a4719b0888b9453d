"""XEP-0202 Entity Time for mim-twisted: the server answers ``<time xmlns='urn:xmpp:time'/>``.

Enabled by an ``[extensions.entity_time]`` table in the server's config. Its one optional
setting, ``utc_offset`` (e.g. ``"+01:00"``), is the offset the server reports in ``<tzo>``;
without it the host's local offset at the time of the request is reported.
"""

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish
from zope.interface import implementer

from mim_twisted.extensions import IMimExtension, ServerRegistry

NS_TIME = "urn:xmpp:time"

# XEP-0082 time zone definition: +hh:mm or -hh:mm.
_OFFSET = re.compile(r"([+-])(\d\d):(\d\d)")


def parse_offset(text: str) -> timedelta:
    """``"+01:00"`` as a timedelta; ValueError unless it is a XEP-0082 offset under 24 hours."""
    match = _OFFSET.fullmatch(text) if isinstance(text, str) else None
    if match is None or int(match[2]) > 23 or int(match[3]) > 59:
        raise ValueError(f'utc_offset: must be an offset such as "+01:00" (got {text!r})')
    offset = timedelta(hours=int(match[2]), minutes=int(match[3]))
    return -offset if match[1] == "-" else offset


def format_offset(offset: timedelta) -> str:
    """A XEP-0082 time zone definition: ``+hh:mm`` or ``-hh:mm``."""
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def time_element(now: datetime, offset: timedelta) -> domish.Element:
    """The ``<time/>`` answer for the instant ``now`` (timezone-aware) and the local offset."""
    time = domish.Element((NS_TIME, "time"))
    time.addElement("tzo", content=format_offset(offset))
    time.addElement("utc", content=now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return time


def local_offset(now: datetime) -> timedelta:
    """The host's UTC offset at ``now`` (it changes with daylight saving time)."""
    return now.astimezone().utcoffset() or timedelta(0)


class EntityTimeResponder:
    """Answers entity time requests to the server; ``clock()`` gives the current instant."""

    def __init__(
        self,
        offset: timedelta | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.offset = offset
        self.clock = clock

    def __call__(self, session: Any, iq: domish.Element, target: JID) -> domish.Element:
        if iq.getAttribute("type") != "get":
            raise error.StanzaError("not-allowed", text="The time is read with type 'get'")
        now = self.clock()
        offset = self.offset if self.offset is not None else local_offset(now)
        result = xmlstream.toResponse(iq, "result")
        result.addChild(time_element(now, offset))
        return result


@implementer(IMimExtension)
class EntityTime:
    """The extension: registers the IQ handler and the disco feature."""

    name = "entity_time"

    def install(self, server: ServerRegistry, settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - {"utc_offset"})
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}")
        offset = parse_offset(settings["utc_offset"]) if "utc_offset" in settings else None
        server.add_server_iq_handler(NS_TIME, "time", EntityTimeResponder(offset))
        server.add_server_feature(NS_TIME)
