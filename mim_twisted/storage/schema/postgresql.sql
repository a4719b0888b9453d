-- The mim-twisted schema for PostgreSQL at the newest version; see mim_twisted/storage/migrations.py.

CREATE TABLE schema_version (
    version INTEGER NOT NULL
);

CREATE TABLE users (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    scram_sha1 TEXT NOT NULL,
    scram_sha256 TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (server, username)
);
