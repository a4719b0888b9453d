-- XEP-0054 vcard-temp: each account's vCard, the serialised <vCard/>.
CREATE TABLE vcards (
    server VARCHAR(255) NOT NULL,
    username VARCHAR(255) NOT NULL,
    vcard MEDIUMTEXT NOT NULL,
    PRIMARY KEY (server, username),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
