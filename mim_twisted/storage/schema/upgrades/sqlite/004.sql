-- XEP-0049 private XML storage: one fragment per account and namespace, with its size in bytes
-- (UTF-8), so that the account's total is one sum.
CREATE TABLE private_storage (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    namespace TEXT NOT NULL,
    fragment TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (server, username, namespace),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);
