//! Test support: a fresh PostgreSQL database per test, a CRM with the three contract tables,
//! settings pointing at the simulator, and the real binary.

use std::collections::BTreeMap;
use std::process::Output;

use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Executor};
use tokio::sync::OnceCell;
use wazzup_sim::Simulator;
use wazzup_sync::config::Settings;
use wazzup_sync::sync::{CycleOptions, CycleReport};

static BASE_URL: OnceCell<String> = OnceCell::const_new();

/// The three contract tables, as plain tables (the default queries read them like views).
pub const CRM_TABLES: &str = "CREATE TABLE wazzup_accounts (account_id text, token text,
        push_input_output_message_events_for_managers boolean);
     CREATE TABLE wazzup_users (account_id text, id text, name text, phone text, hide_phone boolean);
     CREATE TABLE wazzup_user_roles (account_id text, user_id text, channel_id text, role text,
        allow_get_new_clients boolean);";

/// `DATABASE_URL` when set; otherwise a PostgreSQL container started once per test binary.
async fn base_url() -> String {
    BASE_URL
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return url;
            }
            use testcontainers_modules::postgres::Postgres;
            use testcontainers_modules::testcontainers::runners::AsyncRunner;
            let container = Postgres::default()
                .start()
                .await
                .expect("DATABASE_URL is not set and a PostgreSQL container could not start");
            let port = container.get_host_port_ipv4(5432).await.unwrap();
            // Kept for the life of the test process.
            Box::leak(Box::new(container));
            format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres")
        })
        .await
        .clone()
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    name: String,
    admin: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let admin = base_url().await;
        let name = format!("wzs_test_{}", uuid::Uuid::new_v4().simple());
        let admin_pool = PgPool::connect(&admin)
            .await
            .expect("connect to PostgreSQL");
        admin_pool
            .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        admin_pool.close().await;
        let mut url = url::Url::parse(&admin).unwrap();
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let pool = PgPool::connect(&url).await.unwrap();
        Self {
            url,
            pool,
            name,
            admin,
        }
    }

    /// A database holding the three contract tables (as tables, which the default queries read).
    pub async fn with_crm() -> Self {
        let db = Self::new().await;
        db.pool.execute(CRM_TABLES).await.unwrap();
        db
    }

    pub async fn exec(&self, sql: &str) {
        self.pool
            .execute(AssertSqlSafe(sql.to_string()))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn add_account(&self, id: &str, token: &str) {
        sqlx::query("INSERT INTO wazzup_accounts VALUES ($1, $2, false)")
            .bind(id)
            .bind(token)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    pub async fn add_user(&self, account: &str, id: &str, name: &str, phone: Option<&str>) {
        sqlx::query("INSERT INTO wazzup_users VALUES ($1, $2, $3, $4, false)")
            .bind(account)
            .bind(id)
            .bind(name)
            .bind(phone)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    pub async fn add_role(
        &self,
        account: &str,
        user: &str,
        channel: &str,
        role: &str,
        new_clients: bool,
    ) {
        sqlx::query("INSERT INTO wazzup_user_roles VALUES ($1, $2, $3, $4, $5)")
            .bind(account)
            .bind(user)
            .bind(channel)
            .bind(role)
            .bind(new_clients)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// `n` users `u1..un` with distinct phones and a seller role each on channel `ch-1`.
    pub async fn add_users(&self, account: &str, n: usize) {
        sqlx::query(
            "INSERT INTO wazzup_users
             SELECT $1, 'u' || g, 'User ' || g, '+371 2' || lpad(g::text, 7, '0'), false
             FROM generate_series(1, $2) g",
        )
        .bind(account)
        .bind(n as i32)
        .execute(&self.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO wazzup_user_roles SELECT $1, 'u' || g, 'ch-1', 'seller', g % 2 = 0
             FROM generate_series(1, $2) g",
        )
        .bind(account)
        .bind(n as i32)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Open dead letters as (entity, record_id, kind, error_code).
    pub async fn open_dead_letters(&self) -> Vec<DeadLetter> {
        sqlx::query_as(
            "SELECT account_id, entity, record_id, kind, error_code, error_message, http_status, attempts,
                    payload::text AS payload
             FROM wazzup_sync.dead_letters WHERE resolved_at IS NULL ORDER BY account_id, entity, record_id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
    }

    pub async fn mirror_count(&self, account: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM wazzup_sync.mirror_users WHERE account_id = $1")
            .bind(account)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Dropping needs async I/O; do it on a thread of its own so any runtime state is fine.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(p) = PgPool::connect(&admin).await {
                    let _ = p
                        .execute(AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetter {
    pub entity: String,
    pub record_id: String,
    pub kind: String,
    pub error_code: String,
    pub error_message: String,
    pub http_status: Option<i32>,
    pub payload: Option<String>,
}

/// The environment the daemon gets in a test: this database, this simulator, fast retries.
pub fn env_for(db: &TestDb, sim: &Simulator, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars: BTreeMap<String, String> = [
        ("WAZZUP_SYNC__SOURCE__URL", db.url.as_str()),
        ("WAZZUP_SYNC__WAZZUP__BASE_URL", sim.url().as_str()),
        ("WAZZUP_SYNC__WAZZUP__RETRY_INITIAL_BACKOFF_MS", "10"),
        ("WAZZUP_SYNC__WAZZUP__RETRY_MAX_BACKOFF_MS", "50"),
        ("WAZZUP_SYNC__WAZZUP__REQUEST_TIMEOUT_SECS", "5"),
        ("WAZZUP_SYNC__SOURCE__DEFAULT_PHONE_REGION", "LV"),
        ("WAZZUP_SYNC__LOG__FORMAT", "json"),
        // Users who leave are deleted at once unless a test asks for a grace.
        ("WAZZUP_SYNC__SYNC__DELETE_GRACE", "0s"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    vars.into_iter().collect()
}

pub fn settings(db: &TestDb, sim: &Simulator, extra: &[(&str, &str)]) -> Settings {
    Settings::load_from(None, env_for(db, sim, extra)).expect("test settings")
}

/// One cycle through the library.
pub async fn sync(db: &TestDb, sim: &Simulator, extra: &[(&str, &str)]) -> CycleReport {
    wazzup_sync::commands::sync_once(settings(db, sim, extra), CycleOptions::default())
        .await
        .expect("cycle runs")
}

/// The real binary with exactly these WAZZUP_SYNC variables (none inherited from the shell).
fn command(args: &[&str], env: &[(String, String)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wazzup-sync"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("WAZZUP_SYNC") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().cloned()).kill_on_drop(true);
    cmd
}

/// Runs the binary to its end.
pub async fn run_bin(args: &[&str], env: &[(String, String)]) -> Output {
    command(args, env).output().await.expect("run wazzup-sync")
}

/// Starts the binary with its output captured; it is killed when dropped.
pub fn spawn_bin(args: &[&str], env: &[(String, String)]) -> tokio::process::Child {
    command(args, env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start wazzup-sync")
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub async fn simulator() -> Simulator {
    Simulator::start("127.0.0.1:0", false).await.unwrap()
}

/// A CRM with one account `a1` (token `tok-1`) of `users` users, and a simulator that knows
/// the token.
pub async fn one_account(users: usize) -> (TestDb, Simulator) {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", users).await;
    (db, sim)
}

/// What the CRM says an account should hold, as (id → name) and the role rows count.
pub async fn crm_users(db: &TestDb, account: &str) -> BTreeMap<String, String> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT id, trim(name) FROM wazzup_users WHERE account_id = $1")
            .bind(account)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    rows.into_iter().collect()
}

/// The simulator's users of a token as (id → name).
pub fn sim_users(sim: &Simulator, token: &str) -> BTreeMap<String, String> {
    sim.users(token)
        .into_iter()
        .map(|(k, v)| (k, v.name.to_string()))
        .collect()
}

/// A PostgreSQL server of the test's own, which the test can stop and start.
pub struct PrivatePg {
    pub dir: std::path::PathBuf,
    pub port: u16,
    bindir: std::path::PathBuf,
}

impl PrivatePg {
    /// None when no initdb is installed.
    pub fn start() -> Option<Self> {
        Self::start_with(None)
    }

    /// A server that asks `postgres` for this password (scram-sha-256).
    pub fn start_with_password(password: &str) -> Option<Self> {
        Self::start_with(Some(password))
    }

    fn start_with(password: Option<&str>) -> Option<Self> {
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("wzs-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let pg = Self { dir, port, bindir };
        if Self::is_root() {
            let ok = std::process::Command::new("chown")
                .args(["postgres", pg.dir.to_str().unwrap()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return None;
            }
        }
        let data = pg.dir.join("data");
        let auth = match password {
            None => "-A trust".to_string(),
            Some(pw) => {
                let file = pg.dir.join("pwfile");
                std::fs::write(&file, pw).unwrap();
                if Self::is_root() {
                    let _ = std::process::Command::new("chown")
                        .args(["postgres", file.to_str().unwrap()])
                        .status();
                }
                format!("-A scram-sha-256 --pwfile='{}'", file.display())
            }
        };
        let init = format!(
            "'{}/initdb' -D '{}' {auth} -U postgres >/dev/null",
            pg.bindir.display(),
            data.display()
        );
        assert!(pg.as_owner(&init), "initdb failed");
        pg.start_server();
        Some(pg)
    }

    fn is_root() -> bool {
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    }

    fn as_owner(&self, cmd: &str) -> bool {
        let mut c = if Self::is_root() {
            let mut c = std::process::Command::new("su");
            c.args(["-s", "/bin/sh", "postgres", "-c", cmd]);
            c
        } else {
            let mut c = std::process::Command::new("sh");
            c.args(["-c", cmd]);
            c
        };
        c.status().map(|s| s.success()).unwrap_or(false)
    }

    pub fn start_server(&self) {
        let cmd = format!(
            "'{}/pg_ctl' -D '{}/data' -l '{}/log' -w -o \"-p {} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=off\" start >/dev/null",
            self.bindir.display(),
            self.dir.display(),
            self.dir.display(),
            self.port,
            self.dir.display()
        );
        assert!(self.as_owner(&cmd), "pg_ctl start failed");
    }

    pub fn stop_server(&self) {
        let cmd = format!(
            "'{}/pg_ctl' -D '{}/data' -m fast -w stop >/dev/null",
            self.bindir.display(),
            self.dir.display()
        );
        assert!(self.as_owner(&cmd), "pg_ctl stop failed");
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let cmd = format!(
            "'{}/pg_ctl' -D '{}/data' -m immediate -w stop >/dev/null 2>&1",
            self.bindir.display(),
            self.dir.display()
        );
        self.as_owner(&cmd);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `run` with the CRM notifications heard and the schedule once a year, and waits until
/// its start-up cycle gave `token` its `users` and it listens, idle.
pub async fn start_listening_daemon(
    db: &TestDb,
    sim: &Simulator,
    (token, users): (&str, usize),
) -> tokio::process::Child {
    let env = env_for(
        db,
        sim,
        &[
            // Once a year: only the start-up cycle and notifications run during the test.
            ("WAZZUP_SYNC__SYNC__SCHEDULE", "0 0 0 1 1 *"),
            ("WAZZUP_SYNC__SYNC__LISTEN_CHANNEL", "wazzup_sync"),
            ("WAZZUP_SYNC__HTTP__ENABLED", "false"),
        ],
    );
    let child = spawn_bin(&["run"], &env);
    for _ in 0..200 {
        if sim.users(token).len() == users {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(sim.users(token).len(), users, "the start-up cycle ran");
    wait_until_listening_and_idle(db).await;
    child
}

/// Waits (up to 30 s) until the daemon has a LISTEN session on this database, a cycle that
/// started after that session opened has finished, and no cycle runs: what it reads after
/// then is what the test writes next.
pub async fn wait_until_listening_and_idle(db: &TestDb) {
    let ready = "SELECT EXISTS (SELECT 1 FROM wazzup_sync.cycles c, pg_stat_activity a
                   WHERE a.application_name = 'wazzup-sync' AND a.datname = current_database()
                     AND a.query LIKE 'LISTEN%' AND c.finished_at IS NOT NULL
                     AND c.started_at >= a.backend_start)
                 AND NOT EXISTS (SELECT 1 FROM wazzup_sync.cycles WHERE finished_at IS NULL)";
    wait_for(db, ready, "the daemon to listen and finish its cycle").await;
}

/// Waits (up to 30 s) until no cycle of the daemon's is running.
pub async fn wait_until_idle(db: &TestDb) {
    let idle = "SELECT EXISTS (SELECT 1 FROM wazzup_sync.cycles)
                AND NOT EXISTS (SELECT 1 FROM wazzup_sync.cycles WHERE finished_at IS NULL)";
    wait_for(db, idle, "no cycle to run").await;
}

async fn wait_for(db: &TestDb, condition: &'static str, what: &str) {
    let started = std::time::Instant::now();
    loop {
        let met: Result<bool, _> = sqlx::query_scalar(condition).fetch_one(&db.pool).await;
        if met.unwrap_or(false) {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "waited 30 s for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A TCP port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET a URL: (status, body), or None when nothing answers.
pub async fn get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::get(url).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.unwrap_or_default()))
}

/// Asks `url` every 100 ms until the answer satisfies `done`, for at most `secs` seconds;
/// the last answer either way.
pub async fn poll(url: &str, secs: u64, done: impl Fn(u16, &str) -> bool) -> Option<(u16, String)> {
    let mut last = None;
    for _ in 0..secs * 10 {
        last = get(url).await;
        if let Some((status, body)) = &last
            && done(*status, body)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    last
}

/// The JSON log lines among a process's output (stdout and stderr).
pub fn log_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.is_object())
        .collect()
}

/// The first log line whose message is `message`.
pub fn log_line(out: &str, message: &str) -> Option<serde_json::Value> {
    log_lines(out).into_iter().find(|v| v["message"] == message)
}

/// Writes a file of the test's own (removed with the temporary directory by the OS).
pub fn temp_file(name: &str, content: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wzs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}
