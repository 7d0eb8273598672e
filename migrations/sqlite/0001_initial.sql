-- Postern schema, version 1 (SQLite). Keep in step with ../postgres/0001_initial.sql.
-- Names are the primary keys: they are what people type, and renames are not offered.
CREATE TABLE cluster (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cluster_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE root_keys (
    purpose TEXT PRIMARY KEY,
    sealed TEXT NOT NULL,
    public TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    password_hash TEXT,
    locked BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE api_tokens (
    token_hash TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    last_used_at BIGINT
);
CREATE INDEX api_tokens_user ON api_tokens (user_name);
CREATE TABLE groups (
    name TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);
CREATE TABLE group_members (
    group_name TEXT NOT NULL,
    user_name TEXT NOT NULL,
    PRIMARY KEY (group_name, user_name)
);
CREATE INDEX group_members_user ON group_members (user_name);
CREATE TABLE roles (
    name TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);
CREATE TABLE role_rules (
    role_name TEXT NOT NULL,
    position BIGINT NOT NULL,
    rule TEXT NOT NULL,
    PRIMARY KEY (role_name, position)
);
CREATE TABLE role_bindings (
    role_name TEXT NOT NULL,
    principal_kind TEXT NOT NULL,
    principal_name TEXT NOT NULL,
    PRIMARY KEY (role_name, principal_kind, principal_name)
);
CREATE INDEX role_bindings_principal ON role_bindings (principal_kind, principal_name);
CREATE TABLE targets (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    address TEXT NOT NULL,
    labels TEXT NOT NULL,
    default_duration BIGINT NOT NULL,
    max_duration BIGINT NOT NULL,
    connection_limit BIGINT,
    worker_filter TEXT NOT NULL,
    enabled BIGINT NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL
);
CREATE TABLE workers (
    name TEXT PRIMARY KEY,
    tags TEXT NOT NULL,
    activation_hash TEXT,
    activation_expires_at BIGINT,
    cert_fingerprint TEXT,
    session_addr TEXT,
    connected_to TEXT,
    last_seen BIGINT,
    created_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX workers_cert ON workers (cert_fingerprint);
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    target_name TEXT NOT NULL,
    worker_name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    activated_at BIGINT,
    ended_at BIGINT,
    end_reason TEXT,
    connections BIGINT NOT NULL DEFAULT 0,
    bytes_up BIGINT NOT NULL DEFAULT 0,
    bytes_down BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX sessions_status ON sessions (status);
CREATE INDEX sessions_user ON sessions (user_name);
CREATE INDEX sessions_target ON sessions (target_name);
CREATE TABLE audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    outcome TEXT NOT NULL,
    details TEXT NOT NULL
);
CREATE INDEX audit_events_time ON audit_events (time);
