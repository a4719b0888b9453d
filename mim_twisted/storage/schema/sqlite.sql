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
