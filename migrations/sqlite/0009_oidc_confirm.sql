-- A code-flow login's token goes only to the terminal that started it: the callback gives the
-- browser a confirmation code (only its SHA-256 is kept here), which the CLI must present to
-- collect the token, straight from a redirect to its loopback port (`return_port`) or typed
-- in. Wrong codes are counted; the third fails the attempt. Keep in step with the other
-- folder's 0009_oidc_confirm.sql.
ALTER TABLE oidc_attempts ADD COLUMN return_port BIGINT;
ALTER TABLE oidc_attempts ADD COLUMN confirm_hash TEXT;
ALTER TABLE oidc_attempts ADD COLUMN confirm_failures BIGINT NOT NULL DEFAULT 0;
