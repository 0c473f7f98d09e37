//! The "lag under load" phase: the daemon's `run` with LISTEN, a NOTIFY trigger on the users
//! table (the account id as payload), and a writer renaming random users at a steady rate, each
//! rename its own transaction. It measures how long each edit takes from its commit to the
//! simulator, the cycles run, the daemon's CPU, and the CPU the daemon's sessions cost the
//! PostgreSQL server (read from /proc for each backend).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Executor};
use std::io::Write;

use tokio::io::AsyncBufReadExt;
use wazzup_sim::Simulator;

/// What the lag phase needs from the harness.
pub struct LagSetup<'a> {
    pub crm_url: &'a str,
    pub daemon: std::path::PathBuf,
    /// The harness's daemon environment (its simulator and state settings are replaced).
    pub env: &'a [(String, String)],
    pub accounts: usize,
    pub users: usize,
    pub rates: &'a [u32],
    pub secs: u64,
    /// The NOTIFY payload: the account id (`account`) or empty (`all`).
    pub payload: &'a str,
}

/// One rate's numbers.
struct RateResult {
    rate: u32,
    edits: usize,
    achieved: f64,
    lost: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    cycles: usize,
    window: Duration,
    daemon_cpu: Duration,
    crm_cpu: Duration,
    state_cpu: Duration,
    server_cpu: Duration,
    /// The daemon's peak resident memory so far.
    peak_rss_kib: u64,
}

/// Runs the phase and returns its Markdown section.
pub async fn lag_phase(setup: &LagSetup<'_>) -> anyhow::Result<String> {
    let crm = PgPool::connect(setup.crm_url).await?;
    let crm_db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&crm)
        .await?;
    // The state in a database of its own on the same server, so that the CPU of the daemon's
    // CRM sessions and of its state sessions can be told apart.
    let state_db = format!("{crm_db}_lag_state");
    crm.execute(AssertSqlSafe(format!("CREATE DATABASE {state_db}")))
        .await?;
    let mut state_url = url::Url::parse(setup.crm_url)?;
    state_url.set_path(&format!("/{state_db}"));
    let result = run_phase(setup, &crm, &crm_db, &state_db, state_url.as_str()).await;
    crm.execute(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {state_db} WITH (FORCE)"
    )))
    .await?;
    crm.execute(
        "DROP TRIGGER IF EXISTS employees_wazzup_sync ON employees;
         DROP FUNCTION IF EXISTS bench_notify_wazzup_sync();",
    )
    .await?;
    crm.close().await;
    result
}

async fn run_phase(
    setup: &LagSetup<'_>,
    crm: &PgPool,
    crm_db: &str,
    state_db: &str,
    state_url: &str,
) -> anyhow::Result<String> {
    let payload = if setup.payload == "all" {
        "''".to_string()
    } else {
        "COALESCE(NEW.company_id, OLD.company_id)::text".to_string()
    };
    crm.execute(AssertSqlSafe(format!(
        "CREATE FUNCTION bench_notify_wazzup_sync() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify('wazzup_sync', {payload}); RETURN NULL; END $$;
         CREATE TRIGGER employees_wazzup_sync AFTER INSERT OR UPDATE OR DELETE ON employees
             FOR EACH ROW EXECUTE FUNCTION bench_notify_wazzup_sync();"
    )))
    .await?;
    let sim = Simulator::start("127.0.0.1:0", true).await?;
    let mut env: Vec<(String, String)> = setup
        .env
        .iter()
        .filter(|(k, _)| k != "WAZZUP_SYNC__WAZZUP__BASE_URL")
        .cloned()
        .collect();
    env.extend(
        [
            ("WAZZUP_SYNC__WAZZUP__BASE_URL", sim.url()),
            ("WAZZUP_SYNC__STATE__URL", state_url.to_string()),
            ("WAZZUP_SYNC__SYNC__LISTEN_CHANNEL", "wazzup_sync".into()),
            ("WAZZUP_SYNC__HTTP__ENABLED", "false".into()),
            ("WAZZUP_SYNC__LOG__FORMAT", "json".into()),
            ("RUST_LOG", "info".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    eprintln!("Lag under load: a cold sync first...");
    let status = tokio::process::Command::new(&setup.daemon)
        .arg("sync")
        .envs(env.iter().cloned())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(
        status.success(),
        "the cold sync before the lag phase failed"
    );
    let daemon = Daemon::start(&setup.daemon, &env).await?;
    // The start-up cycle, and the one that follows once LISTEN hears.
    daemon.wait_for_cycles(2, Duration::from_secs(120)).await?;
    sim.record_landings();
    let mut results = Vec::new();
    for &rate in setup.rates {
        eprintln!(
            "Lag under load: {rate} edits per second for {} s...",
            setup.secs
        );
        let sampler = CpuSampler::start(crm.clone(), crm_db.into(), state_db.into());
        let cycles_before = daemon.cycles();
        let cpu_before = process_cpu(daemon.pid);
        let started = Instant::now();
        let edits = write_edits(crm, setup, rate).await?;
        let writing = started.elapsed();
        let landed = wait_landed(&sim, &edits, Duration::from_secs(20)).await;
        // Every edit landed, or the wait gave up: the window ends at the last landing.
        let window = landed
            .iter()
            .filter_map(|l| *l)
            .map(|(at, _)| at.duration_since(started))
            .max()
            .unwrap_or(writing)
            .max(writing);
        let cpu = sampler.stop().await;
        if let Some((e, (at, d))) = edits
            .iter()
            .zip(&landed)
            .filter_map(|(e, l)| l.map(|l| (e, l)))
            .max_by_key(|(_, (_, d))| *d)
        {
            eprintln!(
                "  slowest edit: account {} user {} committed {:.2} s in, landed after {:.2} s (at {:.2} s)",
                e.account,
                e.user,
                e.committed.duration_since(started).as_secs_f64(),
                d.as_secs_f64(),
                at.duration_since(started).as_secs_f64()
            );
        }
        let mut lat: Vec<Duration> = landed.iter().filter_map(|l| l.map(|(_, d)| d)).collect();
        lat.sort();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        results.push(RateResult {
            rate,
            edits: edits.len(),
            achieved: edits.len() as f64 / writing.as_secs_f64(),
            lost: landed.iter().filter(|l| l.is_none()).count(),
            p50: pct(0.50),
            p99: pct(0.99),
            max: lat.last().copied().unwrap_or_default(),
            cycles: daemon.cycles() - cycles_before,
            window,
            daemon_cpu: process_cpu(daemon.pid).saturating_sub(cpu_before),
            crm_cpu: cpu.crm,
            state_cpu: cpu.state,
            server_cpu: cpu.server,
            peak_rss_kib: peak_rss(daemon.pid),
        });
        // A quiet moment between rates, so that one rate's backlog is not the next one's.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    daemon.stop().await;
    Ok(report(setup, &results))
}

fn report(setup: &LagSetup<'_>, results: &[RateResult]) -> String {
    let mut t = format!(
        "Lag under load ({} accounts x {} users, `run` with LISTEN, NOTIFY payload: {}, {} s per rate; CPU per minute of the window from the first edit to the last landing):\n\n\
         | edits/s | achieved | edits | lost | p50 | p99 | max | cycles/min | daemon CPU/min | CRM sessions CPU/min | state sessions CPU/min | whole server CPU/min | daemon peak RSS |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        setup.accounts,
        setup.users,
        if setup.payload == "all" {
            "empty (all accounts)"
        } else {
            "the account id"
        },
        setup.secs
    );
    for r in results {
        let per_min = |d: Duration| d.as_secs_f64() * 60.0 / r.window.as_secs_f64().max(1e-3);
        t.push_str(&format!(
            "| {} | {:.0} | {} | {} | {:.2} s | {:.2} s | {:.2} s | {:.0} | {:.1} s | {:.1} s | {:.1} s | {:.1} s | {:.1} MiB |\n",
            r.rate,
            r.achieved,
            r.edits,
            r.lost,
            r.p50.as_secs_f64(),
            r.p99.as_secs_f64(),
            r.max.as_secs_f64(),
            r.cycles as f64 * 60.0 / r.window.as_secs_f64().max(1e-3),
            per_min(r.daemon_cpu),
            per_min(r.crm_cpu),
            per_min(r.state_cpu),
            per_min(r.server_cpu),
            r.peak_rss_kib as f64 / 1024.0,
        ));
    }
    t.push('\n');
    t
}

/// One rename: which user, its sequence number (in its new name) and when it committed.
struct Edit {
    account: usize,
    user: usize,
    seq: u64,
    committed: Instant,
}

/// Renames random users at `rate` per second for the phase's length, each its own transaction
/// (asynchronous commit: the writer's durability is not what is measured).
async fn write_edits(crm: &PgPool, setup: &LagSetup<'_>, rate: u32) -> anyhow::Result<Vec<Edit>> {
    use rand::{Rng, SeedableRng};
    let mut conn = crm.acquire().await?;
    conn.execute("SET synchronous_commit = off; SET application_name = 'bench-writer'")
        .await?;
    // Seeded: every run renames the same users in the same order.
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(rate));
    let total = rate as u64 * setup.secs;
    let started = Instant::now();
    let mut edits = Vec::with_capacity(total as usize);
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        // A user that left the CRM (the harness's 1 % change) is not renamed: another is.
        let (account, user, seq) = loop {
            let account = rng.random_range(1..=setup.accounts);
            let user = rng.random_range(1..=setup.users);
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let done =
                sqlx::query("UPDATE employees SET name = $3 WHERE company_id = $1 AND id = $2")
                    .bind(account as i32)
                    .bind(user as i32)
                    .bind(format!("Employee {account}-{user} #{seq}"))
                    .execute(&mut *conn)
                    .await
                    .context("the writer's rename failed")?;
            if done.rows_affected() == 1 {
                break (account, user, seq);
            }
        };
        edits.push(Edit {
            account,
            user,
            seq,
            committed: Instant::now(),
        });
    }
    Ok(edits)
}

/// Waits until every edit landed (its name, or a later one of the same user, stored by the
/// simulator) or `limit` passed; each edit's landing time and latency, None when lost.
async fn wait_landed(
    sim: &Simulator,
    edits: &[Edit],
    limit: Duration,
) -> Vec<Option<(Instant, Duration)>> {
    let deadline = Instant::now() + limit;
    // (account, user) → landings as (sequence number, time), in order.
    let mut seen: HashMap<(usize, usize), Vec<(u64, Instant)>> = HashMap::new();
    loop {
        for l in sim.take_landings() {
            let account = l
                .token
                .strip_prefix("bench-token-")
                .and_then(|a| a.parse().ok());
            let user = l.id.parse().ok();
            let seq = l.name.rsplit_once('#').and_then(|(_, s)| s.parse().ok());
            if let (Some(a), Some(u), Some(s)) = (account, user, seq) {
                seen.entry((a, u)).or_default().push((s, l.at));
            }
        }
        let landed: Vec<Option<(Instant, Duration)>> = edits
            .iter()
            .map(|e| {
                seen.get(&(e.account, e.user)).and_then(|ls| {
                    ls.iter()
                        .filter(|(s, _)| *s >= e.seq)
                        .map(|(_, at)| *at)
                        .min()
                        .map(|at| (at, at.saturating_duration_since(e.committed)))
                })
            })
            .collect();
        if landed.iter().all(Option::is_some) || Instant::now() > deadline {
            return landed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The daemon's `run`, with its log lines counted.
struct Daemon {
    child: tokio::process::Child,
    pid: u32,
    cycles: Arc<AtomicUsize>,
}

impl Daemon {
    async fn start(bin: &std::path::Path, env: &[(String, String)]) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(bin)
            .arg("run")
            .envs(env.iter().cloned())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("Failed to start wazzup-sync run")?;
        let pid = child.id().unwrap_or(0);
        let cycles = Arc::new(AtomicUsize::new(0));
        // The log goes to stderr.
        let out = child.stderr.take().expect("piped stderr");
        let counter = cycles.clone();
        // WAZZUP_BENCH_LOG=FILE keeps the daemon's log, for profiling.
        let mut keep =
            std::env::var_os("WAZZUP_BENCH_LOG").and_then(|f| std::fs::File::create(f).ok());
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(f) = keep.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if line.contains("\"Cycle finished\"") {
                    counter.fetch_add(1, Ordering::Relaxed);
                } else if line.contains("\"level\":\"ERROR\"") {
                    eprintln!("{line}");
                }
            }
        });
        Ok(Self { child, pid, cycles })
    }

    fn cycles(&self) -> usize {
        self.cycles.load(Ordering::Relaxed)
    }

    async fn wait_for_cycles(&self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while self.cycles() < n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the daemon finished no cycle in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// A process's peak resident memory so far (VmHWM), KiB.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU of a process so far (/proc/PID/stat, fields 14 and 15).
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // In `rest`, field 3 of stat(5) is at index 0: utime is field 14, stime 15.
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_secs_f64((ticks(14) + ticks(15)) as f64 / crate::clock_ticks() as f64)
}

/// The PostgreSQL processes' CPU over a window.
pub(crate) struct ServerCpu {
    crm: Duration,
    state: Duration,
    /// Every `postgres` process: the daemon's backends, the WAL writer, the checkpointer….
    pub(crate) server: Duration,
}

/// Samples the server's processes every 100 ms: the daemon's backends (by database) and every
/// `postgres` process. A process's CPU counts from its first sample (or from 0 when it started
/// during the window) to its last.
pub(crate) struct CpuSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<ServerCpu>,
}

#[derive(Default)]
struct Seen {
    first: Duration,
    last: Duration,
}

impl CpuSampler {
    pub(crate) fn start(pool: PgPool, crm_db: String, state_db: String) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut daemon: HashMap<u32, (String, Seen)> = HashMap::new();
            let mut server: HashMap<u32, Seen> = HashMap::new();
            let mut first_round = true;
            loop {
                let backends: Vec<(i32, Option<String>)> = sqlx::query_as(
                    "SELECT pid, datname::text FROM pg_stat_activity WHERE application_name = 'wazzup-sync'",
                )
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
                for (pid, db) in backends {
                    let now = process_cpu(pid as u32);
                    let e = daemon.entry(pid as u32).or_insert_with(|| {
                        let first = if first_round { now } else { Duration::ZERO };
                        (db.unwrap_or_default(), Seen { first, last: now })
                    });
                    e.1.last = e.1.last.max(now);
                }
                for pid in postgres_pids() {
                    let now = process_cpu(pid);
                    let e = server.entry(pid).or_insert_with(|| Seen {
                        first: if first_round { now } else { Duration::ZERO },
                        last: now,
                    });
                    e.last = e.last.max(now);
                }
                // Backends seen before keep being read, whatever pg_stat_activity says now.
                for (pid, (_, seen)) in daemon.iter_mut() {
                    seen.last = seen.last.max(process_cpu(*pid));
                }
                first_round = false;
                tokio::select! {
                    _ = &mut stopped => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            let used = |s: &Seen| s.last.saturating_sub(s.first);
            let of_db = |name: &str| {
                daemon
                    .values()
                    .filter(|(db, _)| db == name)
                    .map(|(_, s)| used(s))
                    .sum()
            };
            ServerCpu {
                crm: of_db(&crm_db),
                state: of_db(&state_db),
                server: server.values().map(used).sum(),
            }
        });
        Self { stop, task }
    }

    pub(crate) async fn stop(self) -> ServerCpu {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(ServerCpu {
            crm: Duration::ZERO,
            state: Duration::ZERO,
            server: Duration::ZERO,
        })
    }
}

/// Every process named `postgres`: the server's postmaster, backends and workers.
fn postgres_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .collect()
}
