-- Records: one row per record. `doc` is the full JSON document served to clients, byte for byte
-- (server fields first, the client's field order kept), so a GET sends stored text without
-- re-encoding; `doc_json` is the same document as JSONB, for filters on any top-level field,
-- server fields included (a GIN index answers `doc_json @> '{"author":"ana"}'`).
CREATE TABLE records (
    seq        BIGSERIAL PRIMARY KEY,
    collection TEXT   NOT NULL,
    id         TEXT   NOT NULL,
    version    BIGINT NOT NULL,
    created_us BIGINT NOT NULL,
    updated_us BIGINT NOT NULL,
    doc        TEXT   NOT NULL,
    doc_json   JSONB  NOT NULL,
    UNIQUE (collection, id)
);

CREATE INDEX records_by_created ON records (collection, created_us, seq);
CREATE INDEX records_by_updated ON records (collection, updated_us, seq);
CREATE INDEX records_doc_json ON records USING GIN (doc_json jsonb_path_ops);
