//! The two databases: where each is, and why a connection to it failed, said in one line that
//! names the database, its host and port, the cause and the variable to check.

pub mod arrays;

use std::fmt;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// Idle sessions are closed after this long, so a quiet daemon holds (almost) no connections.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Options every pool starts from: no idle timeout and no lifetime, so that sqlx starts no
/// maintenance task. That task can read the idle count in the instant a returned session makes
/// it wrap below zero, and then loops without end at 100 % of a core (sqlx issue 3645, not
/// fixed in a release). `run` closes idle sessions itself ([`close_idle`]).
pub fn pool_options() -> sqlx::postgres::PgPoolOptions {
    sqlx::postgres::PgPoolOptions::new()
        .idle_timeout(None)
        .max_lifetime(None)
}

/// Closes a pool's idle sessions; the sessions in use stay.
pub async fn close_idle(pool: &sqlx::PgPool) {
    while let Some(session) = pool.try_acquire() {
        let _ = session.close().await;
    }
}

/// Puts a session back in its pool before returning. A session that is only dropped goes back
/// in a task of its own, and a query that follows at once would open (and, over TLS, wait for)
/// one more: what the start of every one-shot command paid.
pub async fn hand_back(mut conn: sqlx::pool::PoolConnection<sqlx::Postgres>) {
    conn.return_to_pool().await;
}

/// Which of the daemon's two databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Crm,
    State,
}

impl fmt::Display for Which {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Which::Crm => "CRM",
            Which::State => "state",
        })
    }
}

/// Why a connection could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    Refused,
    TimedOut(Duration),
    NameNotResolved,
    Tls(String),
    Login(String),
    NoDatabase(String),
    /// A transaction pooler refused a session setting.
    Pooler(String),
    Other(String),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Refused => {
                f.write_str("connection refused (the server is down or listens elsewhere)")
            }
            Cause::TimedOut(d) => write!(f, "no answer within {} s", d.as_secs()),
            Cause::NameNotResolved => f.write_str("the host name does not resolve"),
            Cause::Tls(m) => write!(f, "TLS failed: {m}"),
            Cause::Login(m) => write!(f, "the server refused the login: {m}"),
            Cause::Pooler(m) => write!(
                f,
                "{m}: a transaction pooler such as PgBouncer is in between, and this database needs a session; give it a direct connection"
            ),
            Cause::NoDatabase(m) | Cause::Other(m) => f.write_str(m),
        }
    }
}

/// A database could not be reached; the message never holds the URL (it may hold a password).
#[derive(Debug, Clone, thiserror::Error)]
#[error("Cannot connect to the {which} database at {host}:{port}: {cause} (check {check})")]
pub struct ConnectError {
    pub which: Which,
    pub host: String,
    pub port: u16,
    pub cause: Cause,
    pub check: String,
}

/// One or more databases could not be reached: one line each.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Unreachable(pub Vec<ConnectError>);

/// Where a database is and how long a connection may take.
#[derive(Debug, Clone)]
pub struct Target {
    pub which: Which,
    opts: PgConnectOptions,
    timeout: Duration,
    /// The variable that holds the URL, said in messages.
    url_variable: String,
    timeout_variable: &'static str,
}

impl Target {
    pub fn new(
        which: Which,
        opts: PgConnectOptions,
        timeout: Duration,
        url_variable: String,
        timeout_variable: &'static str,
    ) -> Self {
        Self {
            which,
            opts,
            timeout,
            url_variable,
            timeout_variable,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One connection attempt within the connect timeout, closed at once.
    pub async fn probe(&self) -> Result<(), ConnectError> {
        match tokio::time::timeout(self.timeout, self.opts.connect()).await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                Ok(())
            }
            Ok(Err(e)) => Err(self.error(classify(&e))),
            Err(_) => Err(self.error(Cause::TimedOut(self.timeout))),
        }
    }

    /// Says why an operation on this database failed: a connection failure is named with its
    /// cause (a pool that timed out is asked again with one probe); anything else is described.
    pub async fn explain(&self, e: &sqlx::Error) -> String {
        if let sqlx::Error::Database(_) = e
            && is_connection_error(e)
        {
            return self.error(classify(e)).to_string();
        }
        if is_connection_error(e)
            && let Err(c) = self.probe().await
        {
            return c.to_string();
        }
        format!("The {} database: {}", self.which, describe(e))
    }

    fn error(&self, cause: Cause) -> ConnectError {
        let check = match cause {
            Cause::TimedOut(_) => format!("{} and {}", self.url_variable, self.timeout_variable),
            _ => self.url_variable.clone(),
        };
        ConnectError {
            which: self.which,
            host: self.opts.get_host().to_string(),
            port: self.opts.get_port(),
            cause,
            check,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.opts.get_host(), self.opts.get_port())
    }
}

/// Probes every target at once; Err holds one error per database that cannot be reached.
pub async fn probe_all(targets: &[&Target]) -> Result<(), Unreachable> {
    let results = futures::future::join_all(targets.iter().map(|t| t.probe())).await;
    let failed: Vec<ConnectError> = results.into_iter().filter_map(Result::err).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Unreachable(failed))
    }
}

/// True for errors about reaching the database rather than about a statement.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(d) => is_login_error(d.code().as_deref()),
        _ => false,
    }
}

fn is_login_error(code: Option<&str>) -> bool {
    matches!(code, Some("28P01" | "28000"))
}

/// Turns a connection error into its cause.
pub fn classify(e: &sqlx::Error) -> Cause {
    match e {
        sqlx::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => Cause::Refused,
            std::io::ErrorKind::TimedOut => Cause::TimedOut(Duration::ZERO),
            _ => {
                let m = io.to_string();
                if m.contains("lookup address") || m.contains("not known") || m.contains("resolve")
                {
                    Cause::NameNotResolved
                } else {
                    Cause::Other(m)
                }
            }
        },
        sqlx::Error::Tls(t) => Cause::Tls(one_line(&t.to_string())),
        sqlx::Error::Database(d) => match d.code().as_deref() {
            c if is_login_error(c) => Cause::Login(d.message().to_string()),
            Some("3D000") => Cause::NoDatabase(d.message().to_string()),
            _ if d.message().contains("unsupported startup parameter") => {
                Cause::Pooler(d.message().to_string())
            }
            _ => Cause::Other(d.message().to_string()),
        },
        sqlx::Error::PoolTimedOut => Cause::Other("timed out waiting for a connection".into()),
        sqlx::Error::Protocol(m) => Cause::Other(format!(
            "what answers there does not speak PostgreSQL's protocol ({})",
            without_source_location(m)
        )),
        other => Cause::Other(describe(other)),
    }
}

/// sqlx appends where in its own source an error was raised: `… (sqlx_postgres::x:95)`.
fn without_source_location(m: &str) -> &str {
    match m.rfind(" (sqlx") {
        Some(i) if m.ends_with(')') => &m[..i],
        _ => m,
    }
}

/// A database error in one line, said once: PostgreSQL's message and its detail, without the
/// line of PostgreSQL's own source that sqlx appends.
pub fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => {
            let mut out = d.message().to_string();
            if let Some(pg) = d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                && let Some(detail) = pg.detail()
            {
                out.push_str(": ");
                out.push_str(detail);
            }
            one_line(&out)
        }
        sqlx::Error::Io(io) => one_line(&io.to_string()),
        sqlx::Error::Tls(t) => format!("TLS failed: {}", one_line(&t.to_string())),
        sqlx::Error::PoolTimedOut => "timed out waiting for a connection".into(),
        sqlx::Error::Protocol(m) => one_line(without_source_location(m)),
        other => one_line(&other.to_string()),
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_start_no_sqlx_timer_task() {
        let options = pool_options();
        assert_eq!(options.get_idle_timeout(), None);
        assert_eq!(options.get_max_lifetime(), None);
        assert_eq!(options.get_min_connections(), 0);
    }

    #[test]
    fn a_refused_connection_names_the_database_host_port_and_variable() {
        let t = Target::new(
            Which::State,
            "postgres://u:secret@db.example:5999/x".parse().unwrap(),
            Duration::from_secs(5),
            "WAZZUP_SYNC__STATE__URL".into(),
            "WAZZUP_SYNC__STATE__CONNECT_TIMEOUT_SECS",
        );
        let line = t.error(Cause::Refused).to_string();
        assert_eq!(
            line,
            "Cannot connect to the state database at db.example:5999: connection refused (the server is down or listens elsewhere) (check WAZZUP_SYNC__STATE__URL)"
        );
        assert!(!line.contains("secret"));
        let line = t.error(Cause::TimedOut(Duration::from_secs(5))).to_string();
        assert!(line.contains("no answer within 5 s"), "{line}");
        assert!(
            line.contains("WAZZUP_SYNC__STATE__CONNECT_TIMEOUT_SECS"),
            "{line}"
        );
    }

    #[test]
    fn a_server_that_is_not_postgresql_is_said_so_without_sqlx_source_lines() {
        let e = sqlx::Error::Protocol(
            "unexpected response from SSLRequest: 0x48 (sqlx_postgres::connection::tls:95)".into(),
        );
        assert_eq!(
            classify(&e).to_string(),
            "what answers there does not speak PostgreSQL's protocol (unexpected response from SSLRequest: 0x48)"
        );
    }

    #[test]
    fn io_errors_are_told_apart() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&refused), Cause::Refused);
        let dns = sqlx::Error::Io(std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        ));
        assert_eq!(classify(&dns), Cause::NameNotResolved);
    }
}
