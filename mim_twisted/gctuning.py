"""The cyclic garbage collector's settings for the server process.

CPython's defaults suit short scripts: a collection of the youngest generation every 700 new
container objects, and full collections that walk every live object, including the tens of
thousands the start built (modules, config, services) that live as long as the process. During a
burst of 1000 logins (benchmarks/README.md) the collector took about a quarter of the server's
CPU; with the start's objects frozen and young collections rarer, under a tenth.
"""

import gc

# Objects the youngest generation collects before a collection (CPython's default: 700). More of
# a login's short-lived objects are then gone before one runs instead of surviving into the older
# generations, whose collections walk every connection's objects.
YOUNG_GENERATION_THRESHOLD = 10_000


def tune_for_server() -> None:
    """Call once the server has started, in a process that is the server's alone (twistd)."""
    gc.collect()  # nothing collectable should be frozen along with the rest
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, oldest)
