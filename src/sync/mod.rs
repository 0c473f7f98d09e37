//! One cycle: read the CRM snapshot, then per account normalize, plan, push, record.
//!
//! [`cycle`] runs a cycle over every account; [`account`] is one account's flow, which reads
//! as its list of stages: [`users`] (push), [`settings`], [`deletes`], [`drift`] (repair,
//! in a reconcile), [`dry_run`] (`plan`); [`rejections`] records and closes dead letters;
//! [`batch`] is the pure batch queue; [`report`] and [`progress`] say what happened.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::watch;
use wazzup_api::WazzupClient;

use crate::config::Settings;
use crate::domain::NormalizeOptions;
use crate::source::{self, SourceAccount};
use crate::state;

pub mod account;
pub mod basis;
pub mod batch;
pub mod cycle;
pub mod deletes;
pub mod drift;
pub mod dry_run;
pub mod phones;
pub mod progress;
pub mod rejections;
pub mod report;
pub mod settings;
pub mod users;

pub use cycle::{CycleError, CycleOptions, Trigger};
pub use report::{AccountOutcome, AccountReport, CycleReport};

/// Bumped whenever normalization changes what a CRM row becomes, so that accounts skipped as
/// unchanged are read again after an upgrade. 2: role values are read exactly (ambiguous_role).
const RULES_VERSION: u32 = 2;

/// The sync engine: pools, client and settings, wired once.
#[derive(Clone)]
pub struct Engine {
    pub settings: Arc<Settings>,
    pub source: PgPool,
    pub state: PgPool,
    /// Where each database is, to say why a connection failed.
    pub source_target: crate::db::Target,
    pub state_target: crate::db::Target,
    pub client: WazzupClient,
    normalize: Arc<NormalizeOptions>,
    shutdown: watch::Receiver<bool>,
    /// The session holding the advisory locks of the accounts being synced, during a cycle.
    locks: Arc<tokio::sync::Mutex<Option<sqlx::PgConnection>>>,
    /// The CRM rows of the accounts notifications named, so that the next notification for
    /// one of them makes PostgreSQL send only the rows that changed.
    row_cache: Arc<std::sync::Mutex<source::RowCache>>,
    /// The mirrors of the accounts notifications named, brought up to date each cycle with
    /// the rows written since.
    mirror_cache: Arc<std::sync::Mutex<state::MirrorCache>>,
    /// This process's name in the history's cycle rows.
    pub instance: Arc<str>,
}

/// Why pushing stopped early for an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A transient failure outlasted its retries; the rest waits for the next cycle.
    Transient(String),
    /// Wazzup refused the token (the HTTP status).
    Auth(u16),
    /// The daemon is stopping.
    Shutdown,
}

impl Engine {
    pub fn new(settings: Settings, shutdown: watch::Receiver<bool>) -> anyhow::Result<Self> {
        let mut normalize = NormalizeOptions {
            region: settings.phone_region(),
            role_map: settings.role_map(),
            row_salt: 0,
        };
        normalize.row_salt = crate::domain::salt_key(&salt(&settings, &normalize));
        let instance = settings.instance().into();
        Ok(Self {
            source: source::connect(&settings)?,
            state: state::connect(&settings)?,
            source_target: source::target(&settings)?,
            state_target: state::target(&settings)?,
            client: crate::client::build(&settings)?,
            settings: Arc::new(settings),
            normalize: Arc::new(normalize),
            shutdown,
            locks: Arc::new(tokio::sync::Mutex::new(None)),
            row_cache: Arc::default(),
            mirror_cache: Arc::default(),
            instance,
        })
    }

    /// Checks that both databases accept a connection; Err names each one that does not.
    /// Meanwhile the sessions a command starts with are opened, so that their handshakes
    /// (TLS ones take a while) overlap the probes' instead of following them.
    pub async fn probe(&self) -> Result<(), crate::db::Unreachable> {
        let (source, state) = (self.source.clone(), self.state.clone());
        let warm = tokio::spawn(async move {
            tokio::join!(warm_up(&source, 2), warm_up(&state, 1));
        });
        let probed = crate::db::probe_all(&[&self.source_target, &self.state_target]).await;
        match probed {
            Ok(()) => {
                let _ = warm.await;
                Ok(())
            }
            Err(e) => {
                warm.abort();
                Err(e)
            }
        }
    }

    /// Says why a cycle failed: a connection failure names the database, its host and port,
    /// the cause and the variable to check; a failed query is named.
    pub async fn explain(&self, e: &CycleError) -> String {
        match e {
            CycleError::Source(s) => match s.sqlx() {
                Some(err) if crate::db::is_connection_error(err) => {
                    self.source_target.explain(err).await
                }
                _ => s.to_string(),
            },
            CycleError::State(err) => self.state_target.explain(&err.0).await,
        }
    }

    /// What, besides the rows, decides what a row means (see [`salt`]).
    fn fingerprint_salt(&self) -> String {
        salt(&self.settings, &self.normalize)
    }

    /// The region and role map rows are normalized with.
    pub fn normalize(&self) -> &NormalizeOptions {
        &self.normalize
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// The single account of single-account mode, when the token is set.
    fn single_account(&self) -> Option<SourceAccount> {
        self.settings.single_token().map(|token| SourceAccount {
            account_id: self.settings.wazzup.single_account_id.clone(),
            token,
            push_input_output_message_events_for_managers: self
                .settings
                .wazzup
                .push_input_output_message_events_for_managers,
        })
    }

    /// Takes the account's advisory lock on the lock session (opened on first use). False:
    /// another process holds it.
    async fn lock_account(&self, account_id: &str) -> Result<bool, state::StateError> {
        let mut session = self.locks.lock().await;
        if session.is_none() {
            *session = Some(state::lock_session(&self.settings).await?);
        }
        let conn = session.as_mut().expect("lock session");
        let locked = state::try_lock_account(conn, &self.settings.state.schema, account_id).await;
        if locked.is_err() {
            // A broken session holds no lock any more; the next account opens a new one.
            *session = None;
        }
        locked
    }

    async fn unlock_account(&self, account_id: &str) {
        let mut session = self.locks.lock().await;
        if let Some(conn) = session.as_mut()
            && state::unlock_account(conn, &self.settings.state.schema, account_id)
                .await
                .is_err()
        {
            // Closing the session releases the lock for sure.
            *session = None;
        }
    }

    /// Closes the lock session (kept from cycle to cycle while cycles run): a quiet daemon
    /// holds no state session.
    pub async fn release_locks(&self) {
        if let Some(conn) = self.locks.lock().await.take() {
            let _ = sqlx::Connection::close(conn).await;
        }
    }

    /// Sets the gauges read from the state's tables, so that they are right after a restart
    /// and the same in every replica: `wazzup_sync_open_dead_letters` for every account the
    /// state knows (or only these; accounts skipped as unchanged, and those whose last dead
    /// letter closed, are exported too), the approvals waiting per reason and the oldest one's
    /// age, and (with `grace`) the users in their grace, which counts over the whole mirror.
    pub async fn export_state_gauges(
        &self,
        only: Option<&std::collections::HashSet<String>>,
        grace: bool,
    ) {
        match state::open_dead_letter_counts(&self.state, only).await {
            Ok(counts) => {
                for (account_id, n) in counts {
                    metrics::gauge!("wazzup_sync_open_dead_letters", "account_id" => account_id)
                        .set(n as f64);
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "Could not count the open dead letters for the metrics"
            ),
        }
        match state::approvals::waiting_counts(&self.state).await {
            Ok(rows) => {
                let mut oldest: f64 = 0.0;
                for (reason, n, age) in rows {
                    metrics::gauge!("wazzup_sync_approvals_waiting", "reason" => reason)
                        .set(n as f64);
                    oldest = oldest.max(age);
                }
                metrics::gauge!("wazzup_sync_approvals_oldest_waiting_seconds").set(oldest);
            }
            Err(e) => tracing::warn!(error = %e, "Could not count the approvals for the metrics"),
        }
        if !grace {
            return;
        }
        match state::users_in_grace(&self.state).await {
            Ok(n) => metrics::gauge!("wazzup_sync_users_in_grace").set(n as f64),
            Err(e) => tracing::warn!(error = %e, "Could not count the users in their grace"),
        }
    }
}

/// What, besides the rows, decides what a row means: the code's version and rules, the
/// `phonenumber` version (its metadata decides how a phone reads) and the rules around it, and
/// the settings that change normalization or deletion (a changed grace looks at every account
/// again, so its leavers' deletion times follow it). Mixed into the accounts' fingerprints and
/// into the rows' hashes.
fn salt(settings: &Settings, normalize: &NormalizeOptions) -> String {
    crate::domain::content_hash(
        format!(
            "{}|{RULES_VERSION}|{}|{}|{:?}|{:?}|{}|{:?}",
            env!("CARGO_PKG_VERSION"),
            crate::domain::PHONENUMBER_VERSION,
            crate::domain::PHONE_RULES,
            normalize.region,
            normalize.role_map,
            settings.sync.delete_missing,
            settings.delete_grace()
        )
        .as_bytes(),
    )
}

/// Opens `n` sessions of a pool at once and leaves them idle in it, for what comes next
/// (handed back before this returns, see [`crate::db::hand_back`]).
async fn warm_up(pool: &PgPool, n: usize) {
    let sessions = futures::future::join_all((0..n).map(|_| pool.acquire())).await;
    for session in sessions.into_iter().flatten() {
        crate::db::hand_back(session).await;
    }
}
