-- A sample CRM: its own tables, and the three views wazzup-sync reads.
CREATE TABLE companies (
    id serial PRIMARY KEY,
    name text NOT NULL,
    wazzup_token text,
    notify_supervisors boolean NOT NULL DEFAULT false
);
CREATE TABLE employees (
    id serial PRIMARY KEY,
    company_id int NOT NULL REFERENCES companies(id),
    full_name text,
    mobile text,
    is_active boolean NOT NULL DEFAULT true,
    hide_client_phones boolean NOT NULL DEFAULT false
);
CREATE TABLE channel_access (
    employee_id int NOT NULL REFERENCES employees(id),
    channel_uuid text NOT NULL,
    crm_role text NOT NULL,
    gets_new_leads boolean NOT NULL DEFAULT false
);
CREATE VIEW wazzup_accounts AS
    SELECT id::text AS account_id, wazzup_token AS token,
           notify_supervisors AS push_input_output_message_events_for_managers
    FROM companies WHERE wazzup_token IS NOT NULL;
CREATE VIEW wazzup_users AS
    SELECT company_id::text AS account_id, id::text AS id, full_name AS name,
           mobile AS phone, hide_client_phones AS hide_phone
    FROM employees WHERE is_active;
CREATE VIEW wazzup_user_roles AS
    SELECT e.company_id::text AS account_id, e.id::text AS user_id, a.channel_uuid AS channel_id,
           CASE a.crm_role WHEN 'Manager' THEN 'seller' WHEN 'Supervisor' THEN 'manager'
                           WHEN 'Quality Control' THEN 'auditor' ELSE a.crm_role END AS role,
           a.gets_new_leads AS allow_get_new_clients
    FROM channel_access a JOIN employees e ON e.id = a.employee_id
    WHERE e.is_active;
