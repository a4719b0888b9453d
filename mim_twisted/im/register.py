"""XEP-0077 in-band registration: creating an account before authentication, changing its
password or cancelling it afterwards.

Off by default (`registration.enabled`): when off nothing is advertised and every request gets
<service-unavailable/> (§3.1). When on, the stream feature is offered only on encrypted streams,
since the password travels in the request, and a request on a plaintext stream is refused with
<policy-violation/> (as Prosody does) or, for a password change, <not-authorized/> (§3.3).
One connection may create one account.

Errors never echo the request back (§3.3 says so for password changes; it holds the password in
every case).

Deriving the stored keys of a password takes two PBKDF2 runs: they go to the reactor's thread
pool, bounded as PLAIN's checks are (`hash_in_thread`).
"""

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import error, xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.protocols.jabber.xmpp_stringprep import nodeprep
from twisted.words.xish import domish

from mim_twisted.auth.scram import DEFAULT_ITERATIONS, derive_all
from mim_twisted.im.sessions import Session, SessionManager
from mim_twisted.storage.interfaces import AccountExists, AccountNotFound, log_request_failure
from mim_twisted.xmpp.c2s import C2SFactory
from mim_twisted.xmpp.connection import ClientConnection
from mim_twisted.xmpp.sasl.plain import hash_in_thread

if TYPE_CHECKING:
    from mim_twisted.im.disco import DiscoService
    from mim_twisted.im.router import Router

log = Logger()

NS_REGISTER = "jabber:iq:register"
NS_FEATURE = "http://jabber.org/features/iq-register"
MAX_USERNAME_BYTES = 1023  # RFC 7622 §3.3.1

INSTRUCTIONS = "Choose a username and password for use with this server."
REGISTERED_INSTRUCTIONS = (
    "You are registered. Send a new password to change it, or <remove/> to delete the account."
)


class RegistrationError(error.StanzaError):
    """A stanza error whose response carries no copy of the request."""

    def toResponse(self, stanza: domish.Element) -> domish.Element:
        response = xmlstream.toResponse(stanza, "error")
        response.addChild(self.getElement())
        return response


class RegistrationService:
    """Account creation before authentication and account management after it."""

    def __init__(
        self,
        accounts: Any,
        sessions: SessionManager,
        clock: IReactorTime,
        *,
        enabled: bool,
        iterations: int = DEFAULT_ITERATIONS,
        run_hash: Callable[..., defer.Deferred] = hash_in_thread,
    ) -> None:
        self.accounts = accounts
        self.sessions = sessions
        self.clock = clock
        self.enabled = enabled
        self.iterations = iterations
        # How derive_all is run: in a thread; tests without a reactor give a synchronous one.
        self.run_hash = run_hash
        # Streams that have created (or are creating) an account.
        self._registered: weakref.WeakSet = weakref.WeakSet()

    def install_stream(self, factory: C2SFactory) -> None:
        """Wire the pre-authentication part into one C2SFactory (one per listener)."""
        factory.preauth_iq[NS_REGISTER, "query"] = self.preauth_request
        if self.enabled:
            factory.secure_preauth_features.append(domish.Element((NS_FEATURE, "register")))

    def install(self, router: "Router", disco: "DiscoService") -> None:
        """Wire the part for authenticated sessions; when off the router's default answers."""
        if self.enabled:
            router.server_iq[NS_REGISTER, "query"] = self.account_request
            router.account_iq[NS_REGISTER, "query"] = self.account_request
            disco.add_server_feature(NS_REGISTER)

    # -- before authentication ---------------------------------------------------------------

    def preauth_request(self, stream: ClientConnection, iq: domish.Element) -> None:
        """`C2SFactory.preauth_iq` handler: the stream has no JID yet, so we answer directly."""
        kind = iq.getAttribute("type")
        if kind in ("result", "error"):
            return
        if kind not in ("get", "set") or not iq.getAttribute("id"):
            stream.send(RegistrationError("bad-request").toResponse(iq))
            return
        answering = defer.ensureDeferred(self._preauth(stream, iq))
        answering.addCallbacks(stream.send, self._failed, errbackArgs=(stream, iq))

    async def _preauth(self, stream: ClientConnection, iq: domish.Element) -> domish.Element:
        if not self.enabled:
            raise RegistrationError("service-unavailable")
        if not stream.secure:
            raise RegistrationError(
                "policy-violation", type="modify", text="Encryption is required to register"
            )
        if iq["type"] == "get":
            result = xmlstream.toResponse(iq, "result")
            query = result.addElement((NS_REGISTER, "query"))
            query.addElement("instructions", content=INSTRUCTIONS)
            query.addElement("username")
            query.addElement("password")
            return result
        query = iq.firstChildElement()
        if _child(query, "remove") is not None:
            raise RegistrationError("unexpected-request", text="Authenticate to cancel an account")
        if stream in self._registered:
            raise RegistrationError("not-acceptable", text="One account per connection")
        username, password = _text(query, "username"), _text(query, "password")
        if not username or not password:
            raise RegistrationError("not-acceptable", text="A username and a password are needed")
        username = _prepared_username(username)
        # Marked before the first wait, so a second request sent meanwhile is refused.
        self._registered.add(stream)
        try:
            credentials = await self._credentials(password)
            await self.accounts.create_account(stream.domain, username, credentials)
        except AccountExists:
            self._registered.discard(stream)
            raise RegistrationError("conflict", text="That username is taken") from None
        except Exception:
            self._registered.discard(stream)
            raise
        log.info("registered {user}@{domain} in-band", user=username, domain=stream.domain)
        return xmlstream.toResponse(iq, "result")

    @staticmethod
    def _failed(failure: Failure, stream: ClientConnection, iq: domish.Element) -> None:
        if not failure.check(error.StanzaError):
            log_request_failure(log, failure, "in-band registration")
            failure = Failure(RegistrationError("internal-server-error"))
        stream.send(failure.value.toResponse(iq))

    # -- after authentication ----------------------------------------------------------------

    async def account_request(
        self, session: Session, iq: domish.Element, target: JID
    ) -> domish.Element | None:
        """Router handler for the own bare JID (or no 'to') and for one's own domain."""
        own = session.jid.userhostJID()
        if target.host != own.host or target.user not in (None, own.user):
            raise RegistrationError("service-unavailable")
        if iq["type"] == "get":
            result = xmlstream.toResponse(iq, "result")
            query = result.addElement((NS_REGISTER, "query"))
            query.addElement("registered")
            query.addElement("instructions", content=REGISTERED_INSTRUCTIONS)
            query.addElement("username", content=own.user)
            query.addElement("password")
            return result
        query = iq.firstChildElement()
        if _child(query, "remove") is not None:
            await self._cancel(query, own)
        else:
            await self._change_password(session, query, own)
        return None

    async def _cancel(self, query: domish.Element, own: JID) -> None:
        if len(list(query.elements())) != 1:
            raise RegistrationError("bad-request", text="<remove/> must be alone")
        try:
            await self.accounts.remove_account(own.host, own.user)
        except AccountNotFound:
            raise RegistrationError("registration-required") from None
        log.info("{jid} cancelled its account in-band", jid=own.full())
        # After the router has sent the result: §3.2 says to end every session of the account.
        self.clock.callLater(0, self._close_sessions, own)

    def _close_sessions(self, own: JID) -> None:
        for session in self.sessions.sessions_of(own):
            session.stream_error("not-authorized", "The account has been removed")

    async def _change_password(self, session: Session, query: domish.Element, own: JID) -> None:
        if not session.secure:
            raise RegistrationError("not-authorized", type="modify", text="Encryption is required")
        username, password = _text(query, "username"), _text(query, "password")
        # §3.3: an empty password leaves the old one in place, so it is an error.
        if not username or not password:
            raise RegistrationError("bad-request", text="A username and a password are needed")
        if _prepared_username(username) != own.user:
            raise RegistrationError("bad-request", text="That is not your username")
        credentials = await self._credentials(password)
        await self.accounts.set_credentials(own.host, own.user, credentials)
        log.info("{jid} changed its password in-band", jid=own.full())

    async def _credentials(self, password: str) -> dict[str, str]:
        try:
            return await self.run_hash(derive_all, password, self.iterations)
        except ValueError:  # SASLprep refuses it (or leaves nothing)
            raise RegistrationError("not-acceptable", text="That password is not allowed") from None


def _child(query: domish.Element, name: str) -> domish.Element | None:
    return next(query.elements(NS_REGISTER, name), None)


def _text(query: domish.Element, name: str) -> str | None:
    child = _child(query, name)
    return None if child is None else str(child)


def _prepared_username(username: str) -> str:
    try:
        prepared = nodeprep.prepare(username)
    except UnicodeError:
        prepared = ""
    if not prepared or len(prepared.encode("utf-8")) > MAX_USERNAME_BYTES:
        raise RegistrationError("not-acceptable", text="That username is not allowed")
    return prepared
