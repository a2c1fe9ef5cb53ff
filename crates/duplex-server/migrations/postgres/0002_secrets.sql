-- Server secrets made once and kept with the data, such as the key that authenticates list
-- cursors: every node sharing this store shares them.
CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
