-- Records: one row per record; `doc` is the full JSON document served to clients
-- (server fields included), so a GET sends stored bytes without re-encoding.
CREATE TABLE records (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    updated_us INTEGER NOT NULL,
    doc        TEXT    NOT NULL,
    UNIQUE (collection, id)
);

CREATE INDEX records_by_created ON records (collection, created_us, seq);
CREATE INDEX records_by_updated ON records (collection, updated_us, seq);
