"""Who a client certificate proves the client to be: XEP-0178 rules for SASL EXTERNAL.

Pure logic, no I/O. `certificate_identities` reads the identities a (verified) certificate
carries: every SubjectAltName otherName of type id-on-xmppAddr and the subject CN.
`verify_external_identity` decides which account the client is, from those identities, the
authorisation identity it sent (if any) and the stream's domain, by trying the configured
verification methods in order.

A verification method is a function ``method(claim: ExternalClaim) -> Identity | None``:

- it returns the Identity (bare JID) it accepts,
- returns None when the certificate holds nothing it can use (the next method is tried),
- or raises CertificateRefused(condition, reason) when it refuses the claim.

The first method that accepts decides. When none accepts, the first refusal is reported, or
``not-authorized`` when every method returned None. Extensions add methods through the
server's registry (mim_twisted.extensions) and operators list them in ``auth.sasl_external``.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.words.protocols.jabber import jid
from twisted.words.protocols.jabber.xmpp_stringprep import nodeprep

from mim_twisted.auth.errors import SASL_CONDITIONS

# RFC 6120 §13.7.1.4: id-on-xmppAddr, an otherName whose value is a UTF8String.
ID_ON_XMPPADDR = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")
_UTF8STRING_TAG = 0x0C
# RFC 7622 §3.3, §3.2: at most 1023 octets in a localpart or a domainpart.
_MAX_PART = 1023


class Identity(NamedTuple):
    """A bare JID, both parts normalised (nodeprep, nameprep)."""

    localpart: str
    domain: str

    def __str__(self) -> str:
        return f"{self.localpart}@{self.domain}"


@dataclass(frozen=True)
class CertificateIdentities:
    """What a client certificate says about its holder.

    ``xmpp_addrs`` are the id-on-xmppAddr values as written in the certificate (not normalised,
    in certificate order); ``common_name`` is the subject CN when there is exactly one.
    ``certificate`` is the certificate itself, for verification methods that read other fields.
    """

    xmpp_addrs: tuple[str, ...] = ()
    common_name: str | None = None
    certificate: x509.Certificate | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ExternalSettings:
    """The operator's choices for SASL EXTERNAL (``auth.sasl_external`` and friends)."""

    methods: tuple[str, ...] = ("standard",)
    common_name_prefix: str = ""
    common_name_suffix: str = ""
    require_account: bool = True  # auth.cert_accounts = "existing"
    # The functions behind the names in ``methods``: the server's registry (built-in and
    # extension methods). A factory, because the built-in table is defined further down.
    verifiers: Mapping[str, "VerificationMethod"] = field(
        default_factory=lambda: BUILTIN_VERIFICATION_METHODS, compare=False, repr=False
    )


@dataclass(frozen=True)
class ExternalClaim:
    """One EXTERNAL attempt: the certificate's identities and what the client asked for.

    ``authzid`` is the authorisation identity as sent, None when the client sent none (an
    empty response or "="). ``domain`` is the stream's domain, ``domains`` all served domains.
    """

    identities: CertificateIdentities
    authzid: str | None
    domain: str
    domains: frozenset[str]
    settings: ExternalSettings = field(default_factory=ExternalSettings)


class CertificateRefused(Exception):
    """A verification method refuses the claim.

    ``condition`` is the RFC 6120 SASL condition for the client; ``reason`` says why, for the
    log (it names identities, never secrets).
    """

    def __init__(self, condition: str, reason: str) -> None:
        if condition not in SASL_CONDITIONS:
            raise ValueError(f"unknown SASL condition {condition!r}")
        super().__init__(condition, reason)
        self.condition = condition
        self.reason = reason


@dataclass(frozen=True)
class ExternalDecision:
    """An accepted claim: who the client is, and which method said so."""

    identity: Identity
    method: str


VerificationMethod = Callable[[ExternalClaim], Identity | None]


# -- reading a certificate -----------------------------------------------------------------


def certificate_identities(certificate: x509.Certificate) -> CertificateIdentities:
    """The xmppAddrs and CN of ``certificate``; xmppAddr values that do not decode are skipped."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = []
    else:
        names = san.get_values_for_type(x509.OtherName)
    addrs = []
    for name in names:
        if name.type_id == ID_ON_XMPPADDR:
            value = decode_utf8_string(name.value)
            if value:
                addrs.append(value)
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = common_names[0].value if len(common_names) == 1 else None
    if not isinstance(common_name, str) or not common_name:
        common_name = None
    return CertificateIdentities(tuple(addrs), common_name, certificate)


def decode_utf8_string(der: bytes) -> str | None:
    """The text of a DER-encoded ASN.1 UTF8String, None if ``der`` is anything else."""
    if len(der) < 2 or der[0] != _UTF8STRING_TAG:
        return None
    length, start = der[1], 2
    if length & 0x80:  # long form: the low bits count the length octets that follow
        count = length & 0x7F
        if count == 0 or count > 4 or len(der) < 2 + count:
            return None
        length, start = int.from_bytes(der[2 : 2 + count], "big"), 2 + count
    if len(der) != start + length:
        return None
    try:
        return der[start:].decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- JIDs ------------------------------------------------------------------------------------


def bare_identity(text: str) -> Identity | None:
    """The normalised bare JID of ``text``; None if it is not a JID with a localpart.

    A resource is ignored: the session's resource comes from binding, not from here. A final
    dot of the domain is dropped (RFC 7622 §3.2).
    """
    bare = text.split("/", 1)[0]
    localpart, at, domain = bare.partition("@")
    if not at or not localpart:
        return None
    try:
        user, host, _ = jid.prep(localpart, domain.removesuffix("."), None)
    except (jid.InvalidFormat, UnicodeError, ValueError, IndexError):
        return None
    if not user or not _fits(user) or not _fits(host):
        return None
    return Identity(user, host)


def _fits(part: str) -> bool:
    return len(part.encode("utf-8")) <= _MAX_PART


def requested_identity(claim: ExternalClaim) -> Identity:
    """The authzid as an Identity; invalid-authzid when it is not a JID with a localpart."""
    identity = bare_identity(claim.authzid or "")
    if identity is None:
        raise CertificateRefused("invalid-authzid", f"authzid {claim.authzid!r} is not a user JID")
    return identity


def on_stream_domain(identity: Identity, claim: ExternalClaim, source: str) -> Identity:
    """``identity`` if it is an account of the stream's domain, else not-authorized."""
    if identity.domain not in claim.domains:
        raise CertificateRefused(
            "not-authorized", f"{source} {identity} is on {identity.domain}, not served here"
        )
    if identity.domain != claim.domain:
        raise CertificateRefused(
            "not-authorized", f"{source} {identity} is not on this stream's domain {claim.domain}"
        )
    return identity


# -- the built-in methods ------------------------------------------------------------------


def verify_standard(claim: ExternalClaim) -> Identity | None:
    """XEP-0178 §3 with the certificate's xmppAddrs; None when it has none.

    No authzid: exactly one xmppAddr is the identity; with several the client must choose
    (invalid-authzid). An authzid must name one of the xmppAddrs (not-authorized otherwise).
    """
    addrs = claim.identities.xmpp_addrs
    if not addrs:
        return None
    if claim.authzid is None:
        if len(addrs) > 1:
            raise CertificateRefused(
                "invalid-authzid",
                f"the certificate holds {len(addrs)} xmppAddrs and no authzid chose one",
            )
        identity = bare_identity(addrs[0])
        if identity is None:
            raise CertificateRefused("not-authorized", f"xmppAddr {addrs[0]!r} is not a user JID")
        return on_stream_domain(identity, claim, "xmppAddr")
    wanted = requested_identity(claim)
    if wanted not in (bare_identity(addr) for addr in addrs):
        raise CertificateRefused(
            "not-authorized", f"authzid {wanted} is not among the certificate's xmppAddrs"
        )
    return on_stream_domain(wanted, claim, "authzid")


def verify_common_name(claim: ExternalClaim) -> Identity | None:
    """The CN (with the configured prefix and suffix) as the localpart on the stream's domain.

    Only for certificates without xmppAddr and with a CN (None otherwise). An authzid must name
    that same account, else invalid-authzid (XEP-0178 §3, "mapped JID does not match").
    """
    identities = claim.identities
    if identities.xmpp_addrs or identities.common_name is None:
        return None
    settings = claim.settings
    name = f"{settings.common_name_prefix}{identities.common_name}{settings.common_name_suffix}"
    try:
        localpart = nodeprep.prepare(name)
    except UnicodeError:
        localpart = ""
    if not localpart or not _fits(localpart):
        raise CertificateRefused("not-authorized", f"CN {name!r} is not a valid localpart")
    mapped = Identity(localpart, claim.domain)
    if claim.authzid is not None:
        wanted = requested_identity(claim)
        if wanted != mapped:
            raise CertificateRefused(
                "invalid-authzid", f"authzid {wanted} is not {mapped}, the account of the CN"
            )
    return mapped


def verify_auth_id(claim: ExternalClaim) -> Identity | None:
    """Trust the authzid, on the stream's domain, for certificates that hold no xmppAddr.

    For PKIs that put no XMPP identity in their certificates: any holder of a certificate the
    configured CAs signed may be any account. A certificate with xmppAddrs is left to
    "standard": this method never lets an authzid override what the certificate states.
    """
    if claim.identities.xmpp_addrs or claim.authzid is None:
        return None
    return on_stream_domain(requested_identity(claim), claim, "authzid")


# Read-only: a server's registry starts from a copy (mim_twisted.extensions.ServerRegistry).
BUILTIN_VERIFICATION_METHODS: Mapping[str, VerificationMethod] = MappingProxyType(
    {
        "standard": verify_standard,
        "common_name": verify_common_name,
        "auth_id": verify_auth_id,
    }
)


def verify_external_identity(claim: ExternalClaim) -> ExternalDecision:
    """The account the claim proves, by the first configured method that accepts it.

    Raises CertificateRefused with the first refusal, or not-authorized when no method found
    an identity in the certificate. Whatever a method returns must be on the stream's domain.
    """
    refusals: list[CertificateRefused] = []
    for name in claim.settings.methods:
        try:
            identity = claim.settings.verifiers[name](claim)
            if identity is not None:
                return ExternalDecision(on_stream_domain(identity, claim, "identity"), name)
        except CertificateRefused as refusal:
            refusals.append(CertificateRefused(refusal.condition, f"{name}: {refusal.reason}"))
    if refusals:
        raise refusals[0]
    methods = ", ".join(claim.settings.methods)
    raise CertificateRefused(
        "not-authorized", f"no identity in the certificate for the methods {methods}"
    )
