-- XEP-0191 blocking: each account's blocked JIDs (full, bare, domain or domain/resource).
CREATE TABLE block_list (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    jid TEXT NOT NULL,
    PRIMARY KEY (server, username, jid),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);
