-- Cluster (issue 15): which node holds which bound full JID. priority is NULL while the
-- session is not available; presence is its last broadcast presence, features the
-- XEP-0115 features its caps announce (a JSON array), once known.
CREATE TABLE cluster_sessions (
    jid VARCHAR(768) NOT NULL PRIMARY KEY,
    node VARCHAR(255) NOT NULL,
    priority INTEGER,
    presence MEDIUMTEXT,
    features TEXT
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
CREATE INDEX cluster_sessions_node ON cluster_sessions (node);
