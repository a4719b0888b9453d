"""PLAIN (RFC 4616), checked against the stored SCRAM keys: no plaintext password is kept.

Checking a password is a PBKDF2 run (milliseconds of CPU, for unknown accounts too, against
their decoy): it goes to the reactor's thread pool through ``run_hash``, never in the reactor
thread, so a burst of attempts does not stall every other connection.
"""

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from mim_twisted.auth.errors import SaslError
from mim_twisted.auth.saslprep import saslprep
from mim_twisted.auth.scram import decoy_credentials, verify_password
from mim_twisted.xmpp.sasl.mechanism import (
    Challenge,
    ISaslMechanism,
    SaslContext,
    Success,
    account_name,
    stored_credentials,
)

# The stronger hash first; SCRAM-SHA-1 serves accounts that only have that.
_CREDENTIALS = ("SCRAM-SHA-256", "SCRAM-SHA-1")

# Password hashes running at once, server-wide: a flood of attempts queues here instead of
# taking every thread of the reactor's pool (host name lookups need it too). PBKDF2 releases the
# GIL, so the reactor thread keeps running meanwhile.
MAX_CONCURRENT_HASHES = 4
_hashing = DeferredSemaphore(MAX_CONCURRENT_HASHES)


def hash_in_thread(function: Callable[..., Any], *args: Any) -> Deferred:
    """Run a password hash (``function(*args)``) in the reactor's thread pool, at most
    MAX_CONCURRENT_HASHES at a time; fires with its result. In-band registration uses it too."""
    return _hashing.run(deferToThread, function, *args)


# How PLAIN runs verify_password; tests that run without a reactor put a synchronous one here.
run_hash: Callable[..., Deferred] = hash_in_thread


@implementer(ISaslMechanism)
class PlainMechanism:
    name = "PLAIN"

    def __init__(self, context: SaslContext) -> None:
        self.username: str | None = None
        # ``context.secure`` is unused: whether PLAIN is offered without TLS is the
        # negotiation's policy.
        self._domain = context.domain
        self._accounts = context.accounts
        self._decoy_iterations = context.scram_iterations

    def start(self, initial_response: bytes | None) -> Deferred:
        if not initial_response:
            # The client did not speak first: an empty challenge asks for its message.
            return succeed(Challenge(b""))
        return self.respond(initial_response)

    def respond(self, response: bytes) -> Deferred:
        return Deferred.fromCoroutine(self._authenticate(response))

    async def _authenticate(self, message: bytes) -> Success:
        authzid, authcid, password = _parse(message)
        try:
            username = account_name(saslprep(authcid, allow_unassigned=True))
        except ValueError:
            raise SaslError("not-authorized") from None
        self.username = username
        credentials = await stored_credentials(self._accounts, self._domain, username, _CREDENTIALS)
        known = credentials is not None
        if credentials is None:
            # Hash the password anyway, so the time taken does not tell unknown accounts apart.
            credentials = decoy_credentials(
                _CREDENTIALS[0], f"{username}@{self._domain}", self._decoy_iterations
            )
        if not (await run_hash(verify_password, credentials, password) and known):
            raise SaslError("not-authorized")
        return Success(username, authzid or None)


def _parse(message: bytes) -> tuple[str, str, str]:
    """RFC 4616 §2: ``[authzid] NUL authcid NUL passwd``, UTF-8, authcid and passwd non-empty."""
    fields = message.split(b"\0")
    if len(fields) != 3 or not fields[1] or not fields[2]:
        raise SaslError("malformed-request", "expected authzid NUL authcid NUL password")
    try:
        authzid, authcid, password = (field.decode("utf-8") for field in fields)
    except UnicodeDecodeError:
        raise SaslError("malformed-request", "PLAIN message is not UTF-8") from None
    return authzid, authcid, password
