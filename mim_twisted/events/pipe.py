"""The pipe between the XMPP process and its publisher process: length-prefixed messages.

Pure encoding and decoding, no I/O. Each message is a type byte, a 4-byte length and a payload.

The XMPP process writes SETTINGS once (the JSON the publisher needs: broker address,
credentials, exchanges), then BATCHes: the connection epoch the batch is meant for, the events'
sequence numbers and the events themselves, (exchange, routing key, JSON body) tuples in one
`marshal` string (C on both sides; marshal reads only data, never code). The publisher makes
their `basic.publish` frames, one delivery tag each, in the order of the batch.

The publisher writes READY (a channel of connection `epoch` is up, in confirm mode: batches for
that epoch may come), LOST (that connection went: whatever of it was not acknowledged will not
be), ACKED and NACKED (sequence numbers the broker took or refused) and LOG lines. A batch for an
epoch that is no longer the publisher's is ignored: the XMPP process sends it again once it has
read the LOST that it crossed on the pipe.
"""

import json
import marshal
import struct
from array import array
from typing import Any

SETTINGS = b"S"
BATCH = b"B"
READY = b"R"
LOST = b"L"
ACKED = b"A"
NACKED = b"N"
LOG = b"G"

_HEADER = struct.Struct(">cI")  # type, payload length
_EPOCH_COUNT = struct.Struct(">II")  # a batch's epoch and number of events
_EPOCH = struct.Struct(">I")

# Sequence numbers travel as native 8-byte integers: both ends are on one machine.
SEQUENCES = "q"


def message(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def settings_message(settings: dict[str, Any]) -> bytes:
    return message(SETTINGS, json.dumps(settings).encode("utf-8"))


def batch_message(epoch: int, sequences: array, events: list[tuple]) -> list[bytes]:
    """The pieces of one BATCH, for `writeSequence`."""
    numbers = sequences.tobytes()
    body = marshal.dumps(events)
    return [
        _HEADER.pack(BATCH, _EPOCH_COUNT.size + len(numbers) + len(body)),
        _EPOCH_COUNT.pack(epoch, len(sequences)),
        numbers,
        body,
    ]


def read_batch(payload: bytes) -> tuple[int, array, list[tuple]]:
    """A BATCH's epoch, sequence numbers and events."""
    epoch, count = _EPOCH_COUNT.unpack_from(payload)
    end = _EPOCH_COUNT.size + 8 * count
    sequences = array(SEQUENCES)
    sequences.frombytes(payload[_EPOCH_COUNT.size : end])
    return epoch, sequences, marshal.loads(payload[end:])


def epoch_message(kind: bytes, epoch: int, text: str = "") -> bytes:
    """READY or LOST of a connection epoch; LOST says why."""
    return message(kind, _EPOCH.pack(epoch) + text.encode("utf-8"))


def read_epoch(payload: bytes) -> tuple[int, str]:
    return _EPOCH.unpack_from(payload)[0], payload[_EPOCH.size :].decode("utf-8", "replace")


def sequences_message(kind: bytes, sequences: array) -> bytes:
    """ACKED or NACKED."""
    return message(kind, sequences.tobytes())


def read_sequences(payload: bytes) -> array:
    sequences = array(SEQUENCES)
    sequences.frombytes(payload)
    return sequences


def log_message(level: str, text: str) -> bytes:
    return message(LOG, f"{level} {text}".encode("utf-8", "replace"))


def read_log(payload: bytes) -> tuple[str, str]:
    level, _, text = payload.decode("utf-8", "replace").partition(" ")
    return level, text


class MessageReader:
    """Cuts a byte stream into (type, payload) messages."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        buffered = self._data
        buffered += data
        messages = []
        start = 0
        size = _HEADER.size
        while len(buffered) - start >= size:
            kind, length = _HEADER.unpack_from(buffered, start)
            end = start + size + length
            if end > len(buffered):
                break
            messages.append((kind, bytes(buffered[start + size : end])))
            start = end
        del buffered[:start]
        return messages
