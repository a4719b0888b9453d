"""SCRAM (RFC 5802, RFC 7677): stored credentials and the server side of one exchange.

Pure: no Twisted, no I/O. The stream layer wraps ``ScramServer`` in a SASL mechanism
(``mim_twisted.xmpp.sasl.scram``); PLAIN uses ``verify_password`` against the same credentials.
"""

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from mim_twisted.auth.errors import SaslError
from mim_twisted.auth.saslprep import saslprep

HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}
DEFAULT_ITERATIONS = 4096
SALT_LENGTH = 16

_TEXT_VERSION = "v1"

# Keys the decoy salts of unknown users: stable for the life of the process (asking twice about a
# name gives the same answer, as for a real account) yet unpredictable from outside.
_DECOY_SECRET = secrets.token_bytes(32)

# RFC 5802 §7: a saslname is UTF-8 where ',' and '=' only appear escaped as =2C and =3D;
# a nonce is printable ASCII without ','.
_SASLNAME = re.compile(r"(?:[^=,\x00]|=2C|=3D)+")
_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


@dataclass(frozen=True)
class ScramCredentials:
    """The salted keys of one password for one SCRAM mechanism (RFC 5802 §3), never the password."""

    mechanism: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def to_text(self) -> str:
        """``v1,<iterations>,<salt>,<stored key>,<server key>`` with the bytes in base64.

        The version tag lets a later format be told apart. The mechanism is not part of the text
        because the account store keys each text by its mechanism.
        """
        binary = (self.salt, self.stored_key, self.server_key)
        return ",".join([_TEXT_VERSION, str(self.iterations), *map(_b64encode, binary)])

    @classmethod
    def from_text(cls, mechanism: str, text: str) -> "ScramCredentials":
        """Parse ``to_text`` output; ValueError if it is malformed or not for ``mechanism``."""
        size = hashlib.new(_hash_name(mechanism)).digest_size
        fields = text.split(",")
        if len(fields) != 5 or fields[0] != _TEXT_VERSION:
            raise ValueError(f"not {_TEXT_VERSION} SCRAM credentials")
        iterations = fields[1]
        if not (iterations.isascii() and iterations.isdigit() and int(iterations) > 0):
            raise ValueError(f"bad iteration count {iterations!r}")
        # binascii.Error, raised on bad base64, is a ValueError.
        salt, stored_key, server_key = (base64.b64decode(f, validate=True) for f in fields[2:])
        if not salt or len(stored_key) != size or len(server_key) != size:
            raise ValueError(f"bad salt or key length for {mechanism}")
        return cls(mechanism, salt, int(iterations), stored_key, server_key)


def derive_credentials(
    mechanism: str,
    password: str,
    *,
    salt: bytes | None = None,
    iterations: int = DEFAULT_ITERATIONS,
) -> ScramCredentials:
    """The credentials to store for ``password``, with a random salt unless one is given.

    The password is SASLprepped as a stored string: ValueError if that fails or leaves nothing.
    """
    hash_name = _hash_name(mechanism)
    prepared = saslprep(password)
    if not prepared:
        raise ValueError("empty password")
    if iterations < 1:
        raise ValueError("iterations must be positive")
    if salt is None:
        salt = secrets.token_bytes(SALT_LENGTH)
    salted = hashlib.pbkdf2_hmac(hash_name, prepared.encode(), salt, iterations)
    stored_key, server_key = _keys(hash_name, salted)
    return ScramCredentials(mechanism, salt, iterations, stored_key, server_key)


def derive_all(password: str, iterations: int = DEFAULT_ITERATIONS) -> dict[str, str]:
    """What ``IAccountStore`` keeps: one credentials text per mechanism, each its own salt."""
    return {
        mechanism: derive_credentials(mechanism, password, iterations=iterations).to_text()
        for mechanism in HASHES
    }


def verify_password(credentials: ScramCredentials, password: str) -> bool:
    """Whether ``password`` (as sent, e.g. with PLAIN) is the one ``credentials`` were made from."""
    hash_name = _hash_name(credentials.mechanism)
    try:
        # What a client sends is a query string: unassigned code points are allowed.
        prepared = saslprep(password, allow_unassigned=True)
    except ValueError:
        return False
    salted = hashlib.pbkdf2_hmac(
        hash_name, prepared.encode(), credentials.salt, credentials.iterations
    )
    stored_key, _ = _keys(hash_name, salted)
    return hmac.compare_digest(stored_key, credentials.stored_key)


def decoy_credentials(
    mechanism: str, name: str, iterations: int = DEFAULT_ITERATIONS
) -> ScramCredentials:
    """Plausible credentials for an account that does not exist, which no password matches.

    Same salt length as ``derive_credentials`` and the iteration count new accounts get (pass
    the configured one), with a salt derived from ``name``, so an unknown account looks like a
    known one for as long as the process lives.
    """
    size = hashlib.new(_hash_name(mechanism)).digest_size
    seed = hmac.digest(_DECOY_SECRET, f"{mechanism}\0{name}".encode(), "sha256")
    # All-zero keys: a matching proof would need a preimage of the zero hash.
    return ScramCredentials(mechanism, seed[:SALT_LENGTH], iterations, bytes(size), bytes(size))


@dataclass(frozen=True)
class ClientFirst:
    """What a client-first-message says (RFC 5802 §7)."""

    gs2_header: str
    authzid: str | None
    username: str  # unescaped and SASLprepped
    nonce: str  # the client's part of the nonce
    bare: str  # client-first-message-bare as sent: it is part of the signed AuthMessage


class ScramServer:
    """The server side of one SCRAM exchange.

    Steps, in this order: ``read_client_first``, ``server_first``, ``read_client_final``. Each
    raises ``SaslError`` on failure, after which the exchange accepts no further step.
    """

    def __init__(self, mechanism: str, nonce: str | None = None) -> None:
        self.mechanism = mechanism
        self._hash_name = _hash_name(mechanism)
        # The server's part of the nonce; token_urlsafe is printable and comma-free.
        self._server_nonce = secrets.token_urlsafe(18) if nonce is None else nonce
        self._state = "client-first"
        self._client_first: ClientFirst
        self._server_first: str
        self._credentials: ScramCredentials
        self._known_user = False

    def read_client_first(self, data: bytes) -> ClientFirst:
        self._begin("client-first")
        fields = _decode(data).split(",", 2)
        if len(fields) != 3:
            raise SaslError("malformed-request", "truncated GS2 header")
        flag, authzid_field, bare = fields
        if flag.startswith("p="):
            raise SaslError("malformed-request", "channel binding needs a -PLUS mechanism")
        # "y" (the client could bind but thinks we cannot) is fine: no -PLUS is offered.
        if flag not in ("n", "y"):
            raise SaslError("malformed-request", "bad GS2 header")
        authzid = None
        if authzid_field:
            if not authzid_field.startswith("a="):
                raise SaslError("malformed-request", "bad authzid")
            authzid = _decode_saslname(authzid_field[2:])
        attributes = bare.split(",")
        if attributes[0].startswith("m="):
            raise SaslError("malformed-request", "mandatory SCRAM extensions are not supported")
        # Further attributes are extensions, which RFC 5802 §5.1 says to ignore.
        if len(attributes) < 2 or attributes[0][:2] != "n=" or attributes[1][:2] != "r=":
            raise SaslError("malformed-request", "expected n= and r=")
        try:
            username = saslprep(_decode_saslname(attributes[0][2:]), allow_unassigned=True)
        except ValueError:
            raise SaslError("not-authorized", "invalid username") from None
        nonce = attributes[1][2:]
        if not username or not _NONCE.fullmatch(nonce):
            raise SaslError("malformed-request", "empty username or bad nonce")
        self._client_first = ClientFirst(
            gs2_header=f"{flag},{authzid_field},",
            authzid=authzid,
            username=username,
            nonce=nonce,
            bare=bare,
        )
        self._state = "server-first"
        return self._client_first

    def server_first(
        self,
        credentials: ScramCredentials | None,
        *,
        decoy_name: str | None = None,
        decoy_iterations: int = DEFAULT_ITERATIONS,
    ) -> bytes:
        """The server-first-message; ``credentials`` None means the user is unknown.

        An unknown user gets decoy credentials and fails only in ``read_client_final``. Their salt
        derives from ``decoy_name`` (default: the username as sent); pass the account's normalised
        name (with its domain) so that spellings of one name get one salt, as a real account would.
        """
        self._begin("server-first")
        if credentials is None:
            name = self._client_first.username if decoy_name is None else decoy_name
            credentials = decoy_credentials(self.mechanism, name, decoy_iterations)
        elif credentials.mechanism != self.mechanism:
            raise ValueError(f"{credentials.mechanism} credentials for {self.mechanism}")
        else:
            self._known_user = True
        self._credentials = credentials
        self._server_first = (
            f"r={self._client_first.nonce}{self._server_nonce}"
            f",s={_b64encode(credentials.salt)},i={credentials.iterations}"
        )
        self._state = "client-final"
        return self._server_first.encode()

    def read_client_final(self, data: bytes) -> bytes:
        """Check the client's proof; the server-final-message (``v=...``) if it is right."""
        self._begin("client-final")
        text = _decode(data)
        without_proof, _, proof_field = text.rpartition(",")
        # Attributes between r= and p= are extensions, ignored as RFC 5802 §5.1 says.
        fields = without_proof.split(",")
        if len(fields) < 2 or (fields[0][:2], fields[1][:2], proof_field[:2]) != ("c=", "r=", "p="):
            raise SaslError("malformed-request", "expected c=, r= and p=")
        channel_binding, nonce = fields[:2]
        # Without channel binding the c= attribute just repeats the GS2 header.
        if _b64decode(channel_binding[2:]) != self._client_first.gs2_header.encode():
            raise SaslError("not-authorized", "channel binding does not match the GS2 header")
        if nonce[2:] != self._client_first.nonce + self._server_nonce:
            raise SaslError("not-authorized", "nonce mismatch")
        proof = _b64decode(proof_field[2:])
        credentials = self._credentials
        auth_message = f"{self._client_first.bare},{self._server_first},{without_proof}".encode()
        client_signature = hmac.digest(credentials.stored_key, auth_message, self._hash_name)
        if len(proof) != len(client_signature):
            raise SaslError("malformed-request", "bad proof length")
        client_key = bytes(p ^ s for p, s in zip(proof, client_signature, strict=True))
        stored_key = hashlib.new(self._hash_name, client_key).digest()
        if not (hmac.compare_digest(stored_key, credentials.stored_key) and self._known_user):
            raise SaslError("not-authorized")
        self._state = "done"
        server_signature = hmac.digest(credentials.server_key, auth_message, self._hash_name)
        return b"v=" + base64.b64encode(server_signature)

    def _begin(self, step: str) -> None:
        if self._state != step:
            raise SaslError("malformed-request", f"unexpected SCRAM message, expected {step}")
        # Only a step that completes sets the next state, so a failed exchange stays failed.
        self._state = "failed"


def _hash_name(mechanism: str) -> str:
    try:
        return HASHES[mechanism]
    except KeyError:
        raise ValueError(f"unknown SCRAM mechanism {mechanism!r}") from None


def _keys(hash_name: str, salted_password: bytes) -> tuple[bytes, bytes]:
    """(StoredKey, ServerKey) of a SaltedPassword, RFC 5802 §3."""
    client_key = hmac.digest(salted_password, b"Client Key", hash_name)
    server_key = hmac.digest(salted_password, b"Server Key", hash_name)
    return hashlib.new(hash_name, client_key).digest(), server_key


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise SaslError("malformed-request", "bad base64 in SCRAM message") from None


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("malformed-request", "SCRAM message is not UTF-8") from None


def _decode_saslname(value: str) -> str:
    if not _SASLNAME.fullmatch(value):
        raise SaslError("malformed-request", "bad name encoding")
    # Every '=' in a valid saslname starts an escape, so the replacements cannot overlap.
    return value.replace("=2C", ",").replace("=3D", "=")
