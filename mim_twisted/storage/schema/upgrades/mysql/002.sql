-- XEP-0012 last activity: when each account last went offline, and with what status.
CREATE TABLE last_activity (
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    logged_out_at BIGINT NOT NULL,  -- Unix time, seconds
    status TEXT NOT NULL,
    PRIMARY KEY (server, username),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
