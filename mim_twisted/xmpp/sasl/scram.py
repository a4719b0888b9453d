"""SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677) as ISaslMechanisms over ScramServer."""

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mim_twisted.auth.scram import ClientFirst, ScramServer
from mim_twisted.xmpp.sasl.mechanism import (
    Challenge,
    ISaslMechanism,
    SaslContext,
    Success,
    account_name,
    stored_credentials,
)


@implementer(ISaslMechanism)
class ScramMechanism:
    """One SCRAM exchange; each subclass names its mechanism, which picks the hash."""

    name: str

    def __init__(self, context: SaslContext) -> None:
        # ``context.secure`` is unused: without a -PLUS variant the TLS layer plays no part.
        self._domain = context.domain
        self._accounts = context.accounts
        self._decoy_iterations = context.scram_iterations
        self._server = ScramServer(self.name)
        # Set once the server-first-message is sent; the next response is the client-final.
        self._client_first: ClientFirst | None = None
        self.username: str | None = None

    def start(self, initial_response: bytes | None) -> Deferred:
        if not initial_response:
            # The client did not send its first message yet: an empty challenge asks for it.
            return succeed(Challenge(b""))
        return self.respond(initial_response)

    def respond(self, response: bytes) -> Deferred:
        return Deferred.fromCoroutine(self._step(response))

    async def _step(self, response: bytes) -> Challenge | Success:
        if self._client_first is None:
            return await self._server_first(response)
        server_final = self._server.read_client_final(response)
        return Success(self.username, self._client_first.authzid, server_final)

    async def _server_first(self, client_first: bytes) -> Challenge:
        first = self._server.read_client_first(client_first)
        username = account_name(first.username)
        self.username = username
        credentials = await stored_credentials(self._accounts, self._domain, username, (self.name,))
        # An unknown account gets a decoy keyed by its normalised JID, as stable as a real salt.
        server_first = self._server.server_first(
            credentials,
            decoy_name=f"{username}@{self._domain}",
            decoy_iterations=self._decoy_iterations,
        )
        self._client_first = first
        return Challenge(server_first)


class ScramSha1Mechanism(ScramMechanism):
    name = "SCRAM-SHA-1"


class ScramSha256Mechanism(ScramMechanism):
    name = "SCRAM-SHA-256"
