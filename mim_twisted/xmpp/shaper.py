"""A token bucket for what one connection may send: the read side of traffic shaping.

A connection that reads faster than `rate` bytes per second (after a burst of `burst` bytes) is
told how long to pause reading, so one client cannot take the reactor from the others.
"""


class ReadShaper:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated = now

    def consume(self, size: int, now: float) -> float:
        """Account for `size` bytes read at `now`; the seconds to pause reading (0: none)."""
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= size
        return -self._tokens / self.rate if self._tokens < 0 else 0.0
