-- A fingerprint of the account's CRM rows (and the settings that give them meaning) as of its
-- last clean cycle: an account whose fingerprint is unchanged is not read row by row again.
ALTER TABLE accounts ADD COLUMN source_fingerprint text;
