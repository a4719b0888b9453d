-- The mim-twisted schema for SQLite at the newest version; see mim_twisted/storage/migrations.py.
-- Connections run with PRAGMA foreign_keys=ON: the per-account tables cascade from users.

CREATE TABLE schema_version (
    version INTEGER NOT NULL
);

-- SQLite lets primary key columns hold NULL unless told otherwise, hence the NOT NULLs.
CREATE TABLE users (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    scram_sha1 TEXT NOT NULL,
    scram_sha256 TEXT NOT NULL,
    -- XEP-0237: incremented with every change to the account's roster_items.
    roster_version INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,  -- UTC, 'YYYY-MM-DD HH:MM:SS'
    PRIMARY KEY (server, username)
);

-- SQLite has no boolean type: the BOOLEAN columns hold 0 and 1.
CREATE TABLE roster_items (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    jid TEXT NOT NULL,
    name TEXT,
    subscription TEXT NOT NULL CHECK (subscription IN ('none', 'to', 'from', 'both')),
    ask BOOLEAN NOT NULL,
    pending_in BOOLEAN NOT NULL,
    pending_in_stanza TEXT,
    approved BOOLEAN NOT NULL,
    in_roster BOOLEAN NOT NULL,
    PRIMARY KEY (server, username, jid),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);

CREATE TABLE roster_groups (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    jid TEXT NOT NULL,
    grp TEXT NOT NULL,
    PRIMARY KEY (server, username, jid, grp),
    FOREIGN KEY (server, username, jid) REFERENCES roster_items (server, username, jid)
        ON DELETE CASCADE
);

-- The id (the rowid) orders a user's messages: a new one is above every id in the table. Without
-- AUTOINCREMENT the ids of deleted messages may come back, which the order does not mind.
CREATE TABLE offline_messages (
    id INTEGER PRIMARY KEY,
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    sender TEXT NOT NULL,
    stanza TEXT NOT NULL,
    stored_at TEXT NOT NULL,  -- UTC, 'YYYY-MM-DD HH:MM:SS.ffffff+00:00'
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);

CREATE INDEX offline_messages_by_user ON offline_messages (server, username, id);

-- PubSub (XEP-0060) and PEP (XEP-0163), after MongooseIM's RDBMS tables. The service is the
-- PubSub host for its nodes and the owner's bare JID for PEP nodes. Configs and subscription
-- options are JSON objects kept as text: they come back exactly as written.
CREATE TABLE pubsub_nodes (
    id INTEGER PRIMARY KEY,
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at TEXT NOT NULL,  -- UTC, 'YYYY-MM-DD HH:MM:SS.ffffff+00:00'
    UNIQUE (service, name)
);

-- modified_at grows with every publication to a node (sql.py), so it orders the items; the
-- fixed-width text sorts as the instants do.
CREATE TABLE pubsub_items (
    node_id INTEGER NOT NULL REFERENCES pubsub_nodes (id) ON DELETE CASCADE,
    item_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    publisher TEXT NOT NULL,
    created_at TEXT NOT NULL,  -- UTC, 'YYYY-MM-DD HH:MM:SS.ffffff+00:00'
    modified_at TEXT NOT NULL,  -- the same
    PRIMARY KEY (node_id, item_id)
);

CREATE INDEX pubsub_items_by_age ON pubsub_items (node_id, modified_at);

-- The affiliation "none" is no row.
CREATE TABLE pubsub_affiliations (
    node_id INTEGER NOT NULL REFERENCES pubsub_nodes (id) ON DELETE CASCADE,
    jid TEXT NOT NULL,
    affiliation TEXT NOT NULL
        CHECK (affiliation IN ('owner', 'publisher', 'publish-only', 'member', 'outcast')),
    PRIMARY KEY (node_id, jid)
);

CREATE INDEX pubsub_affiliations_by_jid ON pubsub_affiliations (jid);

-- jid_bare is jid without its resource: a bare JID's subscriptions and those of its full JIDs
-- are one indexed lookup. seq is the subscription order: the rowid, which SQLite gives a new row
-- above every one in the table. Only an INTEGER PRIMARY KEY column can name the rowid, so the
-- key of PostgreSQL's table is UNIQUE here, which in SQLite is the same index.
CREATE TABLE pubsub_subscriptions (
    seq INTEGER PRIMARY KEY,
    node_id INTEGER NOT NULL REFERENCES pubsub_nodes (id) ON DELETE CASCADE,
    jid TEXT NOT NULL,
    jid_bare TEXT NOT NULL,
    subid TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('subscribed', 'pending', 'unconfigured')),
    options TEXT NOT NULL,
    UNIQUE (node_id, jid, subid)
);

CREATE INDEX pubsub_subscriptions_by_jid ON pubsub_subscriptions (jid_bare, jid);

-- XEP-0012 last activity: when each account last went offline, and with what status.
CREATE TABLE last_activity (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    logged_out_at INTEGER NOT NULL,  -- Unix time, seconds
    status TEXT NOT NULL,
    PRIMARY KEY (server, username),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);

-- XEP-0191 blocking: each account's blocked JIDs (full, bare, domain or domain/resource).
CREATE TABLE block_list (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    jid TEXT NOT NULL,
    PRIMARY KEY (server, username, jid),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);

-- XEP-0049 private XML storage: one fragment per account and namespace, with its size in bytes
-- (UTF-8), so that the account's total is one sum.
CREATE TABLE private_storage (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    namespace TEXT NOT NULL,
    fragment TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (server, username, namespace),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);

-- XEP-0054 vcard-temp: each account's vCard, the serialised <vCard/>.
CREATE TABLE vcards (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    vcard TEXT NOT NULL,
    PRIMARY KEY (server, username),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);

-- Cluster (issue 15): which node holds which bound full JID. priority is NULL while the
-- session is not available; presence is its last broadcast presence, features the
-- XEP-0115 features its caps announce (a JSON array), once known.
CREATE TABLE cluster_sessions (
    jid TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    priority INTEGER,
    presence TEXT,
    features TEXT
);
CREATE INDEX cluster_sessions_node ON cluster_sessions (node);
