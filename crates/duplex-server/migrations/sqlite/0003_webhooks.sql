-- Webhooks: events wait in the outbox until the application's backend took them; each node
-- delivers its own (`node`), and takes over those of a node that stopped. `webhook_live` holds
-- each node's open connections, so that a node that died has its `disconnected` events sent by
-- the next one; `webhook_nodes` says when each node was last heard from.
CREATE TABLE webhook_outbox (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    node   TEXT NOT NULL,
    at_us  INTEGER NOT NULL,
    body   TEXT NOT NULL
);
CREATE INDEX webhook_outbox_node ON webhook_outbox (node, seq);

CREATE TABLE webhook_live (
    node    TEXT NOT NULL,
    client  TEXT NOT NULL,
    info    TEXT NOT NULL,
    PRIMARY KEY (node, client)
);

CREATE TABLE webhook_nodes (
    node     TEXT PRIMARY KEY,
    seen_us  INTEGER NOT NULL
);
