"""The SASL exchange on the stream (RFC 6120 §6): <auth/>, <challenge/>, <response/>, <abort/>.

The mechanisms themselves are behind ISaslMechanism; this module only moves their data in and
out of the stream, decides which of them a stream is offered, checks the authorisation identity,
and throttles failures: each failed attempt is answered after a delay that doubles, and after
`max_failures` the stream is closed with <policy-violation/> (RFC 6120 §6.4.5).

Across connections, wrong passwords count against the server's failure budgets
(`mim_twisted.auth.throttle`): an address or (account, address) whose budget is spent is
answered <temporary-auth-failure/>, whatever the password, so the refusal is no oracle. A peer
with no IP address (on a UNIX socket) has no address budget: only the account's counts. Every
failure is logged on one line that fail2ban can match:
``SASL authentication failed for user alice@localhost from 192.0.2.1: not-authorized (...)``.
"""

import base64
import binascii
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.xish import domish

from mim_twisted.auth.errors import SaslError
from mim_twisted.listeners import ip_address_of
from mim_twisted.storage.interfaces import log_request_failure
from mim_twisted.xmpp import namespaces
from mim_twisted.xmpp.sasl.mechanism import Challenge, SaslContext, Success

if TYPE_CHECKING:
    from mim_twisted.xmpp.c2s import C2SStream

log = Logger()

# PLAIN sends the password itself: only over TLS unless the operator allows otherwise.
CLEARTEXT_MECHANISMS = frozenset(("PLAIN",))
# These authenticate with the client certificate: only on a stream that has a verified one.
CERTIFICATE_MECHANISMS = frozenset(("EXTERNAL",))


def decode_sasl_data(element: domish.Element) -> bytes | None:
    """The payload of <auth/> or <response/>: None when absent, b"" for "=" (RFC 6120 §6.4.2)."""
    text = "".join(str(c) for c in element.children if isinstance(c, str)).strip()
    if not text:
        return None
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SaslError("incorrect-encoding", "Invalid base64 data") from e


def encode_sasl_data(data: bytes | None) -> str | None:
    if data is None:
        return None
    return base64.b64encode(data).decode("ascii") if data else "="


class SaslNegotiation:
    """The SASL state of one stream."""

    def __init__(self, stream: "C2SStream") -> None:
        self.stream = stream
        self.failures = 0
        self.mechanism_name: str | None = None  # the offered mechanism last started
        self._mechanism = None
        self._pending: defer.Deferred | None = None
        self._delayed_failure = None

    def encryption_required(self) -> bool:
        """STARTTLS is mandatory on this listener and has not happened yet."""
        settings = self.stream.settings
        return (
            settings.starttls_required
            and settings.tls_options is not None
            and not self.stream.secure
        )

    def offered(self) -> list[str]:
        stream = self.stream
        if self.encryption_required():
            return []
        plain_allowed = stream.secure or stream.settings.allow_plain_without_tls
        certificate = stream.secure and stream.client_identities is not None
        return [
            name
            for name in stream.settings.mechanisms
            if (plain_allowed or name not in CLEARTEXT_MECHANISMS)
            and (certificate or name not in CERTIFICATE_MECHANISMS)
        ]

    def handle(self, element: domish.Element) -> None:
        if self._pending is not None or self._delayed_failure is not None:
            self.stream.stream_error("policy-violation", "SASL step sent before the last answer")
            return
        try:
            if element.name == "auth":
                self._start(element)
            elif element.name == "response" and self._mechanism is not None:
                self._step(self._mechanism.respond(decode_sasl_data(element) or b""))
            elif element.name == "abort":
                self._mechanism = None
                self._send_failure("aborted", None)
            else:
                raise SaslError("malformed-request", f"Unexpected <{element.name}/>")
        except SaslError as e:
            self._failed(e)

    def cancel(self) -> None:
        """The connection is gone: stop pending work."""
        self._mechanism = None
        if self._delayed_failure is not None and self._delayed_failure.active():
            self._delayed_failure.cancel()
        self._delayed_failure = None
        if self._pending is not None:
            self._pending.cancel()

    def _start(self, element: domish.Element) -> None:
        name = element.getAttribute("mechanism", "")
        if name not in self.offered():
            if self.encryption_required():
                raise SaslError("encryption-required", "Use STARTTLS first")
            if name in CERTIFICATE_MECHANISMS:
                raise SaslError("invalid-mechanism", f"{name} needs a verified client certificate")
            raise SaslError("invalid-mechanism", f"Mechanism {name!r} is not offered")
        # Refused before any password is checked (the account is not known yet).
        if name not in CERTIFICATE_MECHANISMS:
            self._check_budget(None)
        self.mechanism_name = name
        initial_response = decode_sasl_data(element)
        stream = self.stream
        context = SaslContext(
            domain=stream.domain,
            accounts=stream.factory.accounts,
            secure=stream.secure,
            domains=stream.settings.domains,
            client_identities=stream.client_identities,
            external=stream.settings.sasl_external,
            peer=stream.log_name(),
            scram_iterations=stream.settings.scram_iterations,
        )
        self._mechanism = stream.factory.mechanism_factory(name, context)
        self._step(self._mechanism.start(initial_response))

    def _step(self, result: defer.Deferred) -> None:
        # Nothing else is read from the client while a step is being worked on; a step answered
        # at once (no database read) needs no pause.
        if not result.called:
            self.stream.pause_reading("sasl")
        self._pending = result
        result.addCallbacks(self._answered, self._errored)
        result.addBoth(self._step_done)

    def _step_done(self, _: object) -> None:
        self._pending = None
        if self._delayed_failure is None:
            self.stream.resume_reading("sasl")

    def _answered(self, outcome: Challenge | Success) -> None:
        if self.stream.closed:
            return
        if isinstance(outcome, Challenge):
            self._send("challenge", outcome.data)
            return
        mechanism, self._mechanism = self._mechanism, None
        # A correct password is refused as a wrong one would be while the budget is spent.
        if _guessable(mechanism):
            try:
                self._check_budget(_account(mechanism, self.stream))
            except SaslError as refused:
                self._failed(refused, mechanism)
                return
        bare_jid = f"{outcome.username}@{self.stream.domain}"
        if outcome.authzid and outcome.authzid != bare_jid:
            self._failed(SaslError("invalid-authzid", "You may only act as yourself"), mechanism)
            return
        self.stream.factory.logins[self.mechanism_name, "success"] += 1
        self._send("success", outcome.additional_data)
        self.stream.authenticated(outcome.username)

    def _errored(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return
        if failure.check(SaslError):
            error, mechanism = failure.value, self._mechanism
            if error.condition == "not-authorized" and _guessable(mechanism):
                account = _account(mechanism, self.stream)
                try:
                    self._check_budget(account)
                except SaslError as refused:
                    # Spent meanwhile (by other connections): refused, not counted.
                    error = refused
                else:
                    self.stream.factory.auth_failures.record_failure(
                        ip_address_of(self._peer()), account, self.stream.factory.clock.seconds()
                    )
            self._failed(error)
            return
        log_request_failure(log, failure, "SASL mechanism")
        self._failed(SaslError("temporary-auth-failure", "Try again later"))

    def _check_budget(self, account: str | None) -> None:
        """temporary-auth-failure if a failure budget refuses an attempt on ``account`` (a
        bare JID, None when not known yet) from this stream's address now."""
        refusal = self.stream.factory.auth_failures.refusal(
            ip_address_of(self._peer()), account, self.stream.factory.clock.seconds()
        )
        if refusal is not None:
            raise SaslError("temporary-auth-failure", f"Try again later: {refusal}")

    def _peer(self) -> object:
        return getattr(self.stream, "peer", None)

    def _address(self) -> str:
        """The peer's address for the log line."""
        return str(getattr(self._peer(), "host", "?"))

    def _failed(self, error: SaslError, mechanism: object = None) -> None:
        mechanism = mechanism or self._mechanism
        self._mechanism = None
        self.failures += 1
        self.stream.factory.logins[self.mechanism_name or "none", "failure"] += 1
        # One line per failure for fail2ban; the account is nodeprepped (no spaces, no
        # controls) and the address is the transport's, so a client cannot forge this line.
        log.info(
            "SASL authentication failed for user {account} from {address}: {condition}"
            " ({text}; attempt {n} on port {port})",
            account=_account(mechanism, self.stream) or "-",
            address=self._address(),
            condition=error.condition,
            text=error.text or "no details",
            n=self.failures,
            port=getattr(getattr(self.stream, "peer", None), "port", "?"),
        )
        delay = self.stream.settings.failure_delay * 2 ** (self.failures - 1)
        if delay <= 0:
            self._send_failure(error.condition, error.text)
            return
        self.stream.pause_reading("sasl")
        self._delayed_failure = self.stream.factory.clock.callLater(
            delay, self._send_delayed_failure, error
        )

    def _send_delayed_failure(self, error: SaslError) -> None:
        self._delayed_failure = None
        self._send_failure(error.condition, error.text)
        self.stream.resume_reading("sasl")

    def _send_failure(self, condition: str, text: str | None) -> None:
        failure = domish.Element((namespaces.SASL, "failure"))
        failure.addElement(condition)
        if text:
            failure.addElement("text", content=text)
        self.stream.send(failure)
        if self.failures >= self.stream.settings.max_failures:
            self.stream.stream_error("policy-violation", "Too many failed authentication attempts")

    def _send(self, name: str, data: bytes | None) -> None:
        encoded = encode_sasl_data(data)
        if not self.stream.settings.log_traffic:
            # Written as is: base64 needs no escaping, and every login sends two of these.
            content = f">{encoded}</{name}>" if encoded is not None else "/>"
            self.stream.send(f"<{name} xmlns='{namespaces.SASL}'{content}".encode())
            return
        # An element, which the traffic log shows with its credential redacted.
        element = domish.Element((namespaces.SASL, name))
        if encoded is not None:
            element.addContent(encoded)
        self.stream.send(element)


def _guessable(mechanism: object) -> bool:
    """Whether failures of this attempt are password guesses (not a certificate's)."""
    return mechanism is not None and mechanism.name not in CERTIFICATE_MECHANISMS


def _account(mechanism: object, stream: "C2SStream") -> str | None:
    """The bare JID an attempt named, None if it has named none (yet)."""
    username = getattr(mechanism, "username", None)
    return f"{username}@{stream.domain}" if username else None
