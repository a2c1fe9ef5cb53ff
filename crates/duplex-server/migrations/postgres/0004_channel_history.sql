-- Channel history kept in the store (`history_storage = "store"`, one node without a broker):
-- each channel's epoch, last offset and bytes kept (`channel_logs`), and its publications
-- (`channel_log_entries`), each until `expires_us` or until the channel's size or byte bound
-- pushes it out.
CREATE TABLE channel_logs (
    channel  TEXT PRIMARY KEY,
    epoch    TEXT NOT NULL,
    top      BIGINT NOT NULL,
    bytes    BIGINT NOT NULL
);

CREATE TABLE channel_log_entries (
    id          BIGSERIAL PRIMARY KEY,
    channel     TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    expires_us  BIGINT NOT NULL,
    is_binary   BOOLEAN NOT NULL,
    payload     BYTEA NOT NULL
);
CREATE UNIQUE INDEX channel_log_entries_seq ON channel_log_entries (channel, seq);
CREATE INDEX channel_log_entries_expiry ON channel_log_entries (expires_us);
