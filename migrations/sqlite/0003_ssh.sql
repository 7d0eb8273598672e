-- (SQLite; keep in step with ../postgres/0003_ssh.sql)
-- SSH targets: the worker's SSH host key (pinned by `postern ssh` through the authorization)
-- and shell recordings (asciicast v2: the header line, then event lines appended as the
-- worker streams them).
ALTER TABLE workers ADD COLUMN ssh_host_key TEXT;
CREATE TABLE recordings (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    user_name TEXT NOT NULL,
    target_name TEXT NOT NULL,
    worker_name TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    size BIGINT NOT NULL DEFAULT 0,
    content TEXT NOT NULL
);
CREATE INDEX recordings_session ON recordings (session_id);
