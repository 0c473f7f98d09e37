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

mod lag;

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
    /// The latency phase: a cold sync with every answer of the simulator delayed this much.
    #[arg(long, default_value_t = 150)]
    latency_ms: u64,
    /// Skip the latency phase.
    #[arg(long)]
    no_latency: bool,
    /// Skip the lag-under-load phase.
    #[arg(long)]
    no_lag: bool,
    /// Seconds of writing per rate in the lag phase (default: 60, or 5 below 100,000 users).
    #[arg(long)]
    lag_secs: Option<u64>,
    /// The lag phase's edit rates, per second.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    lag_rates: Vec<u32>,
    /// The lag phase's NOTIFY payload: `account` (the account id) or `all` (empty).
    #[arg(long, default_value = "account", value_parser = ["account", "all"])]
    lag_payload: String,
    /// Run the daemon under this command (for profiling), e.g.
    /// `--wrap "perf record -g -o /tmp/perf.data --"`; CPU and memory then include it.
    #[arg(long)]
    wrap: Option<String>,
}

struct Phase {
    name: &'static str,
    run: Run,
    requests: usize,
    floor: Option<usize>,
    users: usize,
}

/// One measured run of the daemon.
#[derive(Default, Clone, Copy)]
struct Run {
    wall: Duration,
    /// The daemon's user + system CPU time.
    cpu: Duration,
    /// The PostgreSQL server's (CRM and state are one server here).
    server_cpu: Duration,
    peak_rss_kib: u64,
}

/// User + system CPU time of this process's children that have been waited for
/// (/proc/self/stat: cutime and cstime, in clock ticks).
fn children_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // In `rest`, field 3 of stat(5) is at index 0: cutime is field 16, cstime 17.
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_secs_f64((ticks(16) + ticks(17)) as f64 / clock_ticks() as f64)
}

pub(crate) fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

fn daemon_path(args: &Args) -> PathBuf {
    args.daemon.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().expect("own path");
        me.with_file_name("wazzup-sync")
    })
}

/// Runs one `wazzup-sync sync`, polling its peak resident memory (VmHWM) while it runs, and
/// measuring its CPU time and the database server's.
async fn run_daemon(args: &Args, pool: &PgPool, env: &[(String, String)]) -> anyhow::Result<Run> {
    let sampler = lag::CpuSampler::start(pool.clone(), String::new(), String::new());
    let cpu_before = children_cpu();
    let started = Instant::now();
    let mut command = match &args.wrap {
        Some(wrap) => {
            let mut words = wrap.split_whitespace();
            let mut c = tokio::process::Command::new(words.next().unwrap_or("env"));
            c.args(words).arg(daemon_path(args));
            c
        }
        None => tokio::process::Command::new(daemon_path(args)),
    };
    let mut child = command
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
                let wall = started.elapsed();
                let cpu = children_cpu().saturating_sub(cpu_before);
                let server = sampler.stop().await;
                anyhow::ensure!(status.success(), "wazzup-sync sync failed: {status}");
                return Ok(Run {
                    wall,
                    cpu,
                    server_cpu: server.server,
                    peak_rss_kib: peak,
                });
            }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
}

/// The CRM server's time for the fingerprint queries a cycle starts with (best of 3): per
/// account, its rows and the sum of their hashes, each row hashed over the columns read.
async fn fingerprint_time(pool: &PgPool) -> anyhow::Result<Duration> {
    let hash = |cols: &[&str]| {
        cols.iter()
            .enumerate()
            .map(|(n, c)| format!("coalesce(hashtextextended(q.{c}::text, {n}), {n})"))
            .collect::<Vec<_>>()
            .join(" # ")
    };
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        for (q, cols) in [
            (
                "SELECT * FROM wazzup_users",
                hash(&["account_id", "id", "name", "phone"]),
            ),
            (
                "SELECT * FROM wazzup_user_roles",
                hash(&[
                    "account_id",
                    "user_id",
                    "channel_id",
                    "role",
                    "allow_get_new_clients",
                ]),
            ),
        ] {
            sqlx::query(AssertSqlSafe(format!(
                "SELECT account_id::text, count(*), COALESCE(sum({cols}), 0)::text FROM ({q}) AS q GROUP BY 1"
            )))
            .fetch_all(pool)
            .await?;
        }
        best = best.min(started.elapsed());
    }
    Ok(best)
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
                              role text NOT NULL, new_clients boolean NOT NULL,
                              PRIMARY KEY (company_id, employee_id, channel));
         CREATE VIEW wazzup_accounts AS SELECT id AS account_id, token FROM companies;
         CREATE VIEW wazzup_users AS
            SELECT company_id AS account_id, id::text AS id, name, mobile AS phone FROM employees;
         CREATE VIEW wazzup_user_roles AS
            SELECT company_id AS account_id, employee_id::text AS user_id, channel AS channel_id,
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
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // The first processor's fields: a cloud's CPU names often say only "AMD EPYC", so the
    // family, model and clock tell two machines of the same name apart.
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut cpu = field("model name").unwrap_or_else(|| "unknown CPU".into());
    if let (Some(family), Some(model)) = (field("cpu family"), field("model")) {
        cpu.push_str(&format!(" (family {family}, model {model}"));
        if let Some(mhz) = field("cpu MHz") {
            cpu.push_str(&format!(", {mhz} MHz"));
        }
        cpu.push(')');
    }
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
        // Leavers deleted in the cycle they leave, as in the earlier results (the default
        // grace would delete them a day later).
        ("WAZZUP_SYNC__SYNC__DELETE_GRACE".into(), "0s".into()),
    ];
    let mut phases = Vec::new();

    eprintln!("Cold sync...");
    let run = run_daemon(args, &pool, &env).await?;
    let cold_floor = args.accounts * (args.users.div_ceil(100) + 1);
    phases.push(Phase {
        name: "cold sync",
        run,
        requests: sim.request_count(),
        floor: Some(cold_floor),
        users: total,
    });

    eprintln!("No-change cycle...");
    sim.clear_requests();
    let run = run_daemon(args, &pool, &env).await?;
    phases.push(Phase {
        name: "no-change cycle",
        run,
        requests: sim.request_count(),
        floor: Some(0),
        users: total,
    });
    let fingerprints = fingerprint_time(&pool).await?;

    eprintln!("1 % change cycle...");
    let floor = change_one_percent(&pool, args).await?;
    sim.clear_requests();
    let run = run_daemon(args, &pool, &env).await?;
    phases.push(Phase {
        name: "1 % change cycle",
        run,
        requests: sim.request_count(),
        floor: Some(floor),
        users: total,
    });

    eprintln!("Raw read floor...");
    let mut floor_wall = Duration::MAX;
    for _ in 0..3 {
        floor_wall = floor_wall.min(read_floor(&pool).await?);
    }
    phases.push(Phase {
        name: "raw read floor (COPY)",
        run: Run {
            wall: floor_wall,
            ..Default::default()
        },
        requests: 0,
        floor: None,
        users: total,
    });
    let latency = if args.no_latency {
        String::new()
    } else {
        latency_phase(args, &pool, &env).await?
    };
    pool.close().await;
    let lag = if args.no_lag {
        String::new()
    } else {
        let secs = args
            .lag_secs
            .unwrap_or(if total >= 100_000 { 60 } else { 5 });
        lag::lag_phase(&lag::LagSetup {
            crm_url: url,
            daemon: daemon_path(args),
            env: &env,
            accounts: args.accounts,
            users: args.users,
            rates: &args.lag_rates,
            secs,
            payload: &args.lag_payload,
        })
        .await?
    };

    let no_change = phases[1].run.wall.as_secs_f64();
    let ratio = no_change / floor_wall.as_secs_f64();
    // What a one-shot `sync` costs besides the CRM's work: start, connect, migrations check.
    let fixed = (no_change - fingerprints.as_secs_f64()).max(0.0);
    let report = format!(
        "## {} accounts x {} users x {} channels ({} users)\n\nRun {} on {}.\n\n{}\nNo-change cycle / raw read floor: {:.2}x. The CRM server's time for the fingerprint queries of a cycle: {:.2} s; the no-change one-shot `sync` less that time (its fixed cost): {:.2} s.\n\n{latency}{lag}",
        args.accounts,
        args.users,
        args.channels,
        total,
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        machine(),
        table(&phases),
        ratio,
        fingerprints.as_secs_f64(),
        fixed
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

/// The phases as a Markdown table: wall, daemon CPU, CPU per user, requests, memory.
fn table(phases: &[Phase]) -> String {
    let mut t = String::from(
        "| phase | wall | daemon CPU (user+sys) | CPU per user | database server CPU | users/s | requests | request floor | daemon peak RSS |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in phases {
        let measured = p.floor.is_some();
        let cell = |show: bool, v: String| if show { v } else { String::new() };
        t.push_str(&format!(
            "| {} | {:.2} s | {} | {} | {} | {} | {} | {} | {} |\n",
            p.name,
            p.run.wall.as_secs_f64(),
            cell(measured, format!("{:.2} s", p.run.cpu.as_secs_f64())),
            cell(
                measured,
                format!(
                    "{:.1} µs",
                    p.run.cpu.as_secs_f64() * 1e6 / p.users.max(1) as f64
                )
            ),
            cell(measured, format!("{:.2} s", p.run.server_cpu.as_secs_f64())),
            cell(
                p.name == "cold sync",
                format!("{:.0}", p.users as f64 / p.run.wall.as_secs_f64())
            ),
            cell(measured, p.requests.to_string()),
            p.floor.map(|f| f.to_string()).unwrap_or_default(),
            cell(
                p.run.peak_rss_kib > 0,
                format!("{:.1} MiB", p.run.peak_rss_kib as f64 / 1024.0)
            ),
        ));
    }
    t
}

/// A cold sync into a simulator that delays every answer, as the real API across the
/// internet does: wall time and the requests in flight (default settings, a state schema of
/// its own).
async fn latency_phase(
    args: &Args,
    pool: &PgPool,
    env: &[(String, String)],
) -> anyhow::Result<String> {
    eprintln!("Cold sync with {} ms of API latency...", args.latency_ms);
    let sim = Simulator::start("127.0.0.1:0", true).await?;
    sim.set_latency(args.latency_ms);
    let mut env: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| k != "WAZZUP_SYNC__WAZZUP__BASE_URL")
        .cloned()
        .collect();
    env.push(("WAZZUP_SYNC__WAZZUP__BASE_URL".into(), sim.url()));
    env.push((
        "WAZZUP_SYNC__STATE__SCHEMA".into(),
        "wazzup_sync_latency".into(),
    ));
    let run = run_daemon(args, pool, &env).await?;
    let flight = sim.in_flight();
    Ok(format!(
        "Cold sync with {} ms of API latency (after the 1 % change: {} requests): {:.2} s wall, {:.2} s daemon CPU; requests in flight: peak {}, mean {:.1}.\n\n",
        args.latency_ms,
        sim.request_count(),
        run.wall.as_secs_f64(),
        run.cpu.as_secs_f64(),
        flight.peak,
        flight.mean
    ))
}
