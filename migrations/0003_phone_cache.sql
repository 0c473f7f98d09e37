-- The phone each synced user was read from and what it became, so an unchanged phone is not
-- parsed again every cycle. phone_source holds the region and the CRM's text.
ALTER TABLE mirror_users ADD COLUMN phone_source text;
ALTER TABLE mirror_users ADD COLUMN phone text;
ALTER TABLE mirror_users ADD COLUMN phone_valid boolean;
