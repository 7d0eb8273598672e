-- A code-flow login gets its API token only when the CLI presents the confirmation code: until
-- then the attempt keeps who the IdP vouched for (user_name) and how (the `auth.login` audit
-- details, JSON), so an attempt never confirmed leaves no token behind. Keep in step with the
-- other folder's file of this number.
ALTER TABLE oidc_attempts ADD COLUMN login_details TEXT;
