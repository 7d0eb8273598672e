-- Brokered target credentials, sealed under the KEK (purpose "credential:<target>").
CREATE TABLE credentials (
    target_name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    username TEXT NOT NULL,
    sealed TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
