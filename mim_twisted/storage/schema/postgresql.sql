-- The mim-twisted schema for PostgreSQL at the newest version; see mim_twisted/storage/migrations.py.

CREATE TABLE schema_version (
    version INTEGER NOT NULL
);

CREATE TABLE users (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    scram_sha1 TEXT NOT NULL,
    scram_sha256 TEXT NOT NULL,
    -- XEP-0237: incremented with every change to the account's roster_items.
    roster_version BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (server, username)
);

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

-- The id orders a user's messages: stores for one user take turns (sql.py), so their ids grow.
CREATE TABLE offline_messages (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    sender TEXT NOT NULL,
    stanza TEXT NOT NULL,
    stored_at TIMESTAMPTZ NOT NULL,
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);

CREATE INDEX offline_messages_by_user ON offline_messages (server, username, id);
