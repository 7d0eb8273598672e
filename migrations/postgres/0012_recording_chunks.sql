-- A recording's event lines are stored as chunks, one row per batch the worker sends, keyed
-- by their byte offset in the cast: appending to one growing text value (`content ||`)
-- rewrote the whole recording on every batch, so a shell that printed 48 MB kept the store's
-- writer busy for minutes. `recordings.content` keeps the header line (and what older
-- versions appended); `end_reason` says why a recording ended early (its size limit).
-- Keep in step with the other folder's file of this number.
CREATE TABLE recording_chunks (
    recording_id TEXT NOT NULL,
    byte_offset BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (recording_id, byte_offset)
);
ALTER TABLE recordings ADD COLUMN end_reason TEXT;
