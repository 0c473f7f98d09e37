-- The CRM row each acknowledged user was made from, as PostgreSQL hashes it (salted with what
-- changes a row's meaning), and its hide_phone flag: a row that comes back unchanged becomes
-- the same user again without being normalized. NULL for users synced before this column.
ALTER TABLE mirror_users ADD COLUMN source_hash bigint;
ALTER TABLE mirror_users ADD COLUMN hide_phone boolean;
