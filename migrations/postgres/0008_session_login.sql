-- The login a session runs as on its target (SSH user, database user; the brokered
-- credential's own user when the client named none), so that a rule change denying that
-- login ends the session. Keep in step with the other folder's 0008_session_login.sql.
ALTER TABLE sessions ADD COLUMN login TEXT;
