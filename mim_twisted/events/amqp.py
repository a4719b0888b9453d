"""The frames of one AMQP 0-9-1 `basic.publish`, written directly.

pika builds them through its generic method and property marshalling, which costs about a
third of the pusher's CPU per event; the publisher's messages always have the same shape (no
properties, not mandatory, not immediate), so they are a few `struct.pack` calls. Everything
else (connection, channel, declarations, confirms, heartbeats) stays pika's.

Bodies are cut in frames of at most FRAME_MIN_SIZE bytes, the size every broker must accept
(AMQP 0-9-1 §4.2.3), so the negotiated frame_max is not needed.
"""

import struct

from pika.spec import FRAME_MIN_SIZE

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = b"\xce"
BASIC_CLASS = 60
BASIC_PUBLISH = 40

# Frame type, channel, payload size.
_FRAME = struct.Struct(">BHI")
# Class and method, reserved-1 (ticket).
_PUBLISH = struct.Struct(">HHH")
# Class, weight, body size, property flags (none).
_CONTENT_HEADER = struct.Struct(">HHQH")
# Frame header and end around each body frame.
MAX_BODY_FRAME = FRAME_MIN_SIZE - _FRAME.size - len(FRAME_END)


def short_string(text: str) -> bytes:
    """An AMQP shortstr; ValueError if it is longer than 255 bytes."""
    data = text.encode("utf-8")
    if len(data) > 255:
        raise ValueError(f"longer than 255 bytes: {text[:40]!r}...")
    return bytes((len(data),)) + data


def publish_frames(channel: int, exchange: bytes, routing_key: bytes, body: bytes) -> bytes:
    """`basic.publish` on `channel` with `exchange` and `routing_key` already shortstrs."""
    method = _PUBLISH.pack(BASIC_CLASS, BASIC_PUBLISH, 0) + exchange + routing_key + b"\x00"
    header = _CONTENT_HEADER.pack(BASIC_CLASS, 0, len(body), 0)
    parts = [
        _FRAME.pack(FRAME_METHOD, channel, len(method)),
        method,
        FRAME_END,
        _FRAME.pack(FRAME_HEADER, channel, len(header)),
        header,
        FRAME_END,
    ]
    for start in range(0, len(body), MAX_BODY_FRAME):
        chunk = body[start : start + MAX_BODY_FRAME]
        parts += (_FRAME.pack(FRAME_BODY, channel, len(chunk)), chunk, FRAME_END)
    return b"".join(parts)
