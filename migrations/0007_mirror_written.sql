-- Each write of a mirror row takes the next number of this sequence, so that a daemon keeping
-- an account's mirror in memory reads only the rows written since it last looked. Rows written
-- before this migration have none (NULL: older than any number). No table rewrite: the default
-- applies to rows written from now on.
CREATE SEQUENCE mirror_write;
ALTER TABLE mirror_users ADD COLUMN written bigint;
ALTER TABLE mirror_users ALTER COLUMN written SET DEFAULT nextval('mirror_write');
