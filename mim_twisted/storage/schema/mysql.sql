-- The mim-twisted schema for MySQL 8 and MariaDB 10.5 or later at the newest version; see
-- mim_twisted/storage/migrations.py. The same tables as postgresql.sql, with these differences:
--
-- * InnoDB (row locks, foreign keys) and utf8mb4 with its binary collation on every table:
--   JIDs and payloads keep every character, 4-byte ones included, and compare code point by
--   code point, as they do in SQLite and PostgreSQL (a case-insensitive collation would make
--   "Alice" and "alice" one key).
-- * An InnoDB index key holds at most 3072 bytes, 768 utf8mb4 characters: the indexed columns
--   are VARCHARs sized so that each key fits (a JID part is at most 255 characters here, not
--   the 1023 bytes RFC 7622 allows); a longer value is refused (strict mode), never truncated.
-- * Times are the UTC text that sql.py writes (fixed width, so it sorts as time does), as in
--   SQLite: MySQL's DATETIME would refuse its "+00:00".

CREATE TABLE schema_version (
    version INTEGER NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE users (
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    scram_sha1 TEXT NOT NULL,
    scram_sha256 TEXT NOT NULL,
    -- XEP-0237: incremented with every change to the account's roster_items.
    roster_version BIGINT NOT NULL DEFAULT 0,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (server, username)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE roster_items (
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    jid VARCHAR(255) NOT NULL,
    name TEXT,
    subscription VARCHAR(4) NOT NULL CHECK (subscription IN ('none', 'to', 'from', 'both')),
    ask BOOLEAN NOT NULL,
    pending_in BOOLEAN NOT NULL,
    pending_in_stanza MEDIUMTEXT,
    approved BOOLEAN NOT NULL,
    in_roster BOOLEAN NOT NULL,
    PRIMARY KEY (server, username, jid),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- No primary key over the four columns, whose key would pass 3072 bytes: the store writes an
-- item's groups once each (sql.py), and the index serves the lookups and the foreign key.
CREATE TABLE roster_groups (
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    jid VARCHAR(255) NOT NULL,
    grp TEXT NOT NULL,
    INDEX roster_groups_by_item (server, username, jid),
    FOREIGN KEY (server, username, jid) REFERENCES roster_items (server, username, jid)
        ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The id orders a user's messages: stores for one user take turns (sql.py), so their ids grow.
CREATE TABLE offline_messages (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    sender TEXT NOT NULL,
    stanza MEDIUMTEXT NOT NULL,
    stored_at CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    INDEX offline_messages_by_user (server, username, id),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- PubSub (XEP-0060) and PEP (XEP-0163), after MongooseIM's RDBMS tables. The service is the
-- PubSub host for its nodes and the owner's bare JID for PEP nodes. Configs and subscription
-- options are JSON objects kept as text: they come back exactly as written.
CREATE TABLE pubsub_nodes (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    service VARCHAR(511) NOT NULL,
    name VARCHAR(256) NOT NULL,
    config MEDIUMTEXT NOT NULL,
    created_at CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    UNIQUE (service, name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- modified_at grows with every publication to a node (sql.py), so it orders the items.
CREATE TABLE pubsub_items (
    node_id BIGINT NOT NULL,
    item_id VARCHAR(700) NOT NULL,
    payload MEDIUMTEXT NOT NULL,
    publisher TEXT NOT NULL,
    created_at CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    modified_at CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    PRIMARY KEY (node_id, item_id),
    INDEX pubsub_items_by_age (node_id, modified_at),
    FOREIGN KEY (node_id) REFERENCES pubsub_nodes (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The affiliation "none" is no row.
CREATE TABLE pubsub_affiliations (
    node_id BIGINT NOT NULL,
    jid VARCHAR(700) NOT NULL,
    affiliation VARCHAR(12) NOT NULL
        CHECK (affiliation IN ('owner', 'publisher', 'publish-only', 'member', 'outcast')),
    PRIMARY KEY (node_id, jid),
    INDEX pubsub_affiliations_by_jid (jid),
    FOREIGN KEY (node_id) REFERENCES pubsub_nodes (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- jid_bare is jid without its resource: a bare JID's subscriptions and those of its full JIDs
-- are one indexed lookup. seq is the subscription order (AUTO_INCREMENT needs it indexed).
CREATE TABLE pubsub_subscriptions (
    seq BIGINT NOT NULL AUTO_INCREMENT,
    node_id BIGINT NOT NULL,
    jid VARCHAR(600) NOT NULL,
    jid_bare VARCHAR(511) NOT NULL,
    subid VARCHAR(150) NOT NULL,
    state VARCHAR(12) NOT NULL CHECK (state IN ('subscribed', 'pending', 'unconfigured')),
    options MEDIUMTEXT NOT NULL,
    PRIMARY KEY (node_id, jid, subid),
    INDEX pubsub_subscriptions_by_seq (seq),
    INDEX pubsub_subscriptions_by_jid (jid_bare),
    FOREIGN KEY (node_id) REFERENCES pubsub_nodes (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- XEP-0012 last activity: when each account last went offline, and with what status.
CREATE TABLE last_activity (
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    logged_out_at BIGINT NOT NULL,  -- Unix time, seconds
    status TEXT NOT NULL,
    PRIMARY KEY (server, username),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- XEP-0191 blocking: each account's blocked JIDs (full, bare, domain or domain/resource).
CREATE TABLE block_list (
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    jid VARCHAR(255) NOT NULL,
    PRIMARY KEY (server, username, jid),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- XEP-0049 private XML storage: one fragment per account and namespace, with its size in bytes
-- (UTF-8), so that the account's total is one sum.
CREATE TABLE private_storage (
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    namespace VARCHAR(255) NOT NULL,
    fragment MEDIUMTEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (server, username, namespace),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- XEP-0054 vcard-temp: each account's vCard, the serialised <vCard/>.
CREATE TABLE vcards (
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    vcard MEDIUMTEXT NOT NULL,
    PRIMARY KEY (server, username),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Cluster (issue 15): which node holds which bound full JID. priority is NULL while the
-- session is not available; presence is its last broadcast presence, features the
-- XEP-0115 features its caps announce (a JSON array), once known.
CREATE TABLE cluster_sessions (
    jid VARCHAR(768) NOT NULL PRIMARY KEY,
    node VARCHAR(255) NOT NULL,
    priority INTEGER,
    presence MEDIUMTEXT,
    features TEXT
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE INDEX cluster_sessions_node ON cluster_sessions (node);
