"""Storage in dictionaries, for tests: the behaviour of the SQL backends without a database."""

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mim_twisted.storage import migrations
from mim_twisted.storage.interfaces import (
    AccountExists,
    AccountNotFound,
    IAccountStore,
    IBlockListStore,
    IDatabase,
    ILastActivityStore,
    IOfflineStore,
    IPrivateStore,
    IPubSubStore,
    IRosterStore,
    IVCardStore,
    LastActivity,
    NodeExists,
    NodeNotFound,
    OfflineMessage,
    PubSubItem,
    PubSubNode,
    PubSubSubscription,
    RosterItem,
    check_affiliation,
    check_subscription_state,
    fragment_size,
    next_modified_at,
    same_roster_item,
)


@implementer(IAccountStore)
class MemoryAccountStore:
    def __init__(self) -> None:
        # Copies go in and out, so a caller mutating a mapping cannot change what is stored.
        self._credentials: dict[tuple[str, str], dict[str, str]] = {}
        # Other stores' data, keyed like _credentials and removed with the account, as ON DELETE
        # CASCADE removes it in SQL.
        self._dependent_data: list[dict[tuple[str, str], Any]] = []
        # Called with (domain, username) once an account is removed (its PEP nodes go).
        self.on_removed: list[Callable[[str, str], None]] = []

    def is_registered(self, domain: str, username: str) -> bool:
        """Whether the account exists, for the other stores: they keep data only for accounts."""
        return (domain, username) in self._credentials

    def remove_with_account(self, data: dict[tuple[str, str], Any]) -> None:
        """Have the entries of ``data`` removed with the account they are keyed by."""
        self._dependent_data.append(data)

    def create_account(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Deferred[None]:
        if (domain, username) in self._credentials:
            return fail(AccountExists(f"{username}@{domain}"))
        self._credentials[domain, username] = dict(credentials)
        return succeed(None)

    def get_credentials(self, domain: str, username: str) -> Deferred[dict[str, str] | None]:
        credentials = self._credentials.get((domain, username))
        return succeed(None if credentials is None else dict(credentials))

    def set_credentials(
        self, domain: str, username: str, credentials: Mapping[str, str]
    ) -> Deferred[None]:
        if (domain, username) not in self._credentials:
            return fail(AccountNotFound(f"{username}@{domain}"))
        self._credentials[domain, username] = dict(credentials)
        return succeed(None)

    def remove_account(self, domain: str, username: str) -> Deferred[None]:
        if self._credentials.pop((domain, username), None) is None:
            return fail(AccountNotFound(f"{username}@{domain}"))
        for data in self._dependent_data:
            data.pop((domain, username), None)
        for removed in self.on_removed:
            removed(domain, username)
        return succeed(None)

    def account_exists(self, domain: str, username: str) -> Deferred[bool]:
        return succeed((domain, username) in self._credentials)

    def list_accounts(self, domain: str) -> Deferred[list[str]]:
        return succeed(sorted(user for server, user in self._credentials if server == domain))


@dataclass
class _Roster:
    version: int = 0
    items: dict[str, RosterItem] = field(default_factory=dict)


@implementer(IRosterStore)
class MemoryRosterStore:
    def __init__(self, accounts: MemoryAccountStore) -> None:
        self._accounts = accounts
        self._rosters: dict[tuple[str, str], _Roster] = {}
        accounts.remove_with_account(self._rosters)

    def get_roster(self, domain: str, username: str) -> Deferred[tuple[int, list[RosterItem]]]:
        roster = self._rosters.get((domain, username), _Roster())
        return succeed((roster.version, [roster.items[jid] for jid in sorted(roster.items)]))

    def get_item(self, domain: str, username: str, jid: str) -> Deferred[RosterItem | None]:
        roster = self._rosters.get((domain, username), _Roster())
        return succeed(roster.items.get(jid))

    def put_item(self, domain: str, username: str, item: RosterItem) -> Deferred[int]:
        if not self._accounts.is_registered(domain, username):
            return fail(AccountNotFound(f"{username}@{domain}"))
        roster = self._rosters.setdefault((domain, username), _Roster())
        roster.items[item.jid] = replace(item, groups=tuple(sorted(set(item.groups))))
        roster.version += 1
        return succeed(roster.version)

    def remove_item(self, domain: str, username: str, jid: str) -> Deferred[int]:
        if not self._accounts.is_registered(domain, username):
            return fail(AccountNotFound(f"{username}@{domain}"))
        roster = self._rosters.setdefault((domain, username), _Roster())
        if roster.items.pop(jid, None) is not None:
            roster.version += 1
        return succeed(roster.version)

    def replace_item(
        self,
        domain: str,
        username: str,
        jid: str,
        expected: RosterItem | None,
        item: RosterItem | None,
    ) -> Deferred[int | None]:
        if not self._accounts.is_registered(domain, username):
            return fail(AccountNotFound(f"{username}@{domain}"))
        roster = self._rosters.get((domain, username), _Roster())
        if not same_roster_item(roster.items.get(jid), expected):
            return succeed(None)
        if item is None:
            return self.remove_item(domain, username, jid)
        return self.put_item(domain, username, item)


@implementer(IOfflineStore)
class MemoryOfflineStore:
    def __init__(self, accounts: MemoryAccountStore) -> None:
        self._accounts = accounts
        self._messages: dict[tuple[str, str], list[OfflineMessage]] = {}
        accounts.remove_with_account(self._messages)

    def store(
        self, domain: str, username: str, message: OfflineMessage, limit: int
    ) -> Deferred[bool]:
        if not self._accounts.is_registered(domain, username):
            return fail(AccountNotFound(f"{username}@{domain}"))
        messages = self._messages.setdefault((domain, username), [])
        if len(messages) >= limit:
            return succeed(False)
        messages.append(replace(message, stored_at=message.stored_at.astimezone(UTC)))
        return succeed(True)

    def pop_all(self, domain: str, username: str) -> Deferred[list[OfflineMessage]]:
        return succeed(self._messages.pop((domain, username), []))

    def count(self, domain: str, username: str) -> Deferred[int]:
        return succeed(len(self._messages.get((domain, username), [])))

    def count_all(self) -> Deferred[int]:
        return succeed(sum(map(len, self._messages.values())))


@implementer(ILastActivityStore)
class MemoryLastActivityStore:
    def __init__(self, accounts: MemoryAccountStore) -> None:
        self._accounts = accounts
        self._activities: dict[tuple[str, str], LastActivity] = {}
        accounts.remove_with_account(self._activities)

    def set_last_activity(
        self, domain: str, username: str, activity: LastActivity
    ) -> Deferred[None]:
        if self._accounts.is_registered(domain, username):
            self._activities[domain, username] = activity
        return succeed(None)

    def get_last_activity(self, domain: str, username: str) -> Deferred[LastActivity | None]:
        return succeed(self._activities.get((domain, username)))


@implementer(IBlockListStore)
class MemoryBlockListStore:
    def __init__(self, accounts: MemoryAccountStore) -> None:
        self._accounts = accounts
        self._lists: dict[tuple[str, str], set[str]] = {}
        accounts.remove_with_account(self._lists)

    def get_block_list(self, domain: str, username: str) -> Deferred[list[str]]:
        return succeed(sorted(self._lists.get((domain, username), ())))

    def block(self, domain: str, username: str, jids: Iterable[str]) -> Deferred[list[str]]:
        if not self._accounts.is_registered(domain, username):
            return fail(AccountNotFound(f"{username}@{domain}"))
        blocked = self._lists.setdefault((domain, username), set())
        added = sorted(set(jids) - blocked)
        blocked.update(added)
        return succeed(added)

    def unblock(self, domain: str, username: str, jids: Iterable[str]) -> Deferred[list[str]]:
        blocked = self._lists.get((domain, username), set())
        removed = sorted(blocked & set(jids))
        blocked.difference_update(removed)
        return succeed(removed)

    def unblock_all(self, domain: str, username: str) -> Deferred[list[str]]:
        return succeed(sorted(self._lists.pop((domain, username), ())))


@implementer(IPrivateStore)
class MemoryPrivateStore:
    def __init__(self, accounts: MemoryAccountStore) -> None:
        self._accounts = accounts
        self._fragments: dict[tuple[str, str], dict[str, str]] = {}
        accounts.remove_with_account(self._fragments)

    def get_fragments(
        self, domain: str, username: str, namespaces: Iterable[str]
    ) -> Deferred[dict[str, str]]:
        stored = self._fragments.get((domain, username), {})
        return succeed({ns: stored[ns] for ns in namespaces if ns in stored})

    def set_fragments(
        self, domain: str, username: str, fragments: Mapping[str, str], limit: int
    ) -> Deferred[bool]:
        if not self._accounts.is_registered(domain, username):
            return fail(AccountNotFound(f"{username}@{domain}"))
        after = {**self._fragments.get((domain, username), {}), **fragments}
        if sum(map(fragment_size, after.values())) > limit:
            return succeed(False)
        self._fragments[domain, username] = after
        return succeed(True)


@implementer(IVCardStore)
class MemoryVCardStore:
    def __init__(self, accounts: MemoryAccountStore) -> None:
        self._accounts = accounts
        self._vcards: dict[tuple[str, str], str] = {}
        accounts.remove_with_account(self._vcards)

    def get_vcard(self, domain: str, username: str) -> Deferred[str | None]:
        return succeed(self._vcards.get((domain, username)))

    def set_vcard(self, domain: str, username: str, vcard: str) -> Deferred[None]:
        if not self._accounts.is_registered(domain, username):
            return fail(AccountNotFound(f"{username}@{domain}"))
        self._vcards[domain, username] = vcard
        return succeed(None)


def _json_copy(value: dict) -> dict:
    # Through JSON, as the SQL backends store it: a caller mutating the mapping cannot change what
    # is stored, and a value that is not JSON fails here as it would there.
    return json.loads(json.dumps(value))


@dataclass
class _Node:
    config: dict
    created_at: datetime
    affiliations: dict[str, str] = field(default_factory=dict)
    # By (jid, subid), in insertion order, which is the subscription order.
    subscriptions: dict[tuple[str, str], PubSubSubscription] = field(default_factory=dict)
    items: dict[str, PubSubItem] = field(default_factory=dict)

    def newest_first(self) -> list[PubSubItem]:
        return sorted(self.items.values(), key=lambda item: item.modified_at, reverse=True)


@implementer(IPubSubStore)
class MemoryPubSubStore:
    def __init__(self) -> None:
        self._nodes: dict[tuple[str, str], _Node] = {}

    def _node(self, service: str, name: str) -> _Node:
        try:
            return self._nodes[service, name]
        except KeyError:
            raise NodeNotFound(f"{service} {name}") from None

    def create_node(
        self, service: str, name: str, config: Mapping[str, Any], owner: str
    ) -> Deferred[None]:
        if (service, name) in self._nodes:
            return fail(NodeExists(f"{service} {name}"))
        node = _Node(config=_json_copy(dict(config)), created_at=datetime.now(UTC))
        node.affiliations[owner] = "owner"
        self._nodes[service, name] = node
        return succeed(None)

    def get_node(self, service: str, name: str) -> Deferred[PubSubNode | None]:
        node = self._nodes.get((service, name))
        if node is None:
            return succeed(None)
        return succeed(PubSubNode(service, name, _json_copy(node.config), node.created_at))

    def list_nodes(self, service: str) -> Deferred[list[PubSubNode]]:
        return succeed(
            [
                PubSubNode(service, name, _json_copy(node.config), node.created_at)
                for (key, name), node in sorted(self._nodes.items())
                if key == service
            ]
        )

    def set_node_config(self, service: str, name: str, config: Mapping[str, Any]) -> Deferred[None]:
        try:
            self._node(service, name).config = _json_copy(dict(config))
        except NodeNotFound:
            return fail()
        return succeed(None)

    def delete_service_nodes(self, domain: str, username: str) -> None:
        """Delete the PEP nodes of a removed account (SQL deletes them with the account)."""
        service = f"{username}@{domain}"
        for key in [key for key in self._nodes if key[0] == service]:
            del self._nodes[key]

    def delete_node(self, service: str, name: str) -> Deferred[None]:
        if self._nodes.pop((service, name), None) is None:
            return fail(NodeNotFound(f"{service} {name}"))
        return succeed(None)

    def get_affiliations(self, service: str, name: str) -> Deferred[dict[str, str]]:
        node = self._nodes.get((service, name))
        return succeed({} if node is None else dict(node.affiliations))

    def set_affiliation(
        self, service: str, name: str, jid: str, affiliation: str
    ) -> Deferred[None]:
        try:
            check_affiliation(affiliation)
            node = self._node(service, name)
        except (ValueError, NodeNotFound):
            return fail()
        if affiliation == "none":
            node.affiliations.pop(jid, None)
        else:
            node.affiliations[jid] = affiliation
        return succeed(None)

    def affiliations_of(self, service: str, jid: str) -> Deferred[dict[str, str]]:
        return succeed(
            {
                name: node.affiliations[jid]
                for (key, name), node in sorted(self._nodes.items())
                if key == service and jid in node.affiliations
            }
        )

    def get_subscriptions(self, service: str, name: str) -> Deferred[list[PubSubSubscription]]:
        node = self._nodes.get((service, name))
        return succeed([] if node is None else [_copy(s) for s in node.subscriptions.values()])

    def subscriptions_of(
        self, service: str, jid: str
    ) -> Deferred[list[tuple[str, PubSubSubscription]]]:
        def matches(subscriber: str) -> bool:
            return subscriber == jid or ("/" not in jid and subscriber.startswith(jid + "/"))

        return succeed(
            [
                (name, _copy(subscription))
                for (key, name), node in sorted(self._nodes.items())
                if key == service
                for subscription in node.subscriptions.values()
                if matches(subscription.jid)
            ]
        )

    def add_subscription(
        self, service: str, name: str, subscription: PubSubSubscription
    ) -> Deferred[None]:
        try:
            check_subscription_state(subscription.state)
            node = self._node(service, name)
        except (ValueError, NodeNotFound):
            return fail()
        # An existing (jid, subid) is replaced in its place, as the SQL upsert keeps its order.
        node.subscriptions[subscription.jid, subscription.subid] = _copy(subscription)
        return succeed(None)

    def update_subscription(
        self, service: str, name: str, subscription: PubSubSubscription
    ) -> Deferred[bool]:
        try:
            check_subscription_state(subscription.state)
            node = self._node(service, name)
        except (ValueError, NodeNotFound):
            return fail()
        key = subscription.jid, subscription.subid
        if key not in node.subscriptions:
            return succeed(False)
        node.subscriptions[key] = _copy(subscription)
        return succeed(True)

    def remove_subscription(self, service: str, name: str, jid: str, subid: str) -> Deferred[bool]:
        node = self._nodes.get((service, name))
        return succeed(node is not None and node.subscriptions.pop((jid, subid), None) is not None)

    def publish_item(
        self, service: str, name: str, item: PubSubItem, max_items: int | None
    ) -> Deferred[None]:
        try:
            node = self._node(service, name)
        except NodeNotFound:
            return fail()
        newest = max((i.modified_at for i in node.items.values()), default=None)
        modified_at = next_modified_at(datetime.now(UTC), newest)
        previous = node.items.get(item.item_id)
        created_at = modified_at if previous is None else previous.created_at
        node.items[item.item_id] = replace(item, created_at=created_at, modified_at=modified_at)
        if max_items is not None:
            for old in node.newest_first()[max_items:]:
                del node.items[old.item_id]
        return succeed(None)

    def publish_items(
        self, service: str, name: str, items: Iterable[PubSubItem], max_items: int | None
    ) -> Deferred[None]:
        try:
            node = self._node(service, name)
        except NodeNotFound:
            return fail()
        for item in items:
            self.publish_item(service, name, item, None)
        if max_items is not None:
            for old in node.newest_first()[max_items:]:
                del node.items[old.item_id]
        return succeed(None)

    def get_items(
        self,
        service: str,
        name: str,
        max_items: int | None = None,
        item_ids: Iterable[str] | None = None,
    ) -> Deferred[list[PubSubItem]]:
        node = self._nodes.get((service, name))
        if node is None:
            return succeed([])
        items = node.newest_first()
        if item_ids is not None:
            wanted = set(item_ids)
            items = [item for item in items if item.item_id in wanted]
        return succeed(items if max_items is None else items[:max_items])

    def retract_item(self, service: str, name: str, item_id: str) -> Deferred[bool]:
        node = self._nodes.get((service, name))
        return succeed(node is not None and node.items.pop(item_id, None) is not None)

    def purge_items(self, service: str, name: str) -> Deferred[None]:
        try:
            self._node(service, name).items.clear()
        except NodeNotFound:
            return fail()
        return succeed(None)


def _copy(subscription: PubSubSubscription) -> PubSubSubscription:
    return replace(subscription, options=_json_copy(subscription.options))


@implementer(IDatabase)
class MemoryDatabase:
    """A database that is born at the newest schema version, so migrating it changes nothing."""

    def __init__(self) -> None:
        self.accounts = MemoryAccountStore()
        self.rosters = MemoryRosterStore(self.accounts)
        self.offline = MemoryOfflineStore(self.accounts)
        self.pubsub = MemoryPubSubStore()
        self.last_activity = MemoryLastActivityStore(self.accounts)
        self.block_lists = MemoryBlockListStore(self.accounts)
        self.private = MemoryPrivateStore(self.accounts)
        self.vcards = MemoryVCardStore(self.accounts)
        self.accounts.on_removed.append(self.pubsub.delete_service_nodes)

    def schema_version(self) -> Deferred[int]:
        return succeed(migrations.newest_version())

    def migrate(self) -> Deferred[int]:
        return succeed(migrations.newest_version())

    def close(self) -> Deferred[None]:
        return succeed(None)
