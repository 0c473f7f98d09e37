//! The benchmark harness: a generated CRM on a real local PostgreSQL, the simulator on loopback,
//! and the real `wazzup-sync` binary as a separate process whose memory is measured.
//!
//! `cargo run --release --bin bench -- --accounts 1000 --users 1000 --channels 2`
//! prints a table and writes it to bench/results.md with the machine it ran on.

#![allow(clippy::too_many_lines)] // A harness: each phase reads best whole.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Executor};
use wazzup_sim::Simulator;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20)]
    accounts: usize,
    #[arg(long, default_value_t = 200)]
    users: usize,
    #[arg(long, default_value_t = 2)]
    channels: usize,
    /// PostgreSQL to create the benchmark database in.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Where the Markdown report goes (appended under a heading for this run).
    #[arg(long, default_value = "bench/results.md")]
    out: PathBuf,
    /// The daemon binary (default: the one built beside this harness).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// Keep the benchmark database afterwards (for profiling a cycle by hand).
    #[arg(long)]
    keep: bool,
}

struct Phase {
    name: &'static str,
    wall: Duration,
    requests: usize,
    floor: Option<usize>,
    peak_rss_kib: u64,
    users: usize,
}

fn daemon_path(args: &Args) -> PathBuf {
    args.daemon.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().expect("own path");
        me.with_file_name("wazzup-sync")
    })
}

/// Runs one `wazzup-sync sync`, polling its peak resident memory (VmHWM) while it runs.
async fn run_daemon(args: &Args, env: &[(String, String)]) -> anyhow::Result<(Duration, u64)> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(daemon_path(args))
        .arg("sync")
        .envs(env.iter().cloned())
        .env("WAZZUP_SYNC__LOG__FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("Failed to start wazzup-sync (build it with cargo build --release)")?;
    let pid = child.id().unwrap_or(0);
    let mut peak = 0u64;
    loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kib: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            peak = peak.max(kib);
        }
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                anyhow::ensure!(status.success(), "wazzup-sync sync failed: {status}");
                return Ok((started.elapsed(), peak));
            }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
}

/// The time PostgreSQL takes to hand the three queries' rows to a client (COPY ... TO STDOUT).
async fn read_floor(pool: &PgPool) -> anyhow::Result<Duration> {
    use futures::StreamExt;
    let started = Instant::now();
    for q in [
        "SELECT * FROM wazzup_accounts",
        "SELECT * FROM wazzup_users",
        "SELECT * FROM wazzup_user_roles",
    ] {
        let mut conn = pool.acquire().await?;
        let mut stream = conn.copy_out_raw(&format!("COPY ({q}) TO STDOUT")).await?;
        let mut bytes = 0usize;
        while let Some(chunk) = stream.next().await {
            bytes += chunk?.len();
        }
        std::hint::black_box(bytes);
    }
    Ok(started.elapsed())
}

async fn seed(pool: &PgPool, args: &Args) -> anyhow::Result<()> {
    pool.execute(
        "CREATE TABLE companies (id int PRIMARY KEY, token text NOT NULL);
         CREATE TABLE employees (company_id int NOT NULL, id int NOT NULL, name text NOT NULL, mobile text,
                                 PRIMARY KEY (company_id, id));
         CREATE TABLE access (company_id int NOT NULL, employee_id int NOT NULL, channel text NOT NULL,
                              role text NOT NULL, new_clients boolean NOT NULL);
         CREATE VIEW wazzup_accounts AS SELECT id::text AS account_id, token FROM companies;
         CREATE VIEW wazzup_users AS
            SELECT company_id::text AS account_id, id::text AS id, name, mobile AS phone FROM employees;
         CREATE VIEW wazzup_user_roles AS
            SELECT company_id::text AS account_id, employee_id::text AS user_id, channel AS channel_id,
                   role, new_clients AS allow_get_new_clients FROM access;",
    )
    .await?;
    sqlx::query(
        "INSERT INTO companies SELECT g, 'bench-token-' || g FROM generate_series(1, $1) g",
    )
    .bind(args.accounts as i32)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO employees
         SELECT c, u, 'Employee ' || c || '-' || u, '+371 2' || lpad(((c * 1000 + u) % 10000000)::text, 7, '0')
         FROM generate_series(1, $1) c, generate_series(1, $2) u",
    )
    .bind(args.accounts as i32)
    .bind(args.users as i32)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO access
         SELECT company_id, id, 'channel-' || ch, (ARRAY['seller','manager','auditor'])[1 + (id + ch) % 3], id % 2 = 0
         FROM employees, generate_series(1, $1) ch",
    )
    .bind(args.channels as i32)
    .execute(pool)
    .await?;
    pool.execute("ANALYZE").await?;
    Ok(())
}

/// Changes 1 % of each account's users: renames, a few departures, a few role changes.
/// Returns the request floor for the change.
async fn change_one_percent(pool: &PgPool, args: &Args) -> anyhow::Result<usize> {
    let changed = (args.users / 100).max(1);
    let deleted = (changed / 4).max(1).min(changed);
    let renamed = changed - deleted;
    sqlx::query("UPDATE employees SET name = name || ' (moved)' WHERE id > $1 - $2 AND id <= $1")
        .bind(args.users as i32)
        .bind(renamed as i32)
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM access WHERE employee_id <= $1")
        .bind(deleted as i32)
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM employees WHERE id <= $1")
        .bind(deleted as i32)
        .execute(pool)
        .await?;
    sqlx::query("UPDATE access SET role = 'auditor' WHERE employee_id BETWEEN $1 + 1 AND $1 + 2 AND channel = 'channel-1'")
        .bind(deleted as i32)
        .execute(pool)
        .await?;
    // Per account: the renamed users' POSTs, one settings PATCH, the delete batches.
    let per_account = renamed.div_ceil(100) + 1 + deleted.div_ceil(100);
    Ok(per_account * args.accounts)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map(|kib| format!("{:.0} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} RAM")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admin = PgPool::connect(&args.database_url)
        .await
        .context("Failed to connect to PostgreSQL")?;
    let db = format!("wazzup_sync_bench_{}", std::process::id());
    admin
        .execute(AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .await?;
    let mut url = url::Url::parse(&args.database_url)?;
    url.set_path(&format!("/{db}"));
    let result = bench(&args, url.as_str()).await;
    if args.keep {
        eprintln!("Kept the database: {url}");
        return result;
    }
    admin
        .execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .await?;
    result
}

async fn bench(args: &Args, url: &str) -> anyhow::Result<()> {
    let total = args.accounts * args.users;
    eprintln!(
        "Seeding {} accounts x {} users x {} channels...",
        args.accounts, args.users, args.channels
    );
    let pool = PgPool::connect(url).await?;
    seed(&pool, args).await?;
    let sim = Simulator::start("127.0.0.1:0", true).await?;
    let env: Vec<(String, String)> = vec![
        ("WAZZUP_SYNC__SOURCE__URL".into(), url.to_string()),
        ("WAZZUP_SYNC__WAZZUP__BASE_URL".into(), sim.url()),
        (
            "WAZZUP_SYNC__SOURCE__DEFAULT_PHONE_REGION".into(),
            "LV".into(),
        ),
        ("WAZZUP_SYNC__SYNC__ALLOW_MASS_DELETE".into(), "true".into()),
    ];
    let mut phases = Vec::new();

    eprintln!("Cold sync...");
    let (wall, rss) = run_daemon(args, &env).await?;
    let requests = sim.request_count();
    let cold_floor = args.accounts * (args.users.div_ceil(100) + 1);
    phases.push(Phase {
        name: "cold sync",
        wall,
        requests,
        floor: Some(cold_floor),
        peak_rss_kib: rss,
        users: total,
    });

    eprintln!("No-change cycle...");
    sim.clear_requests();
    let (wall, rss) = run_daemon(args, &env).await?;
    phases.push(Phase {
        name: "no-change cycle",
        wall,
        requests: sim.request_count(),
        floor: Some(0),
        peak_rss_kib: rss,
        users: total,
    });

    eprintln!("1 % change cycle...");
    let floor = change_one_percent(&pool, args).await?;
    sim.clear_requests();
    let (wall, rss) = run_daemon(args, &env).await?;
    phases.push(Phase {
        name: "1 % change cycle",
        wall,
        requests: sim.request_count(),
        floor: Some(floor),
        peak_rss_kib: rss,
        users: total,
    });

    eprintln!("Raw read floor...");
    let mut floor_wall = Duration::MAX;
    for _ in 0..3 {
        floor_wall = floor_wall.min(read_floor(&pool).await?);
    }
    phases.push(Phase {
        name: "raw read floor (COPY)",
        wall: floor_wall,
        requests: 0,
        floor: None,
        peak_rss_kib: 0,
        users: total,
    });
    pool.close().await;

    let no_change = phases[1].wall.as_secs_f64();
    let mut table = String::new();
    table.push_str("| phase | wall | users/s | requests | request floor | daemon peak RSS |\n|---|---:|---:|---:|---:|---:|\n");
    for p in &phases {
        table.push_str(&format!(
            "| {} | {:.2} s | {} | {} | {} | {} |\n",
            p.name,
            p.wall.as_secs_f64(),
            if p.name == "cold sync" {
                format!("{:.0}", p.users as f64 / p.wall.as_secs_f64())
            } else {
                "".into()
            },
            if p.floor.is_some() {
                p.requests.to_string()
            } else {
                "".into()
            },
            p.floor.map(|f| f.to_string()).unwrap_or_default(),
            if p.peak_rss_kib > 0 {
                format!("{:.1} MiB", p.peak_rss_kib as f64 / 1024.0)
            } else {
                "".into()
            },
        ));
    }
    let ratio = no_change / floor_wall.as_secs_f64();
    let report = format!(
        "## {} accounts x {} users x {} channels ({} users)\n\nRun {} on {}.\n\n{}\nNo-change cycle / raw read floor: {:.2}x.\n\n",
        args.accounts,
        args.users,
        args.channels,
        total,
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        machine(),
        table,
        ratio
    );
    println!("{report}");
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)?;
    f.write_all(report.as_bytes())?;
    Ok(())
}
