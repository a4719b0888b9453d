-- Cluster (issue 15): which node holds which bound full JID. priority is NULL while the
-- session is not available; presence is its last broadcast presence, features the
-- XEP-0115 features its caps announce (a JSON array), once known.
CREATE TABLE cluster_sessions (
    jid TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    priority INTEGER,
    presence TEXT,
    features TEXT
);
CREATE INDEX cluster_sessions_node ON cluster_sessions (node);
