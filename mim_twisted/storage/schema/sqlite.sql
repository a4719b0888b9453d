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
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,  -- UTC, 'YYYY-MM-DD HH:MM:SS'
    PRIMARY KEY (server, username)
);
