//! The demo: a sample CRM seeded in a throwaway database on a local PostgreSQL, synced into
//! this simulator by the real `wazzup-sync` binary, three cycles, told as they happen.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use anyhow::Context;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Executor};

use crate::Simulator;

const DEMO_DB: &str = "wazzup_sync_demo";

/// The sample CRM: its own tables, and the three views the daemon reads.
pub const SAMPLE_CRM_SQL: &str = include_str!("../../../examples/sample-crm/schema.sql");

/// What the demo is asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// PostgreSQL to use (a database is created in it, and dropped unless `keep`).
    pub database_url: String,
    pub accounts: usize,
    pub users: usize,
    pub keep: bool,
    /// The `wazzup-sync` binary to run.
    pub daemon: PathBuf,
}

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
    pool.execute(
        "INSERT INTO channel_access (employee_id, channel_uuid, crm_role, gets_new_leads)
         SELECT e.id, md5('channel-' || e.company_id || '-' || ch)::uuid::text,
                CASE WHEN e.id % 50 = 0 THEN 'Supervisor' WHEN e.id % 10 = 3 THEN 'Quality Control'
                     ELSE 'Manager' END,
                e.id % 2 = 0
         FROM employees e, generate_series(1, 2) ch;
         -- Rows a real CRM has: no name, a phone someone else has, a role nobody knows.
         INSERT INTO employees (company_id, full_name, mobile) VALUES (1, '   ', NULL);
         INSERT INTO employees (company_id, full_name, mobile)
            SELECT 1, 'Copy of first employee', mobile FROM employees WHERE company_id = 1 ORDER BY id LIMIT 1;
         INSERT INTO channel_access (employee_id, channel_uuid, crm_role)
            SELECT id, md5('channel-1-1')::uuid::text, 'Director' FROM employees WHERE company_id = 1 ORDER BY id LIMIT 1 OFFSET 1;",
    )
    .await?;
    Ok(())
}

/// Runs the demo.
pub async fn run(opts: &DemoOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        opts.daemon.exists(),
        "The wazzup-sync binary is not at {} (build it: cargo build --release -p wazzup-sync)",
        opts.daemon.display()
    );
    let admin = PgPool::connect(&opts.database_url).await.map_err(|e| {
        anyhow::anyhow!("Failed to connect to PostgreSQL for the demo ({e}); start one with scripts/ensure-postgres")
    })?;
    recreate(&admin).await?;
    let mut url = url::Url::parse(&opts.database_url)?;
    url.set_path(&format!("/{DEMO_DB}"));
    let crm = PgPool::connect(url.as_str()).await?;
    println!(
        "Seeding a sample CRM in database {DEMO_DB}: {} companies x {} employees, 2 channels each",
        opts.accounts, opts.users
    );
    seed_sample(&crm, opts.accounts, opts.users).await?;
    let sim = Simulator::start("127.0.0.1:0", false).await?;
    for i in 1..=opts.accounts {
        sim.add_account(&format!("demo-token-{i}"));
    }
    println!("Wazzup simulator listening on {}", sim.url());

    let cycle = |title: &'static str| sync_cycle(opts, url.as_str(), &sim, title);
    cycle("First sync").await?;
    crm.execute(
        "UPDATE employees SET full_name = full_name || ' (senior)' WHERE id % 50 = 1 AND btrim(full_name) <> '';
         UPDATE employees SET is_active = false WHERE id % 97 = 0;
         UPDATE channel_access SET crm_role = 'Supervisor' WHERE employee_id % 41 = 0;",
    )
    .await?;
    cycle("After renames, departures and role changes").await?;
    cycle("Nothing changed").await?;

    print_outcome(&crm, &sim).await?;
    for args in [
        &["history", "--account", "1", "--limit", "5"][..],
        &["access", "--account", "1", "--role", "manager"][..],
    ] {
        print_command(opts, url.as_str(), args).await?;
    }
    crm.close().await;
    if opts.keep {
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

async fn recreate(admin: &PgPool) -> anyhow::Result<()> {
    admin
        .execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {DEMO_DB} WITH (FORCE)"
        )))
        .await?;
    admin
        .execute(AssertSqlSafe(format!("CREATE DATABASE {DEMO_DB}")))
        .await?;
    Ok(())
}

/// One `wazzup-sync sync`: its refusals and its summary, as a line each.
async fn sync_cycle(
    opts: &DemoOptions,
    crm_url: &str,
    sim: &Simulator,
    title: &str,
) -> anyhow::Result<()> {
    let before = sim.request_count();
    let started = Instant::now();
    let out = tokio::process::Command::new(&opts.daemon)
        .arg("sync")
        .env("WAZZUP_SYNC__SOURCE__URL", crm_url)
        .env("WAZZUP_SYNC__WAZZUP__BASE_URL", sim.url())
        .env("WAZZUP_SYNC__SOURCE__DEFAULT_PHONE_REGION", "RU")
        .env("WAZZUP_SYNC__LOG__FORMAT", "json")
        .env(
            "WAZZUP_SYNC__LOG__LEVEL",
            "warn,wazzup_sync::sync::report=info",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .context("Failed to run wazzup-sync")?;
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for l in lines.iter().filter(|l| l["level"] == "WARN") {
        println!(
            "  warning: {}: {} {} {}: {}",
            l["message"].as_str().unwrap_or_default(),
            l["entity"].as_str().unwrap_or_default(),
            l["record_id"].as_str().unwrap_or_default(),
            l["code"].as_str().unwrap_or_default(),
            l["reason"].as_str().unwrap_or_default()
        );
    }
    let Some(c) = lines.iter().find(|l| l["message"] == "Cycle finished") else {
        anyhow::bail!("wazzup-sync sync did not finish its cycle:\n{log}");
    };
    let n = |field: &str| c[field].as_u64().unwrap_or(0);
    println!(
        "{title}: {} accounts, {} created, {} updated, {} deleted, {} leaving, {} settings pushed, {} refused locally, {} refused by Wazzup; {} requests, {:.2} s",
        n("accounts"),
        n("created"),
        n("updated"),
        n("deleted"),
        n("leaving"),
        n("settings_pushed"),
        n("rejected_locally"),
        n("rejected_remotely"),
        sim.request_count() - before,
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        out.status.success(),
        "wazzup-sync sync exited with {}",
        out.status
    );
    Ok(())
}

/// Runs a read-only command of the daemon over the demo's state, and prints it with its output.
async fn print_command(opts: &DemoOptions, crm_url: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(&opts.daemon)
        .args(args)
        .env("WAZZUP_SYNC__SOURCE__URL", crm_url)
        .env("WAZZUP_SYNC__LOG__LEVEL", "warn")
        .output()
        .await
        .context("Failed to run wazzup-sync")?;
    println!("$ wazzup-sync {}", args.join(" "));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    anyhow::ensure!(
        out.status.success(),
        "wazzup-sync {} exited with {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn print_outcome(crm: &PgPool, sim: &Simulator) -> anyhow::Result<()> {
    let dead: Vec<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT account_id, entity, record_id, error_code, error_message
         FROM wazzup_sync.dead_letters WHERE resolved_at IS NULL ORDER BY id",
    )
    .fetch_all(crm)
    .await?;
    println!("Open dead letters ({}):", dead.len());
    for (account, entity, record, code, message) in dead {
        println!("  account {account} {entity} {record:?}: {code}: {message}");
    }
    println!(
        "Wazzup now holds {} users for company 1; its settings have {} role rows",
        sim.users("demo-token-1").len(),
        sim.settings("demo-token-1").user_roles.len()
    );
    Ok(())
}
