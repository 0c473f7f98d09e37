-- The name Wazzup last acknowledged for each user, so `plan --detail` can show what changes.
-- NULL for users synced before this column existed.
ALTER TABLE mirror_users ADD COLUMN name text;
