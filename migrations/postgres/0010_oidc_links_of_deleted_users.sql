-- Deleting a user now deletes its links to IdP identities and its IdP-managed memberships
-- (a link left behind let that identity into a later user of the same name). Forgets those
-- left by deletions before. Keep in step with the other folder's file of this number.
DELETE FROM oidc_identities WHERE user_name NOT IN (SELECT name FROM users);
DELETE FROM oidc_group_members WHERE user_name NOT IN (SELECT name FROM users);
