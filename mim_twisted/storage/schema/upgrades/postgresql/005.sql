-- XEP-0054 vcard-temp: each account's vCard, the serialised <vCard/>.
CREATE TABLE vcards (
    server TEXT NOT NULL,
    username TEXT NOT NULL,
    vcard TEXT NOT NULL,
    PRIMARY KEY (server, username),
    FOREIGN KEY (server, username) REFERENCES users (server, username) ON DELETE CASCADE
);
