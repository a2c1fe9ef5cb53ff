-- Idempotency keys of publications whose history is kept in the store, without a broker: a
-- retry within the key's window (2 minutes) is answered with the first publication, after a
-- restart too. Written in the publication's own transaction.
CREATE TABLE publish_keys (
    channel    TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    seq        BIGINT  NOT NULL,
    epoch      TEXT    NOT NULL,
    digest     TEXT    NOT NULL,
    expires_us BIGINT  NOT NULL,
    PRIMARY KEY (channel, key)
);
CREATE INDEX publish_keys_expiry ON publish_keys (expires_us);
