-- XEP-0191 blocking: each account's blocked JIDs (full, bare, domain or domain/resource).
CREATE TABLE block_list (
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    jid VARCHAR(255) NOT NULL,
    PRIMARY KEY (server, username, jid),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
