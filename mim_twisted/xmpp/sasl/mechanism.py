"""What the SASL negotiation drives: one ISaslMechanism per authentication attempt.

Also what every mechanism is given (a SaslContext describing the stream), and the pieces every
password mechanism shares: turning the name a client sent into an account name and reading that
account's stored credentials.
"""

from dataclasses import dataclass

from twisted.logger import Logger
from zope.interface import Attribute, Interface

from mim_twisted.auth.certs import CertificateIdentities, ExternalSettings
from mim_twisted.auth.errors import SaslError
from mim_twisted.auth.scram import DEFAULT_ITERATIONS, ScramCredentials
from mim_twisted.storage.interfaces import IAccountStore
from mim_twisted.xmpp.jids import nodeprep_cached

log = Logger()


@dataclass(frozen=True)
class SaslContext:
    """The stream one attempt runs on, as a mechanism sees it.

    ``domain`` is the stream's domain and ``domains`` all served domains (just ``domain`` when
    left empty); ``secure`` tells whether TLS is up; ``client_identities`` holds what a verified
    client certificate says (None without one); ``external`` the EXTERNAL settings; ``peer``
    names the connection in logs.
    """

    domain: str
    accounts: IAccountStore
    secure: bool = False
    domains: frozenset[str] = frozenset()
    client_identities: CertificateIdentities | None = None
    external: ExternalSettings = ExternalSettings()
    peer: str = "?"
    # The iteration count of new accounts: unknown accounts are given decoys that look alike.
    scram_iterations: int = DEFAULT_ITERATIONS

    def __post_init__(self) -> None:
        if not self.domains:
            object.__setattr__(self, "domains", frozenset({self.domain}))


@dataclass(frozen=True)
class Challenge:
    """Send ``<challenge/>`` with ``data`` and wait for the client's response."""

    data: bytes


@dataclass(frozen=True)
class Success:
    """The client is ``username`` (nodeprepped) on the stream's domain.

    ``authzid`` is the authorisation identity exactly as the client sent it, None if it sent
    none; the negotiation checks it (a mechanism that checked it itself, like EXTERNAL, gives
    None). ``additional_data`` goes into ``<success/>``.
    """

    username: str
    authzid: str | None = None
    additional_data: bytes | None = None


class ISaslMechanism(Interface):
    """The server side of one attempt with one mechanism, created for that attempt.

    Implementations are classes called with the attempt's SaslContext.
    """

    name = Attribute("The mechanism name as offered, e.g. 'SCRAM-SHA-256'.")
    username = Attribute(
        "The account (nodeprepped localpart) the client's credentials name, once read; None"
        " before, or when they name none. Failures are counted and logged against it."
    )

    # zope.interface methods are declared without self.
    def start(initial_response):  # noqa: N805
        """Begin with the ``<auth/>`` payload (bytes, or None if it had none).

        Returns a Deferred firing with a Challenge or a Success, or failing with SaslError.
        """

    def respond(response):  # noqa: N805
        """Continue with the payload (bytes) of a ``<response/>``; results as for ``start``."""


def account_name(username: str) -> str:
    """The account an authentication identity names: its nodeprep form, or not-authorized."""
    try:
        prepared = nodeprep_cached(username)
    except UnicodeError:
        raise SaslError("not-authorized") from None
    if not prepared:
        raise SaslError("not-authorized")
    return prepared


async def stored_credentials(
    accounts: IAccountStore, domain: str, username: str, mechanisms: tuple[str, ...]
) -> ScramCredentials | None:
    """The account's credentials for the first of ``mechanisms`` it has, None if it has none.

    Unreadable stored credentials are the server's fault, not the client's: they are logged and
    the attempt fails with temporary-auth-failure.
    """
    stored = await accounts.get_credentials(domain, username) or {}
    for mechanism in mechanisms:
        if mechanism in stored:
            try:
                return ScramCredentials.from_text(mechanism, stored[mechanism])
            except ValueError as e:
                log.error(
                    "Unreadable {mechanism} credentials of {username}@{domain}: {error}",
                    mechanism=mechanism,
                    username=username,
                    domain=domain,
                    error=str(e),
                )
                raise SaslError("temporary-auth-failure") from e
    return None
