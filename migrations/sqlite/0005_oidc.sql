-- OpenID Connect logins (issue 4). Keep in step with the other folder's 0005_oidc.sql.
-- Users created at their first OIDC login, linked to the IdP's (issuer, subject).
CREATE TABLE oidc_identities (
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    user_name TEXT NOT NULL,
    method TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_login_at BIGINT NOT NULL,
    PRIMARY KEY (issuer, subject)
);
CREATE INDEX oidc_identities_user ON oidc_identities (user_name);
-- Group memberships that came from an IdP's groups claim (and only those: a membership an
-- admin added stays untouched by the sync at login).
CREATE TABLE oidc_group_members (
    group_name TEXT NOT NULL,
    user_name TEXT NOT NULL,
    issuer TEXT NOT NULL,
    PRIMARY KEY (group_name, user_name)
);
CREATE INDEX oidc_group_members_user ON oidc_group_members (user_name);
-- Logins in progress, shared by every controller on the database. `id` is the secret the
-- CLI polls with; `state_hash` is SHA-256 of the code flow's `state`. The API token waits
-- here sealed under the KEK until the CLI collects it, once.
CREATE TABLE oidc_attempts (
    id TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    flow TEXT NOT NULL,
    state_hash TEXT,
    nonce TEXT,
    pkce_verifier TEXT,
    status TEXT NOT NULL,
    user_name TEXT,
    token_sealed TEXT,
    token_expires_at BIGINT,
    message TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX oidc_attempts_state ON oidc_attempts (state_hash);
CREATE INDEX oidc_attempts_expires ON oidc_attempts (expires_at);
