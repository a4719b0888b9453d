"""XEP-0115 entity capabilities: the verification string, and learning what clients support.

The pure part (`verification_string`, `caps_hash`, `parse_disco_info`) follows §5.1 and the
well-formedness checks of §5.4. `CapsService` reads the <c/> of clients' presences; for a `ver`
it has not seen it asks that one client for its disco#info (node#ver), checks the hash, and caches
the features under (hash, ver) for every client announcing the same value. PEP reads the result
through `features_of` / `wants_notify` and listens on `on_caps_learned`; the session table is
told of each change of a session's features (`SessionManager.sessions_changed`).

The cache lives in this process only: with several nodes each learns a `ver` once on its own,
which costs one query per node and never a wrong answer.

What clients can make the server wait for is bounded. A session is only ever asked about the
caps it announces now (a new `ver` cancels the query about its previous one), so it has at most
one query outstanding. At most `max_unknown` distinct `ver`s are learned at once: a presence
announcing yet another one is left unasked, and its session's features stay unknown until it
announces its caps again when there is room.
"""

import base64
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.xish import domish
from wokkel import data_form
from wokkel.disco import NS_DISCO_INFO, DiscoInfo

from mim_twisted.im.sessions import Session

if TYPE_CHECKING:
    from mim_twisted.im.router import Router

log = Logger()

NS_CAPS = "http://jabber.org/protocol/caps"
XML_LANG = ("http://www.w3.org/XML/1998/namespace", "lang")

# The caps node of this server software (§4: a URI naming the application).
SERVER_NODE = "urn:mim-twisted:caps"

# Names from the IANA "Hash Function Textual Names" registry that §4 refers to, with the
# hashlib name of each. sha-1 is the mandatory one (Security Considerations).
HASH_FUNCTIONS = {
    "sha-1": "sha1",
    "sha-224": "sha224",
    "sha-256": "sha256",
    "sha-384": "sha384",
    "sha-512": "sha512",
}


class Identity(NamedTuple):
    """A disco identity as the verification string needs it (wokkel's loses xml:lang)."""

    category: str
    type: str
    lang: str = ""
    name: str = ""


class IllFormed(ValueError):
    """A disco#info result that §5.4 says not to process."""


# -- the pure part ---------------------------------------------------------------------------


def verification_string(
    identities: Iterable[Identity], features: Iterable[str], forms: Iterable[data_form.Form]
) -> str:
    """The string S of §5.1, before hashing.

    ``forms`` are XEP-0128 extension forms as wokkel parses them (`formNamespace` holds the
    FORM_TYPE); forms without one are left out, as §5.4 says. Python orders str by code point,
    which for UTF-8 is the "i;octet" order §5.1 asks for.
    """
    parts = [f"{i.category}/{i.type}/{i.lang}/{i.name}<" for i in sorted(identities)]
    parts += [f"{feature}<" for feature in sorted(features)]
    typed = sorted((f for f in forms if f.formNamespace), key=lambda f: f.formNamespace)
    for form in typed:
        parts.append(f"{form.formNamespace}<")
        for field in sorted((f for f in form.fieldList if f.var), key=lambda f: f.var):
            parts.append(f"{field.var}<")
            parts += [f"{value}<" for value in sorted(map(str, field.values))]
    return "".join(parts)


def caps_hash(
    algo: str,
    identities: Iterable[Identity],
    features: Iterable[str],
    forms: Iterable[data_form.Form] = (),
) -> str:
    """The base64 `ver` of §5.1 with hash function ``algo`` ("sha-1", "sha-256", ...)."""
    try:
        name = HASH_FUNCTIONS[algo]
    except KeyError:
        raise ValueError(f"unsupported caps hash {algo!r}") from None
    text = verification_string(identities, features, forms)
    return base64.b64encode(hashlib.new(name, text.encode("utf-8")).digest()).decode("ascii")


def parse_disco_info(
    query: domish.Element,
) -> tuple[list[Identity], list[str], list[data_form.Form]]:
    """Identities, features and typed forms of a disco#info <query/>; IllFormed per §5.4.

    Forms whose FORM_TYPE is missing or not hidden are dropped ("ignore the form but continue").
    """
    identities: list[Identity] = []
    features: list[str] = []
    forms: list[data_form.Form] = []
    for child in query.elements():
        if (child.uri, child.name) == (NS_DISCO_INFO, "identity"):
            identities.append(
                Identity(
                    child.getAttribute("category", ""),
                    child.getAttribute("type", ""),
                    child.getAttribute(XML_LANG, ""),
                    child.getAttribute("name", ""),
                )
            )
        elif (child.uri, child.name) == (NS_DISCO_INFO, "feature"):
            features.append(child.getAttribute("var", ""))
        elif (child.uri, child.name) == (data_form.NS_X_DATA, "x"):
            _check_form_type(child)
            try:
                form = data_form.Form.fromElement(child)
            except data_form.Error as e:  # a field name given twice
                raise IllFormed(str(e)) from None
            if form.formNamespace:
                forms.append(form)
    if len(set(identities)) != len(identities):
        raise IllFormed("an identity is listed twice")
    if len(set(features)) != len(features):
        raise IllFormed("a feature is listed twice")
    form_types = [form.formNamespace for form in forms]
    if len(set(form_types)) != len(form_types):
        raise IllFormed("two forms have the same FORM_TYPE")
    return identities, features, forms


def _check_form_type(form: domish.Element) -> None:
    for field in form.elements(data_form.NS_X_DATA, "field"):
        if field.getAttribute("var") == "FORM_TYPE":
            values = {str(value) for value in field.elements(data_form.NS_X_DATA, "value")}
            if len(values) > 1:
                raise IllFormed("FORM_TYPE has several values")


def hash_disco_info(algo: str, query: domish.Element) -> str:
    """The `ver` of a disco#info <query/>; IllFormed or ValueError (unknown ``algo``)."""
    return caps_hash(algo, *parse_disco_info(query))


def server_caps_element(info: DiscoInfo) -> domish.Element:
    """The server's <c/> for the stream features after authentication (§6.3).

    The hash is taken over ``info`` as serialised, i.e. exactly what a client would receive
    when it checks it with a disco#info query to SERVER_NODE#ver.
    """
    caps = domish.Element((NS_CAPS, "c"))
    caps["hash"] = "sha-1"
    caps["node"] = SERVER_NODE
    caps["ver"] = hash_disco_info("sha-1", info.toElement())
    return caps


# -- learning the capabilities of clients ----------------------------------------------------


class CapsService:
    """Learns, for each bound session, the features its latest caps announce (kept on the
    session: `Session.caps`, `Session.caps_features`).

    `presence_received` is called by the presence handling for each available presence a local
    session sends, `session_ended` when the session goes away. Queries go through
    `router.query`, whose clock also runs their timeout.
    """

    def __init__(
        self,
        router: "Router",
        *,
        timeout: float = 30.0,
        cache_size: int = 10000,
        max_unknown: int = 1000,
    ) -> None:
        self.router = router
        self.timeout = timeout
        self.cache_size = cache_size
        self.max_unknown = max_unknown
        # Called with the session once its features are known (PEP sends last items then).
        self.on_caps_learned: list[Callable[[Session], object]] = []
        # (hash, ver) -> verified features, least recently used first.
        self._cache: OrderedDict[tuple[str, str], frozenset[str]] = OrderedDict()
        # (hash, ver) being learned -> the (session, caps node) that announced it, in order;
        # the first is the one being asked, the others wait for its answer.
        self._waiting: dict[tuple[str, str], list[tuple[Session, str]]] = {}
        self._asking: dict[tuple[str, str], defer.Deferred] = {}
        # Sessions asked about a `ver` whose hash function we lack -> that query.
        self._unverified: dict[Session, defer.Deferred] = {}
        # Whether presences are being left unasked for want of room (logged once per episode).
        self._full = False

    # -- API for PEP -------------------------------------------------------------------------

    def features_of(self, session: Session) -> frozenset[str] | None:
        """The features a session's caps announce; None while unknown (or no caps)."""
        return session.caps_features

    def wants_notify(self, session: Session, namespace: str) -> bool:
        """Whether the session asked for PEP notifications of ``namespace`` (XEP-0163 §4)."""
        return namespace + "+notify" in (session.caps_features or ())

    # -- events ------------------------------------------------------------------------------

    def presence_received(self, session: Session, presence: domish.Element) -> None:
        if presence.getAttribute("type") is not None:
            return
        caps = next(presence.elements(NS_CAPS, "c"), None)
        if caps is None:
            # Receivers must not expect <c/> on every presence ("Caps Optimization"): a
            # presence without it keeps what the session announced.
            return
        algo, node, ver = (caps.getAttribute(name) for name in ("hash", "node", "ver"))
        if not (algo and node and ver):
            return  # the legacy format, without 'hash', cannot be verified: ignored
        key = (algo, ver)
        if session.caps == key:
            return
        self._withdraw(session)
        session.caps = key
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self._learned(session, cached)
        elif algo not in HASH_FUNCTIONS:
            self._ask_unverified(session, node, key)
        elif key in self._waiting:
            self._waiting[key].append((session, node))
        elif len(self._waiting) < self.max_unknown:
            self._full = False
            self._waiting[key] = [(session, node)]
            self._ask(key)
        else:
            self._leave_unasked(session, key)

    def session_ended(self, session: Session) -> None:
        self._withdraw(session)

    def _withdraw(self, session: Session) -> None:
        """Forget what the session announced, and stop asking it about that."""
        key, session.caps = session.caps, None
        if session.caps_features is not None:
            session.caps_features = None
            self.router.sessions.sessions_changed(session.jid.userhost())
        unverified = self._unverified.pop(session, None)
        if unverified is not None:
            unverified.cancel()
        waiting = self._waiting.get(key)
        if not waiting:
            return
        if waiting[0][0] is session:
            # Its answer is no longer wanted: move on to the next session now, not at the timeout.
            self._asking[key].cancel()
        else:
            waiting[:] = [entry for entry in waiting if entry[0] is not session]

    def _leave_unasked(self, session: Session, key: tuple[str, str]) -> None:
        # Not recorded as announced, so the session's next presence with these caps tries again.
        session.caps = None
        if not self._full:
            self._full = True
            log.warn(
                "{count} caps vers are being learned already: not asking {jid} about {ver}, "
                "nor any other new ver until there is room",
                count=len(self._waiting),
                jid=session.jid.full(),
                ver=key[1],
            )

    # -- queries -----------------------------------------------------------------------------

    def _query(self, session: Session, node: str, ver: str) -> defer.Deferred:
        iq = domish.Element((None, "iq"))
        iq["type"] = "get"
        iq.addElement((NS_DISCO_INFO, "query"))["node"] = f"{node}#{ver}"
        return self.router.query(session, iq, self.timeout)

    def _ask(self, key: tuple[str, str]) -> None:
        """Ask the first waiting session that still announces ``key``."""
        waiting = self._waiting[key]
        while waiting and waiting[0][0].caps != key:
            waiting.pop(0)
        if not waiting:
            del self._waiting[key]
            return
        session, node = waiting[0]
        asking = self._query(session, node, key[1])
        self._asking[key] = asking
        asking.addCallbacks(
            self._answered,
            self._not_answered,
            callbackArgs=(key, session),
            errbackArgs=(key, session),
        )

    def _answered(self, result: domish.Element, key: tuple[str, str], session: Session) -> None:
        algo, ver = key
        try:
            features = _verified_features(result, algo, ver)
        except IllFormed as e:
            log.warn(
                "caps of {jid} not verified ({ver}): {reason}",
                jid=session.jid.full(),
                ver=ver,
                reason=str(e),
            )
            self._try_next(key)
            return
        del self._asking[key]
        self._cache[key] = features
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        for waiter, _ in self._waiting.pop(key):
            if waiter.caps == key:
                self._learned(waiter, features)

    def _not_answered(self, failure: Failure, key: tuple[str, str], session: Session) -> None:
        if not failure.check(defer.CancelledError):
            _log_no_answer(failure, session)
        self._try_next(key)

    def _try_next(self, key: tuple[str, str]) -> None:
        # The asked session stays marked as announcing `key`, so its later presences with the
        # same ver do not ask it again; §5.4 says to try another entity with that value instead.
        del self._asking[key]
        self._waiting[key].pop(0)
        self._ask(key)

    def _ask_unverified(self, session: Session, node: str, key: tuple[str, str]) -> None:
        # §5.4 step 2: with a hash function we lack, the answer is believed for this session
        # alone and never cached.
        def answered(result: domish.Element) -> None:
            del self._unverified[session]
            query = next(result.elements(NS_DISCO_INFO, "query"), None)
            if query is not None:
                features = frozenset(
                    f.getAttribute("var", "") for f in query.elements(NS_DISCO_INFO, "feature")
                )
                self._learned(session, features)

        def not_answered(failure: Failure) -> None:
            if not failure.check(defer.CancelledError):  # withdrawn: already forgotten
                del self._unverified[session]
                _log_no_answer(failure, session)

        asking = self._query(session, node, key[1])
        self._unverified[session] = asking
        asking.addCallbacks(answered, not_answered)

    def _learned(self, session: Session, features: frozenset[str]) -> None:
        if features != session.caps_features:
            session.caps_features = features
            self.router.sessions.sessions_changed(session.jid.userhost())
        for callback in list(self.on_caps_learned):
            try:
                callback(session)
            except Exception:
                log.failure("caps learned callback for {jid}", jid=session.jid.full())


def _log_no_answer(failure: Failure, session: Session) -> None:
    # A client that does not answer (timeout, error reply) simply has no known caps.
    log.info(
        "no caps answer from {jid}: {reason}",
        jid=session.jid.full(),
        reason=failure.getErrorMessage(),
    )


def _verified_features(result: domish.Element, algo: str, ver: str) -> frozenset[str]:
    query = next(result.elements(NS_DISCO_INFO, "query"), None)
    if query is None:
        raise IllFormed("no disco#info query in the result")
    identities, features, forms = parse_disco_info(query)
    if caps_hash(algo, identities, features, forms) != ver:
        raise IllFormed("hash mismatch")
    return frozenset(features)
