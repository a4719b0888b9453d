"""The client-to-server XML stream (RFC 6120): stream header, features, STARTTLS, SASL, binding.

One `C2SStream` per TCP connection. When the listener requests client certificates, the
identities of a verified one are read once the TLS handshake is done and make SASL EXTERNAL
available on the stream (XEP-0178). Negotiation happens here; once a resource is bound, the layer
above (the IM core) opens a session for it (`mim_twisted.xmpp.connection`), and every stanza is
stamped with the session's full JID and handed to that session. A stream error closes only its
own connection.
"""

import re
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer, interfaces, protocol, tcp
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.words.protocols.jabber import error
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish
from zope.interface import implementer

from mim_twisted.auth.certs import CertificateIdentities, ExternalSettings, certificate_identities
from mim_twisted.auth.scram import DEFAULT_ITERATIONS
from mim_twisted.auth.throttle import AuthFailureBudget, FailureBudgetSettings
from mim_twisted.listeners import describe_address, ip_address_of
from mim_twisted.xmpp import bind, namespaces, traffic
from mim_twisted.xmpp.connection import BoundSession, SessionOpener
from mim_twisted.xmpp.parser import RestrictedXml, StanzaTooLarge, StreamParser
from mim_twisted.xmpp.sasl.negotiation import SaslNegotiation
from mim_twisted.xmpp.serialise import to_xml
from mim_twisted.xmpp.shaper import ReadShaper
from mim_twisted.xmpp.stanza_errors import error_response
from mim_twisted.xmpp.tls import ClientCertificateCheck, ClientCertificatePolicy
from mim_twisted.xmpp.tlswrite import TurnWrites, nothing_buffered, send_or_buffer, speed_up

log = Logger()

STANZA_NAMES = frozenset(("message", "presence", "iq"))
PREAUTH_MAX_STANZA_SIZE = 16384
# Seconds a closing connection gets to deliver what was written to it (and, on TLS, to
# exchange close_notify) before it is cut: a peer that never reads or never answers must not
# hold a socket.
CLOSE_GRACE = 5.0
# Elements of the stream namespace (features, error) are written with the prefix that our
# stream header declares, as RFC 6120 §4.9 writes <stream:error/>.
_STREAM_PREFIXES = {namespaces.STREAMS: "stream"}


@dataclass(frozen=True)
class C2SSettings:
    """What the stream layer needs to know; built from the Config by the service maker."""

    domains: frozenset[str]
    tls_options: object | None
    starttls_required: bool
    mechanisms: tuple[str, ...]
    allow_plain_without_tls: bool
    max_failures: int
    failure_delay: float
    max_stanza_size: int
    auth_timeout: float
    max_outgoing_buffer: int
    max_read_rate: int = 0  # bytes per second a client may send; 0: no limit
    max_unbound_per_address: int = 100  # connections not yet bound, per peer address
    stanza_timeout: float = 60.0  # seconds one top-level element may take to arrive
    log_traffic: bool = False
    scram_iterations: int = DEFAULT_ITERATIONS
    # Request client certificates on STARTTLS (None: don't), and how EXTERNAL judges them.
    client_certificates: ClientCertificatePolicy | None = None
    sasl_external: ExternalSettings = ExternalSettings()
    failure_budget: FailureBudgetSettings = FailureBudgetSettings()


@implementer(interfaces.IPushProducer, interfaces.IHandshakeListener)
class C2SStream(protocol.Protocol):
    """One client connection."""

    def __init__(self, factory: "C2SFactory") -> None:
        self.factory = factory
        self.settings = factory.settings
        self.domain: str | None = None
        self.stream_id = ""
        self.secure = False
        # What a verified client certificate says, once the TLS handshake is done.
        self.client_identities: CertificateIdentities | None = None
        self._certificate_check: ClientCertificateCheck | None = None
        self.username: str | None = None
        self.jid: JID | None = None
        self._full_jid = ""
        self.session: BoundSession | None = None  # opened by the layer above once bound
        self.bound_at: float | None = None  # clock.seconds() when the resource was bound
        self.tls_established = False
        self.closed = False
        self._closing = False  # closed by a stream end or error, not broken off
        self._parser: StreamParser | None = None
        self._header_sent = False
        self._auth_timer = None
        self._close_timer = None
        self._stanza_timer = None
        self._timed_stanza = 0  # which started stanza `_stanza_timer` is running for
        self._write_blocked = False
        # Negotiating on plain TCP (not TLS, not a test's transport): the replies may go
        # straight to the socket (see _write).
        self._direct_writes = False
        self._direct_turn = -1  # the reactor turn of the last direct write (see WriteTurns)
        self._read_pauses: set[str] = set()
        self._shaper: ReadShaper | None = None
        self._shaper_timer = None
        self._bytes_while_blocked = 0
        self.sasl = SaslNegotiation(self)
        self.lost: defer.Deferred = defer.Deferred()  # fires when the connection is gone

    # -- connection and parsing ------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.streams.add(self)
        self.peer = self.transport.getPeer()
        self.transport.registerProducer(self, True)
        # Stanzas are complete messages: Nagle's algorithm would only hold them back (~40 ms).
        if interfaces.ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self._direct_writes = isinstance(self.transport, tcp.Connection)
        if self.settings.max_read_rate:
            rate = self.settings.max_read_rate
            self._shaper = ReadShaper(rate, rate, self.factory.clock.seconds())
        self._auth_timer = self.factory.clock.callLater(
            self.settings.auth_timeout, self._auth_timed_out
        )
        self._new_parser()
        if not self.factory.admit_unbound(self):
            self.stream_error("policy-violation", "Too many connections from your address")

    def _new_parser(self) -> None:
        limit = self.settings.max_stanza_size
        if self.username is None:
            # Before authentication nothing big is needed; an anonymous peer gets a small limit.
            limit = min(limit, PREAUTH_MAX_STANZA_SIZE)
        parser = StreamParser(limit)
        parser.DocumentStartEvent = self._on_stream_start
        parser.ElementEvent = self._on_element
        parser.DocumentEndEvent = self._on_stream_end
        if self.settings.log_traffic:
            traffic.log_received_events(parser, self.log_name)
        previous, self._parser = self._parser, parser
        self._header_sent = False
        if previous is not None:
            # What the client sent after the element that restarted the stream is dropped
            # (after <starttls/> it would be plaintext injected ahead of TLS).
            previous.DocumentStartEvent = previous.ElementEvent = _ignore
            previous.DocumentEndEvent = _ignore

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        parser = self._parser
        try:
            parser.parse(data)
        except (RestrictedXml, StanzaTooLarge, domish.ParserError) as e:
            if parser is self._parser:
                self._parse_error(e)
        if not self.closed:
            self._time_stanza()
        if self._shaper is not None and not self.closed:
            pause = self._shaper.consume(len(data), self.factory.clock.seconds())
            if pause:
                self.pause_reading("shaper")
                # One timer: data that arrives while paused pushes the resumption back.
                if self._shaper_timer is not None and self._shaper_timer.active():
                    self._shaper_timer.reset(pause)
                else:
                    self._shaper_timer = self.factory.clock.callLater(
                        pause, self.resume_reading, "shaper"
                    )

    def _time_stanza(self) -> None:
        """Give the stanza being received `stanza_timeout` seconds from its first byte."""
        parser = self._parser
        timer = self._stanza_timer
        if not parser.in_stanza:
            if timer is not None and timer.active():
                timer.cancel()
            self._stanza_timer = None
        elif timer is None or self._timed_stanza != parser.stanzas_started:
            self._timed_stanza = parser.stanzas_started
            if timer is not None and timer.active():
                timer.reset(self.settings.stanza_timeout)
            else:
                self._stanza_timer = self.factory.clock.callLater(
                    self.settings.stanza_timeout, self._stanza_timed_out
                )

    def _stanza_timed_out(self) -> None:
        self._stanza_timer = None
        # policy-violation, not connection-timeout: the client is still sending (RFC 6120
        # §4.9.3.4 is for a peer that can no longer communicate); it breaks our limit on how
        # long one stanza may take, like the size limit (§4.9.3.14).
        self.stream_error(
            "policy-violation", f"A stanza took longer than {self.settings.stanza_timeout:g} s"
        )

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client until every reason given has been resumed."""
        if not self._read_pauses:
            self.transport.pauseProducing()
        self._read_pauses.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._read_pauses:
            return  # not paused for it
        self._read_pauses.discard(reason)
        if not self._read_pauses and not self.closed:
            self.transport.resumeProducing()

    def _parse_error(self, e: Exception) -> None:
        if isinstance(e, RestrictedXml):
            self.stream_error("restricted-xml", str(e))
        elif isinstance(e, StanzaTooLarge):
            self.stream_error("policy-violation", str(e))
        else:
            self.stream_error("not-well-formed", str(e))

    def connectionLost(self, reason: object = None) -> None:
        self.closed = True
        self.factory.streams.discard(self)
        self.factory.forget_unbound(self)
        for timer in (self._auth_timer, self._close_timer, self._stanza_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.sasl.cancel()
        if self.secure and not self.tls_established:
            self.factory.tls_failures += 1
        check = self._certificate_check
        if check is not None and check.rejected:
            log.info(
                "{peer}: TLS handshake refused, client certificate: {problem}",
                peer=self.log_name(),
                problem=check.problem,
            )
        if self.session is not None:
            self.session.connection_lost(self, abrupt=not self._closing)
        log.debug("{peer} disconnected", peer=self.log_name())
        # Last: whoever waits for the connection to be gone (the IM core's drain at shutdown)
        # runs at once, and must find the session's end (unavailable presence) under way.
        self.lost.callback(None)

    # -- output ----------------------------------------------------------------------------

    def send(self, stanza: domish.Element | bytes | str) -> None:
        """Write a stanza; elements are serialised in the stream's default namespace."""
        if self.closed:
            return
        self._write(self._serialise(stanza))

    def _serialise(self, stanza: domish.Element | bytes | str) -> bytes:
        if self.settings.log_traffic:
            traffic.log_sent(self.log_name(), stanza)
        if isinstance(stanza, domish.Element):
            if stanza.uri == namespaces.STREAMS:
                stanza = stanza.toXml(
                    prefixes=_STREAM_PREFIXES,
                    defaultUri=namespaces.CLIENT,
                    prefixesInScope=["stream"],
                )
            else:
                stanza = to_xml(stanza)
        if isinstance(stanza, str):
            stanza = stanza.encode("utf-8")
        self.factory.stanzas_out[_sent_stanza_kind(stanza)] += 1
        return stanza

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        if self._write_blocked:
            self._bytes_while_blocked += len(data)
            if self._bytes_while_blocked > self.settings.max_outgoing_buffer:
                log.warn("{peer}: client reads too slowly, disconnecting", peer=self.log_name())
                self.closed = True
                self.transport.abortConnection()
                return
        transport = self.transport
        if (
            self._direct_writes
            and self._direct_turn != self.factory.write_turns.number
            and nothing_buffered(transport)
        ):
            # Twisted buffers every write and has the reactor watch the socket for
            # writability until the buffer is flushed: two epoll_ctl calls and a reactor pass
            # per reply. A login is a handful of exchanges with one reply each, so while
            # negotiating, the first write of a reactor turn goes to the socket at once; the
            # turn's later ones are buffered behind it. Once the client sends stanzas, all is
            # buffered as Twisted does, so that what one turn routes to a client (messages,
            # notifications) leaves in one send().
            self._direct_turn = self.factory.write_turns.current()
            send_or_buffer(transport, data)
            return
        transport.write(data)

    # IPushProducer: the transport tells us when its write buffer is full or drained.
    def pauseProducing(self) -> None:
        self._write_blocked = True

    def resumeProducing(self) -> None:
        self._write_blocked = False
        self._bytes_while_blocked = 0

    def stopProducing(self) -> None:
        self.closed = True

    def stream_error(
        self, condition: str, text: str | None = None, app_condition: domish.Element | None = None
    ) -> None:
        """Send a stream error (after our header if not yet sent) and close the connection."""
        if self.closed:
            return
        log.info(
            "{peer}: stream error {condition}: {text}",
            peer=self.log_name(),
            condition=condition,
            text=text or "",
        )
        if not self._header_sent:
            self._send_header(self.domain or sorted(self.settings.domains)[0])
        self.send(error.StreamError(condition, text, appCondition=app_condition).getElement())
        self.send(b"</stream:stream>")
        self._close()

    def _close(self) -> None:
        """Close the connection after what was written: at once on plain TCP, after the
        close_notify exchange on TLS, and in any case within CLOSE_GRACE seconds."""
        self.closed = True
        self._closing = True
        transport = self.transport
        # TLS (TLSMemoryBIOProtocol) does not shut down while a producer is registered.
        transport.unregisterProducer()
        # Read again, so that the client's FIN or close_notify is noticed.
        self._read_pauses.clear()
        transport.resumeProducing()
        transport.loseConnection()
        self._close_timer = self.factory.clock.callLater(CLOSE_GRACE, transport.abortConnection)

    def _send_header(self, domain: str, features: bytes | None = None) -> None:
        """Our stream header, and the features (serialised) in the same write if given."""
        self.stream_id = secrets.token_hex(8)
        header = self._serialise(
            "<?xml version='1.0'?>"
            f"<stream:stream xmlns='{namespaces.CLIENT}' xmlns:stream='{namespaces.STREAMS}'"
            f" id='{self.stream_id}' from='{domain}' version='1.0' xml:lang='en'>"
        )
        self._header_sent = True
        self._write(header if features is None else header + features)

    # -- stream header and features --------------------------------------------------------

    def _on_stream_start(self, root: domish.Element) -> None:
        domain = (root.getAttribute("to") or "").lower()
        if root.uri != namespaces.STREAMS or root.name != "stream":
            self.stream_error("invalid-namespace", "The root element must be <stream:stream/>")
        elif root.defaultUri != namespaces.CLIENT:
            self.stream_error(
                "invalid-namespace", f"The default namespace must be {namespaces.CLIENT}"
            )
        elif domain not in self.settings.domains or self.domain not in (None, domain):
            self.stream_error("host-unknown", "This server does not serve that domain")
        elif not _supported_version(root.getAttribute("version")):
            self.stream_error("unsupported-version", "XMPP 1.0 streams only")
        else:
            self.domain = domain
            self._send_header(domain, self._serialised_features())

    def _serialised_features(self) -> bytes:
        """The features for the stream's state; each state's serialised once per listener."""
        tls_available = not self.secure and self.settings.tls_options is not None
        extras = self.factory.bound_features if self.username is not None else ()
        if self.secure and self.username is None:
            extras = self.factory.secure_preauth_features
        key = (
            self.username is not None,
            self.secure,
            tls_available,
            tuple(self.sasl.offered()),
            tuple(extras),
        )
        cache = self.factory.serialised_features
        serialised = cache.get(key)
        if serialised is None or self.settings.log_traffic:
            serialised = cache[key] = self._serialise(self._features())
        else:
            self.factory.stanzas_out[None] += 1
        return serialised

    def _features(self) -> domish.Element:
        features = domish.Element((namespaces.STREAMS, "features"))
        if self.username is not None:
            features.addElement((namespaces.BIND, "bind"))
            features.addElement((namespaces.SESSION, "session")).addElement("optional")
            for extra in self.factory.bound_features:
                features.addChild(extra)
            return features
        tls_available = not self.secure and self.settings.tls_options is not None
        if tls_available:
            starttls = features.addElement((namespaces.TLS, "starttls"))
            if self.settings.starttls_required:
                starttls.addElement("required")
                return features
        if self.secure:
            for extra in self.factory.secure_preauth_features:
                features.addChild(extra)
        mechanisms = self.sasl.offered()
        if mechanisms:
            element = features.addElement((namespaces.SASL, "mechanisms"))
            for name in mechanisms:
                element.addElement("mechanism", content=name)
        return features

    def _on_stream_end(self) -> None:
        if not self.closed:
            self.send(b"</stream:stream>")
            self._close()

    # -- elements --------------------------------------------------------------------------

    def _on_element(self, element: domish.Element) -> None:
        if self.closed:
            return
        if self.jid is not None and element.uri == namespaces.CLIENT:
            self._on_stanza(element)
        elif element.uri == namespaces.TLS and element.name == "starttls":
            self._start_tls()
        elif element.uri == namespaces.SASL:
            if self.username is not None:
                self.stream_error("policy-violation", "Already authenticated")
            else:
                self.sasl.handle(element)
        elif element.uri == namespaces.CLIENT and element.name in STANZA_NAMES:
            self._on_stanza_before_bind(element)
        elif element.uri == namespaces.STREAMS and element.name == "error":
            log.info("{peer} sent a stream error", peer=self.log_name())
            self._on_stream_end()
        elif self.jid is not None:
            # Stream management, client state indication: the session's business.
            self.session.nonza_received(element)
        elif element.uri == namespaces.SM:
            self._resume(element)
        else:
            self.stream_error("unsupported-stanza-type", f"Unexpected <{element.name}/>")

    def _resume(self, element: domish.Element) -> None:
        """Stream management (XEP-0198) before binding: <resume/> instead of binding."""
        if self.username is None:
            self.stream_error("not-authorized", "Authenticate first")
        elif element.name == "resume":
            user = JID(tuple=(self.username, self.domain, None))
            session = self.factory.im.resume_session(self, user, element)
            if session is not None:
                self._session_opened(session.jid, session)
                log.info("{peer} resumed {jid}", peer=self.log_name(), jid=self.jid.full())
        else:
            failed = domish.Element((namespaces.SM, "failed"))
            failed.addElement((namespaces.STANZAS, "unexpected-request"))
            self.send(failed)

    def _start_tls(self) -> None:
        if self.secure or self.settings.tls_options is None or self.username is not None:
            self.send(domish.Element((namespaces.TLS, "failure")))
            self.send(b"</stream:stream>")
            self._close()
            return
        self.send(domish.Element((namespaces.TLS, "proceed")))
        options = self.settings.tls_options
        if self.settings.client_certificates is not None:
            options = self._certificate_check = ClientCertificateCheck(
                options, self.settings.client_certificates
            )
        self.transport.startTLS(options)
        speed_up(self.transport, self.factory.tls_writes)
        self.secure = True
        self._direct_writes = False
        self._new_parser()

    def handshakeCompleted(self) -> None:
        """TLS is up (before the client's next stream header is read): keep what a verified
        client certificate says, for SASL EXTERNAL."""
        self.tls_established = True
        check = self._certificate_check
        if check is None:
            return
        certificate = check.verified_certificate
        if certificate is None:
            log.info(
                "{peer}: no verified client certificate ({problem}), EXTERNAL not offered",
                peer=self.log_name(),
                problem=check.problem,
            )
            return
        self.client_identities = certificate_identities(certificate)
        log.info(
            "{peer}: verified client certificate, xmppAddrs {xmpp_addrs}, CN {common_name!r}",
            peer=self.log_name(),
            xmpp_addrs=list(self.client_identities.xmpp_addrs),
            common_name=self.client_identities.common_name,
        )

    def authenticated(self, username: str) -> None:
        """SASL succeeded: the client restarts the stream (RFC 6120 §6.4.6)."""
        self.username = username
        # Debug: the "bound" line that follows is the one info line of a successful login.
        log.debug(
            "{peer} authenticated as {user}@{domain}",
            peer=self.log_name(),
            user=username,
            domain=self.domain,
        )
        self._new_parser()

    def _on_stanza_before_bind(self, stanza: domish.Element) -> None:
        if self.username is None:
            handler = self._preauth_handler(stanza)
            if handler is None:
                self.stream_error("not-authorized", "Authenticate first")
            else:
                handler(self, stanza)
        elif stanza.name == "iq" and bind.is_bind_request(stanza):
            bind.bind_resource(self, stanza)
        else:
            self.stream_error("not-authorized", "Bind a resource first")

    def _preauth_handler(self, stanza: domish.Element) -> Callable | None:
        """The handler of an IQ allowed before authentication (in-band registration)."""
        payload = next(stanza.elements(), None) if stanza.name == "iq" else None
        if payload is None:
            return None
        return self.factory.preauth_iq.get((payload.uri, payload.name))

    def bound(self, jid: JID) -> None:
        """Resource binding succeeded: the session is open for routing."""
        self._session_opened(jid, self.factory.im.open_session(self, jid))
        log.info("{peer} bound {jid}", peer=self.log_name(), jid=jid.full())

    def _session_opened(self, jid: JID, session: BoundSession) -> None:
        self.jid = jid
        self._full_jid = jid.full()  # what every stanza from the client is stamped with
        self.session = session
        self.bound_at = self.factory.clock.seconds()
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self.factory.forget_unbound(self)

    def _on_stanza(self, stanza: domish.Element) -> None:
        if stanza.name not in STANZA_NAMES:
            self.stream_error("unsupported-stanza-type", f"Unexpected <{stanza.name}/>")
            return
        stanza.attributes["from"] = self._full_jid
        self.factory.stanzas_in[stanza.name] += 1
        self._direct_writes = False  # negotiation is over (see _write)
        try:
            self.session.stanza_received(stanza)
        except Exception:
            # A bug handling one stanza must not end the session or affect others.
            log.failure("routing a stanza from {jid}", jid=self.jid.full())
            if stanza.getAttribute("type") not in ("error", "result"):
                # Through the session: a stanza it sends is one stream management counts.
                self.session.send(
                    error_response(error.StanzaError("internal-server-error"), stanza)
                )

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        if self.jid is None:
            self.stream_error("connection-timeout", "Not authenticated and bound in time")

    def log_name(self) -> str:
        if self.jid is not None:
            return self.jid.full()
        peer = getattr(self, "peer", None)
        return describe_address(peer) if peer is not None else "?"


_NOT_COUNTED = object()

_STANZA_START = re.compile(rb"<(message|presence|iq)[\s/>]")
_KINDS = {name.encode(): name for name in STANZA_NAMES}


def _sent_stanza_kind(data: bytes) -> str | None:
    """The kind of a serialised stanza (message, presence, iq); None for other stream data."""
    start = _STANZA_START.match(data)
    return _KINDS[start[1]] if start else None


class WriteTurns:
    """Numbers the reactor turns in which streams wrote straight to their sockets: a turn ends
    (the number moves on) before the reactor next polls, once anything was written directly."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.number = 0
        self._next = None

    def current(self) -> int:
        """The number of this turn, which will have ended when the reactor next polls."""
        if self._next is None:
            self._next = self._clock.callLater(0, self._advance)
        return self.number

    def _advance(self) -> None:
        self._next = None
        self.number += 1


def _ignore(*args: object) -> None:
    pass


def _supported_version(version: str | None) -> bool:
    try:
        major, _minor = (int(part) for part in (version or "").split("."))
    except ValueError:
        return False
    return major == 1


class C2SFactory(protocol.ServerFactory):
    """Builds a C2SStream per connection; shared state lives here."""

    noisy = False

    def __init__(
        self,
        settings: C2SSettings,
        *,
        accounts: object,
        im: SessionOpener,
        clock: IReactorTime | None = None,
        mechanism_factory: Callable | None = None,
        auth_failures: AuthFailureBudget | None = None,
    ) -> None:
        from twisted.internet import reactor

        from mim_twisted.xmpp.sasl import mechanism_factory as default_mechanism_factory

        self.settings = settings
        self.accounts = accounts
        self.im = im  # opens a session for each bound resource
        self.clock = clock or reactor
        self.mechanism_factory = mechanism_factory or default_mechanism_factory
        # Failed logins per address and account; the listeners of one server share them.
        self.auth_failures = auth_failures or AuthFailureBudget(settings.failure_budget)
        # Extension points: features offered after authentication, features offered before it
        # on an encrypted stream, and IQ handlers `handler(stream, iq)` for requests allowed
        # before authentication (keyed by payload namespace and name).
        self.bound_features: list[domish.Element] = []
        self.secure_preauth_features: list[domish.Element] = []
        self.streams: set[C2SStream] = set()
        self._unbound: Counter[str] = Counter()
        self._unbound_hosts: dict[C2SStream, str] = {}
        self.preauth_iq: dict[tuple[str, str], Callable] = {}
        # Counted here, read by the metrics and the admin socket.
        self.stanzas_in: Counter[str] = Counter()
        self.stanzas_out: Counter[str | None] = Counter()  # None: not a stanza
        self.logins: Counter[tuple[str, str]] = Counter()  # (mechanism, "success" | "failure")
        self.tls_failures = 0
        self.write_turns = WriteTurns(self.clock)
        self.tls_writes = TurnWrites(self.clock)  # see mim_twisted.xmpp.tlswrite
        # Stream features by the stream's state (see C2SStream._serialised_features).
        self.serialised_features: dict[tuple, bytes] = {}

    def buildProtocol(self, addr: object) -> C2SStream:
        return C2SStream(self)

    # Connections not yet bound cost memory before anyone has proved who they are: each peer
    # address may hold only `settings.max_unbound_per_address` of them at a time. Peers with no
    # IP address (a UNIX socket's) are not counted: one would hold the place of all the others.

    def admit_unbound(self, stream: C2SStream) -> bool:
        host = ip_address_of(stream.peer)
        if host is None:
            return True
        if self._unbound[host] >= self.settings.max_unbound_per_address:
            return False
        self._unbound[host] += 1
        self._unbound_hosts[stream] = host
        return True

    def forget_unbound(self, stream: C2SStream) -> None:
        host = self._unbound_hosts.pop(stream, _NOT_COUNTED)
        if host is not _NOT_COUNTED:
            self._unbound[host] -= 1
            if not self._unbound[host]:
                del self._unbound[host]

    def disconnect_all(self, grace: float) -> defer.Deferred:
        """Close every connection with <system-shutdown/>; cut those still open after `grace`."""
        streams = list(self.streams)
        for stream in streams:
            stream.stream_error("system-shutdown", "The server is shutting down")
        lost = defer.DeferredList([stream.lost for stream in streams])
        timer = self.clock.callLater(grace, self._abort, streams)
        return lost.addBoth(lambda _: timer.active() and timer.cancel())

    @staticmethod
    def _abort(streams: list[C2SStream]) -> None:
        for stream in streams:
            if stream.transport is not None and not stream.lost.called:
                stream.transport.abortConnection()
