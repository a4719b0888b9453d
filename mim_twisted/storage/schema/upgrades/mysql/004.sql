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
