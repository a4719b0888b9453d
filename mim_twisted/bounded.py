"""Tables of bounded size that forget their oldest entries first."""

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def put_newest(table: dict[K, V], key: K, value: V, limit: int) -> None:
    """Put `key` last in an insertion-ordered table (as its newest entry), dropping the oldest
    entries so that it holds at most `limit`."""
    table.pop(key, None)
    while len(table) >= limit:
        del table[next(iter(table))]
    table[key] = value
