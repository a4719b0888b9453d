"""The storage interfaces: every store returns Deferreds and is reached only through these."""

# zope.interface declares methods without ``self``.
# ruff: noqa: N805

from dataclasses import dataclass, field
from datetime import datetime

from zope.interface import Attribute, Interface

# The keys of an account's credentials mapping (see IAccountStore), all of them required.
CREDENTIAL_MECHANISMS = ("SCRAM-SHA-1", "SCRAM-SHA-256")


class AccountExists(Exception):
    """``create_account`` for a (domain, username) that is already registered."""


class AccountNotFound(Exception):
    """An update or removal of an account that does not exist."""


class SchemaOutdated(Exception):
    """The database schema is older than this code and automatic migration is off."""


class SchemaTooNew(Exception):
    """The database schema is newer than this code: it was migrated by a later release."""


class IDatabase(Interface):
    """One opened database: its schema version, migration and the stores built on it."""

    accounts = Attribute("The IAccountStore of this database.")
    rosters = Attribute("The IRosterStore of this database.")
    offline = Attribute("The IOfflineStore of this database.")

    def schema_version():
        """Deferred firing with the installed schema version, 0 for an empty database."""

    def migrate():
        """Create or upgrade the schema to the newest version; Deferred firing with it."""

    def close():
        """Release connections; Deferred firing when done."""


class IAccountStore(Interface):
    """Accounts keyed by (domain, username), both already normalised (nodeprep/nameprep).

    Credentials are a mapping of SASL mechanism name ("SCRAM-SHA-1", "SCRAM-SHA-256") to the
    serialised salted keys (``ScramCredentials.to_text()``); a plaintext password is never stored.
    """

    def create_account(domain, username, credentials):
        """Deferred firing with None; fails with AccountExists if already registered."""

    def get_credentials(domain, username):
        """Deferred firing with the credentials mapping, or None for an unknown account."""

    def set_credentials(domain, username, credentials):
        """Replace the credentials; fails with AccountNotFound."""

    def remove_account(domain, username):
        """Delete the account (and, via foreign keys, its data); fails with AccountNotFound."""

    def account_exists(domain, username):
        """Deferred firing with a bool."""

    def list_accounts(domain):
        """Deferred firing with the sorted list of usernames registered on domain."""


SUBSCRIPTIONS = ("none", "to", "from", "both")


@dataclass(frozen=True)
class RosterItem:
    """One contact in a user's roster (RFC 6121 §2.1), with the subscription state of §3.

    ``jid`` is the contact's normalised bare JID. ``ask`` is a pending outbound request
    ("subscribe" shown to clients as ask='subscribe'); ``pending_in`` an inbound request not yet
    answered, with ``pending_in_stanza`` the serialised <presence type='subscribe'/> to deliver
    again later; ``approved`` a pre-approval (§3.4). An item with ``in_roster=False`` exists only
    to hold pending-in state and is not shown in roster results or pushes.
    """

    jid: str
    name: str | None = None
    groups: tuple[str, ...] = ()
    subscription: str = "none"
    ask: bool = False
    pending_in: bool = False
    pending_in_stanza: str | None = None
    approved: bool = False
    in_roster: bool = True


@dataclass(frozen=True)
class OfflineMessage:
    """A message stored for a user with no available resource (XEP-0160)."""

    sender: str  # full JID, as stamped by the server
    stanza: str  # the serialised <message/>
    stored_at: datetime = field(default_factory=datetime.now)  # timezone-aware UTC


class IRosterStore(Interface):
    """Rosters keyed by the owner's (domain, username); item JIDs are normalised bare JIDs.

    Every change increments the roster's version (an integer, 0 for a roster never changed),
    which serves XEP-0237 roster versioning.
    """

    def get_roster(domain, username):
        """Deferred firing with (version, list of RosterItem), items sorted by jid."""

    def get_item(domain, username, jid):
        """Deferred firing with the RosterItem for jid, or None."""

    def put_item(domain, username, item):
        """Insert or replace the item with item.jid; Deferred firing with the new version."""

    def remove_item(domain, username, jid):
        """Delete the item (no error if absent); Deferred firing with the new version."""


class IOfflineStore(Interface):
    """Messages kept for (domain, username) until their next available presence, oldest first."""

    def store(domain, username, message, limit):
        """Add an OfflineMessage unless the user already has ``limit`` stored.

        Deferred firing with True if stored, False if the limit was reached (checked and
        inserted atomically).
        """

    def pop_all(domain, username):
        """Deferred firing with the stored messages, oldest first, removing them."""

    def count(domain, username):
        """Deferred firing with the number of stored messages."""
