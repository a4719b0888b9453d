"""The storage interfaces: every store returns Deferreds and is reached only through these."""

# zope.interface declares methods without ``self``.
# ruff: noqa: N805

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
