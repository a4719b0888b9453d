-- XEP-0012 last activity: when each account last went offline, and with what status.
CREATE TABLE last_activity (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    logged_out_at INTEGER NOT NULL,  -- Unix time, seconds
    status TEXT NOT NULL,
    PRIMARY KEY (server, username),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);
