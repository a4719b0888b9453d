"""Restore the Python 2 shims that wokkel 18.0.0 imports from ``twisted.python.compat``.

Current Twisted removed ``_PY3``, ``unicode``, ``iteritems``, ``itervalues`` and ``StringType``;
wokkel still imports them at module level. ``install`` puts them back (only the missing ones) and
must run before the first wokkel import, which is why ``mim_twisted/__init__`` calls it.
"""

from twisted.python import compat

_SHIMS = {
    "_PY3": True,
    "unicode": str,
    "StringType": str,
    "iteritems": lambda mapping: iter(mapping.items()),
    "itervalues": lambda mapping: iter(mapping.values()),
}


def install() -> None:
    for name, value in _SHIMS.items():
        if not hasattr(compat, name):
            setattr(compat, name, value)
