"""The storage interfaces: every store returns Deferreds and is reached only through these."""

# zope.interface declares methods without ``self``.
# ruff: noqa: N805

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from twisted.logger import Logger
from twisted.python.failure import Failure
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


class StorageUnavailable(Exception):
    """The database cannot serve the request now: its server is unreachable, or the connection
    was lost while committing. Expected during an outage, which the backend logs once: a caller
    may answer with a temporary error and log one line instead of a traceback."""


def log_request_failure(log: Logger, failure: Failure, what: str, **fields: object) -> None:
    """Log why a request failed: a traceback for a bug, one warning line for a storage outage
    (the backend has already said once that the database is away)."""
    if failure.check(StorageUnavailable):
        log.warn(
            what + " failed, storage unavailable: {reason}",
            reason=failure.getErrorMessage(),
            **fields,
        )
    else:
        log.failure(what, failure, **fields)


class IDatabase(Interface):
    """One opened database: its schema version, migration and the stores built on it."""

    accounts = Attribute("The IAccountStore of this database.")
    rosters = Attribute("The IRosterStore of this database.")
    offline = Attribute("The IOfflineStore of this database.")
    pubsub = Attribute("The IPubSubStore of this database.")
    last_activity = Attribute("The ILastActivityStore of this database.")
    block_lists = Attribute("The IBlockListStore of this database.")
    private = Attribute("The IPrivateStore of this database.")
    vcards = Attribute("The IVCardStore of this database.")

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
    to hold pending-in state: the IM core leaves it out of roster results and pushes, while the
    stores keep and return it like any other item.
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


def same_roster_item(one: RosterItem | None, other: RosterItem | None) -> bool:
    """Whether two items (or absences) are the same as stored: groups are a set there."""
    if one is None or other is None:
        return one is other
    return set(one.groups) == set(other.groups) and dataclasses.replace(
        one, groups=()
    ) == dataclasses.replace(other, groups=())


@dataclass(frozen=True)
class OfflineMessage:
    """A message stored for a user with no available resource (XEP-0160).

    ``stored_at`` is timezone-aware; the stores give it back in UTC.
    """

    sender: str  # full JID, as stamped by the server
    stanza: str  # the serialised <message/>
    stored_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class IRosterStore(Interface):
    """Rosters keyed by the owner's (domain, username); item JIDs are normalised bare JIDs.

    Every change increments the roster's version (an integer, 0 for a roster never changed), in
    the same transaction as the change, which serves XEP-0237 roster versioning. A roster goes
    with its account: removing the account removes it, and a new account starts at version 0.
    """

    def get_roster(domain, username):
        """Deferred firing with (version, list of RosterItem), items sorted by jid (code point).

        Items with ``in_roster=False`` are included. An unknown account has (0, []).
        """

    def get_item(domain, username, jid):
        """Deferred firing with the RosterItem for jid, or None."""

    def put_item(domain, username, item):
        """Insert or replace the item with item.jid; Deferred firing with the new version.

        The groups are stored as a set: they come back sorted, without duplicates. Fails with
        AccountNotFound for an unknown account.
        """

    def remove_item(domain, username, jid):
        """Delete the item; Deferred firing with the roster's version afterwards.

        Removing an absent item is no error and, as the roster did not change, leaves the version
        as it was. Fails with AccountNotFound for an unknown account.
        """

    def replace_item(domain, username, jid, expected, item):
        """Compare and swap: if the item stored for ``jid`` is ``expected`` (None: none is),
        store ``item`` in its place (None: remove it). Deferred firing with the roster's version
        afterwards, or with None, changing nothing, when another item is stored (the caller
        reads it again and decides anew).

        For read-modify-writes that other processes may interleave with (the nodes of a
        cluster share the rosters): the account's roster is locked while the stored item is
        compared and replaced. Groups compare as sets. Fails with AccountNotFound for an
        unknown account.
        """


class IOfflineStore(Interface):
    """Messages kept for (domain, username) until their next available presence, oldest first.

    Removing the account removes its messages.
    """

    def store(domain, username, message, limit):
        """Add an OfflineMessage unless the user already has ``limit`` stored.

        Deferred firing with True if stored, False if the limit was reached (checked and
        inserted atomically); fails with AccountNotFound for an unknown account.
        """

    def pop_all(domain, username):
        """Deferred firing with the stored messages, oldest first, removing them.

        Each comes back with ``stored_at`` in UTC. An unknown account has none.
        """

    def count(domain, username):
        """Deferred firing with the number of stored messages."""

    def count_all():
        """Deferred firing with the number of stored messages of all users (for metrics)."""


@dataclass(frozen=True)
class LastActivity:
    """When a user last went offline, and the status they left with (XEP-0012)."""

    logged_out_at: int  # Unix time, in seconds
    status: str = ""


class ILastActivityStore(Interface):
    """The last logout of each account (domain, username); removing the account removes it."""

    def set_last_activity(domain, username, activity):
        """Keep the LastActivity, replacing the one kept before; Deferred firing with None.

        Nothing is kept for an unknown account.
        """

    def get_last_activity(domain, username):
        """Deferred firing with the LastActivity kept, or None."""


class IBlockListStore(Interface):
    """Each account's block list (XEP-0191): normalised JIDs (full, bare, domain or
    domain/resource). Every answer is sorted by code point; removing the account removes it."""

    def get_block_list(domain, username):
        """Deferred firing with the blocked JIDs; an unknown account has none."""

    def block(domain, username, jids):
        """Add the JIDs; Deferred firing with those that were not blocked yet.

        Fails with AccountNotFound for an unknown account.
        """

    def unblock(domain, username, jids):
        """Remove the JIDs; Deferred firing with those that were blocked."""

    def unblock_all(domain, username):
        """Empty the block list; Deferred firing with the JIDs that were in it."""


def fragment_size(fragment: str) -> int:
    """The size of a stored XML fragment: the bytes of its UTF-8 encoding."""
    return len(fragment.encode("utf-8"))


class IPrivateStore(Interface):
    """XEP-0049 private XML of (domain, username): one serialised fragment per namespace.

    A fragment's size is the length in bytes of its UTF-8 encoding. Removing the account removes
    its fragments.
    """

    def get_fragments(domain, username, namespaces):
        """Deferred firing with {namespace: fragment} of those of ``namespaces`` stored."""

    def set_fragments(domain, username, fragments, limit):
        """Store ``fragments`` ({namespace: fragment}), each replacing the one of its namespace,
        unless the account's fragments would then take more than ``limit`` bytes in all.

        Deferred firing with True if stored, False (nothing changed) if over the limit; checked
        and written atomically. Fails with AccountNotFound for an unknown account.
        """


class IVCardStore(Interface):
    """Each account's XEP-0054 vCard, the serialised <vCard/>; removing the account removes it."""

    def get_vcard(domain, username):
        """Deferred firing with the vCard, or None when none is stored (or no such account)."""

    def set_vcard(domain, username, vcard):
        """Store the vCard, replacing the one stored before; fails with AccountNotFound."""


# A node's affiliations (XEP-0060 §4.1); "none" is stored as no row.
AFFILIATIONS = ("owner", "publisher", "publish-only", "member", "none", "outcast")
SUBSCRIPTION_STATES = ("subscribed", "pending", "unconfigured")


def check_affiliation(affiliation: str) -> None:
    """Raise ValueError unless ``affiliation`` is one of AFFILIATIONS.

    The stores check before writing, so that every backend fails alike, not with its own
    constraint error."""
    if affiliation not in AFFILIATIONS:
        raise ValueError(f"unknown affiliation {affiliation!r}")


def check_subscription_state(state: str) -> None:
    """Raise ValueError unless ``state`` is one of SUBSCRIPTION_STATES (see check_affiliation)."""
    if state not in SUBSCRIPTION_STATES:
        raise ValueError(f"unknown subscription state {state!r}")


def next_modified_at(now: datetime, newest: datetime | None) -> datetime:
    """The ``modified_at`` of an item published ``now`` on a node whose newest item has
    ``newest``: later than it even when the clock has not moved on (or went back), so that
    "newest first" is one order on every backend."""
    if newest is None or now > newest:
        return now
    return newest + timedelta(microseconds=1)


class NodeExists(Exception):
    """``create_node`` for a (service, name) that already exists."""


class NodeNotFound(Exception):
    """A node operation on a (service, name) that does not exist."""


@dataclass(frozen=True)
class PubSubNode:
    """A leaf node. ``service`` is the service key: the PubSub host (``pubsub.localhost``) for
    XEP-0060 nodes, the owner's bare JID for PEP nodes. ``config`` maps XEP-0060 field names
    (``pubsub#max_items`` ...) to JSON-compatible values (str, int, bool, list of str)."""

    service: str
    name: str
    config: dict = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass(frozen=True)
class PubSubItem:
    """A published item: ``payload`` is the item's child element serialised as XML text (may be
    empty for notification-only items); ``publisher`` the full JID of the last publisher."""

    item_id: str
    payload: str
    publisher: str
    created_at: datetime | None = None  # first publication (UTC)
    modified_at: datetime | None = None  # last publication (UTC); items sort by it


@dataclass(frozen=True)
class PubSubSubscription:
    """``jid`` is the subscriber, a bare or full JID exactly as subscribed; ``state`` is
    "subscribed", "pending" or "unconfigured"; ``options`` maps subscription option field names
    to JSON-compatible values."""

    jid: str
    subid: str
    state: str = "subscribed"
    options: dict = field(default_factory=dict)


class IPubSubStore(Interface):
    """Nodes, items, affiliations and subscriptions of PubSub services and PEP.

    Nodes are unique by (service, name). Deleting a node deletes its items, affiliations and
    subscriptions. Affiliation JIDs are bare JIDs; "none" is stored as no row. Configs and
    subscription options are stored as JSON: they come back equal to what was given (str, int,
    bool, list of str values), as new objects. Times are set by the store and come back as
    timezone-aware UTC datetimes.

    Writes to a node that does not exist fail NodeNotFound; reads of one find nothing (None, {},
    []) and removals of one thing on one (``retract_item``, ``remove_subscription``) fire False.
    An affiliation not in AFFILIATIONS or a subscription state not in SUBSCRIPTION_STATES fails
    ValueError.
    """

    def create_node(service, name, config, owner):
        """Create the node with ``owner`` (bare JID) affiliated as "owner"; fails NodeExists.

        Atomic: of concurrent creations of one node, one succeeds and the others fail."""

    def get_node(service, name):
        """Deferred firing with the PubSubNode (its ``created_at`` set) or None."""

    def list_nodes(service):
        """Deferred firing with the service's nodes sorted by name (code point)."""

    def set_node_config(service, name, config):
        """Replace the node's config; fails NodeNotFound."""

    def delete_node(service, name):
        """Delete the node and everything on it; fails NodeNotFound."""

    def get_affiliations(service, name):
        """Deferred firing with {bare JID: affiliation} of the node (no "none" entries)."""

    def set_affiliation(service, name, jid, affiliation):
        """Set or (for "none") remove one affiliation; fails NodeNotFound."""

    def affiliations_of(service, jid):
        """Deferred firing with {node name: affiliation} of a bare JID on the service."""

    def get_subscriptions(service, name):
        """Deferred firing with the node's PubSubSubscriptions, in subscription order."""

    def subscriptions_of(service, jid):
        """Deferred firing with [(node name, PubSubSubscription)] of a JID on the service: for a
        bare JID, its own and those of all its full JIDs; for a full JID, its own only. Sorted by
        node name (code point), then subscription order."""

    def add_subscription(service, name, subscription):
        """Add a subscription, last in subscription order; fails NodeNotFound. One with the
        jid and subid of an existing one replaces its state and options, keeping its place."""

    def update_subscription(service, name, subscription):
        """Replace state and options of the subscription with that jid and subid; Deferred
        firing with True if it existed (False: nothing changed); fails NodeNotFound."""

    def remove_subscription(service, name, jid, subid):
        """Remove one subscription; Deferred firing with True if it existed."""

    def publish_item(service, name, item, max_items):
        """Insert or replace the item by id (keeping created_at, updating modified_at) and, in
        the same transaction, delete all but the newest ``max_items`` items (None = no limit);
        fails NodeNotFound.

        The item's own times are ignored. ``modified_at`` is now, or a microsecond after the
        node's newest item if that is not earlier, so that the newest item is always one."""

    def publish_items(service, name, items, max_items):
        """``publish_item`` for each of ``items`` in turn, in one transaction (one node lock, one
        trim at the end): the same items, times and order as those calls one after the other.
        A node's queue stores the publications waiting in it together (group commit)."""

    def get_items(service, name, max_items=None, item_ids=None):
        """Deferred firing with items newest first (by modified_at), at most ``max_items``,
        only those in ``item_ids`` when given (ids not on the node are left out)."""

    def retract_item(service, name, item_id):
        """Delete one item; Deferred firing with True if it existed."""

    def purge_items(service, name):
        """Delete all items of the node; fails NodeNotFound."""
