//! `wazzup-sync demo`: seeds a sample CRM in a throwaway database on a local PostgreSQL and
//! syncs it into an in-process simulator, printing what happens.

use std::time::Instant;

use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Executor};

use crate::config::Settings;
use crate::simulator::Simulator;
use crate::sync::{CycleOptions, CycleReport};

const DEMO_DB: &str = "wazzup_sync_demo";

/// The sample CRM: its own tables, and the three views the daemon reads.
pub const SAMPLE_CRM_SQL: &str = include_str!("../examples/sample-crm/schema.sql");

/// Fills the sample CRM: `accounts` companies with `users` employees each, two channels each,
/// plus three broken rows a real CRM would have.
pub async fn seed_sample(pool: &PgPool, accounts: usize, users: usize) -> anyhow::Result<()> {
    pool.execute(SAMPLE_CRM_SQL).await?;
    sqlx::query(
        "INSERT INTO companies (name, wazzup_token, notify_supervisors)
         SELECT 'Company ' || g, 'demo-token-' || g, g % 2 = 0 FROM generate_series(1, $1) g",
    )
    .bind(accounts as i32)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO employees (company_id, full_name, mobile, hide_client_phones)
         SELECT c.id, 'Employee ' || c.id || '-' || g,
                '+7 9' || lpad((c.id * 1000 + g)::text, 9, '0'), g % 5 = 0
         FROM companies c, generate_series(1, $1) g ORDER BY c.id, g",
    )
    .bind(users as i32)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO channel_access (employee_id, channel_uuid, crm_role, gets_new_leads)
         SELECT e.id, md5('channel-' || e.company_id || '-' || ch)::uuid::text,
                (ARRAY['Manager', 'Supervisor', 'Quality Control'])[1 + e.id % 3], e.id % 2 = 0
         FROM employees e, generate_series(1, 2) ch",
    )
    .execute(pool)
    .await?;
    // Rows a real CRM has: no name, a phone someone else has, a role nobody knows.
    pool.execute(
        "INSERT INTO employees (company_id, full_name, mobile) VALUES (1, '   ', NULL);
         INSERT INTO employees (company_id, full_name, mobile)
            SELECT 1, 'Copy of first employee', mobile FROM employees WHERE company_id = 1 ORDER BY id LIMIT 1;
         INSERT INTO channel_access (employee_id, channel_uuid, crm_role)
            SELECT id, md5('channel-1-1')::uuid::text, 'Director' FROM employees WHERE company_id = 1 ORDER BY id LIMIT 1 OFFSET 1;",
    )
    .await?;
    Ok(())
}

fn say_cycle(
    title: &str,
    r: &CycleReport,
    sim: &Simulator,
    requests_before: usize,
    started: Instant,
) {
    let sum = |f: fn(&crate::sync::AccountReport) -> usize| r.accounts.iter().map(f).sum::<usize>();
    println!(
        "{title}: {} accounts, {} created, {} updated, {} deleted, {} settings pushed, {} refused locally, {} refused by Wazzup; {} requests, {:.2} s",
        r.accounts.len(),
        sum(|a| a.created),
        sum(|a| a.updated),
        sum(|a| a.deleted),
        sum(|a| a.settings_pushed as usize),
        sum(|a| a.rejected_locally),
        sum(|a| a.rejected_remotely),
        sim.request_count() - requests_before,
        started.elapsed().as_secs_f64()
    );
}

/// Runs the demo against the PostgreSQL at `admin_url`.
pub async fn run(admin_url: &str, accounts: usize, users: usize, keep: bool) -> anyhow::Result<()> {
    let admin = PgPool::connect(admin_url).await.map_err(|e| {
        anyhow::anyhow!("Failed to connect to PostgreSQL for the demo ({e}); start one with scripts/ensure-postgres")
    })?;
    admin
        .execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {DEMO_DB} WITH (FORCE)"
        )))
        .await?;
    admin
        .execute(AssertSqlSafe(format!("CREATE DATABASE {DEMO_DB}")))
        .await?;
    let mut url = reqwest::Url::parse(admin_url)?;
    url.set_path(&format!("/{DEMO_DB}"));
    let crm = PgPool::connect(url.as_str()).await?;
    println!(
        "Seeding a sample CRM in database {DEMO_DB}: {accounts} companies x {users} employees, 2 channels each"
    );
    seed_sample(&crm, accounts, users).await?;

    let sim = Simulator::start("127.0.0.1:0", false).await?;
    for i in 1..=accounts {
        sim.add_account(&format!("demo-token-{i}"));
    }
    println!("Wazzup simulator listening on {}", sim.url());

    let settings = Settings::load_from(
        None,
        [
            ("WAZZUP_SYNC__SOURCE__URL".to_string(), url.to_string()),
            ("WAZZUP_SYNC__WAZZUP__BASE_URL".to_string(), sim.url()),
            (
                "WAZZUP_SYNC__SOURCE__DEFAULT_PHONE_REGION".to_string(),
                "RU".to_string(),
            ),
        ],
    )?;

    let before = sim.request_count();
    let t = Instant::now();
    let r = crate::app::sync_once(settings.clone(), CycleOptions::default()).await?;
    say_cycle("First sync", &r, &sim, before, t);

    crm.execute(
        "UPDATE employees SET full_name = full_name || ' (senior)' WHERE id % 50 = 1 AND btrim(full_name) <> '';
         UPDATE employees SET is_active = false WHERE id % 97 = 0;
         UPDATE channel_access SET crm_role = 'Supervisor' WHERE employee_id % 41 = 0;",
    )
    .await?;
    let before = sim.request_count();
    let t = Instant::now();
    let r = crate::app::sync_once(settings.clone(), CycleOptions::default()).await?;
    say_cycle(
        "After renames, departures and role changes",
        &r,
        &sim,
        before,
        t,
    );

    let before = sim.request_count();
    let t = Instant::now();
    let r = crate::app::sync_once(settings.clone(), CycleOptions::default()).await?;
    say_cycle("Nothing changed", &r, &sim, before, t);

    let dead: Vec<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT account_id, entity, record_id, error_code, error_message
         FROM wazzup_sync.dead_letters WHERE resolved_at IS NULL ORDER BY id",
    )
    .fetch_all(&crm)
    .await?;
    println!("Open dead letters ({}):", dead.len());
    for (account, entity, record, code, message) in dead {
        println!("  account {account} {entity} {record:?}: {code}: {message}");
    }
    let first = sim.users("demo-token-1");
    println!(
        "Wazzup now holds {} users for company 1; its settings have {} role rows",
        first.len(),
        sim.settings("demo-token-1").user_roles.len()
    );
    crm.close().await;
    if keep {
        println!("The demo database {DEMO_DB} is kept for you to look at.");
    } else {
        admin
            .execute(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {DEMO_DB} WITH (FORCE)"
            )))
            .await?;
    }
    Ok(())
}
