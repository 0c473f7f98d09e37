-- Sample rows for docker-compose: 3 companies x 50 employees, two channels each, and three
-- rows a real CRM would have (a blank name, a phone someone else has, an unknown role).
INSERT INTO companies (name, wazzup_token, notify_supervisors)
    SELECT 'Company ' || g, 'demo-token-' || g, g % 2 = 0 FROM generate_series(1, 3) g;
INSERT INTO employees (company_id, full_name, mobile, hide_client_phones)
    SELECT c.id, 'Employee ' || c.id || '-' || g, '+7 9' || lpad((c.id * 1000 + g)::text, 9, '0'), g % 5 = 0
    FROM companies c, generate_series(1, 50) g ORDER BY c.id, g;
INSERT INTO channel_access (employee_id, channel_uuid, crm_role, gets_new_leads)
    SELECT e.id, md5('channel-' || e.company_id || '-' || ch)::uuid::text,
           (ARRAY['Manager', 'Supervisor', 'Quality Control'])[1 + e.id % 3], e.id % 2 = 0
    FROM employees e, generate_series(1, 2) ch;
INSERT INTO employees (company_id, full_name, mobile) VALUES (1, '   ', NULL);
INSERT INTO employees (company_id, full_name, mobile)
    SELECT 1, 'Copy of first employee', mobile FROM employees WHERE company_id = 1 ORDER BY id LIMIT 1;
INSERT INTO channel_access (employee_id, channel_uuid, crm_role)
    SELECT id, md5('channel-1-1')::uuid::text, 'Director' FROM employees WHERE company_id = 1 ORDER BY id LIMIT 1 OFFSET 1;
