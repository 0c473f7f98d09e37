//! The operator's HTTP surface: `/healthz`, `/readyz`, `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Settings;
use crate::db::Target;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// What `/readyz` looks at.
pub struct Health {
    source: Target,
    state: Target,
    /// Unix seconds of the last cycle that ran to its end; 0 before the first.
    last_cycle: AtomicI64,
    started: i64,
    max_age: Duration,
    /// False until the state database answered and its schema was migrated.
    migrated: AtomicBool,
    /// Why LISTEN does not work, when it does not.
    listen_problem: Mutex<Option<String>>,
    /// The last answer and when it was computed: probes and scrapes come in bursts.
    cached: Mutex<Option<(Instant, Option<String>)>>,
}

/// How long a readiness answer is reused.
const READY_CACHE: Duration = Duration::from_secs(2);

impl Health {
    pub fn new(settings: &Settings, source: Target, state: Target) -> Arc<Self> {
        let period =
            crate::config::cron_period(&settings.sync.schedule).unwrap_or(Duration::from_secs(30));
        metrics::gauge!("wazzup_sync_schedule_period_seconds").set(period.as_secs_f64());
        Arc::new(Self {
            source,
            state,
            last_cycle: AtomicI64::new(0),
            started: chrono::Utc::now().timestamp(),
            max_age: period * settings.http.ready_max_periods.max(1) + Duration::from_secs(60),
            migrated: AtomicBool::new(false),
            listen_problem: Mutex::new(None),
            cached: Mutex::new(None),
        })
    }

    /// Called when a cycle ran to its end (some accounts may still have failed).
    pub fn cycle_finished(&self) {
        let now = chrono::Utc::now().timestamp();
        self.last_cycle.store(now, Ordering::Relaxed);
        metrics::gauge!("wazzup_sync_last_cycle_timestamp_seconds").set(now as f64);
        self.forget_answer();
    }

    /// What readiness depends on changed: the next question is answered afresh.
    fn forget_answer(&self) {
        *self.cached.lock().expect("health") = None;
    }

    /// Called once the state schema is up to date.
    pub fn migrated(&self) {
        self.migrated.store(true, Ordering::Relaxed);
        self.forget_answer();
    }

    /// Records why LISTEN does not work (None: it works).
    pub fn listen_failed(&self, why: Option<String>) {
        *self.listen_problem.lock().expect("health") = why;
        self.forget_answer();
    }

    /// None when ready; otherwise why not. Each database is asked with a fresh connection that
    /// is closed at once, so readiness probes hold no session between cycles.
    pub async fn not_ready(&self) -> Option<String> {
        if let Some((at, answer)) = self.cached.lock().expect("health").clone()
            && at.elapsed() < READY_CACHE
        {
            return answer;
        }
        let answer = self.evaluate().await;
        metrics::gauge!("wazzup_sync_ready").set(if answer.is_none() { 1.0 } else { 0.0 });
        *self.cached.lock().expect("health") = Some((Instant::now(), answer.clone()));
        answer
    }

    async fn evaluate(&self) -> Option<String> {
        let (crm, state) = tokio::join!(self.source.probe(), self.state.probe());
        if let Some(e) = crm.err().or(state.err()) {
            return Some(e.to_string());
        }
        if !self.migrated.load(Ordering::Relaxed) {
            return Some("the state schema is not migrated yet".into());
        }
        if let Some(why) = self.listen_problem.lock().expect("health").clone() {
            return Some(why);
        }
        let last = self.last_cycle.load(Ordering::Relaxed);
        let since = if last == 0 { self.started } else { last };
        let age = chrono::Utc::now().timestamp() - since;
        if age > self.max_age.as_secs() as i64 {
            return Some(if last == 0 {
                format!("no cycle has finished in the {age} s since start")
            } else {
                format!("the last cycle finished {age} s ago")
            });
        }
        None
    }
}

/// Exports every counter at 0 and the gauges that have a value before the first cycle, so
/// dashboards and alerts see the series from the start (and `absent()` means the daemon is gone).
pub fn register_metrics() {
    for result in ["ok", "partial", "failed"] {
        metrics::counter!("wazzup_sync_cycles_total", "result" => result).increment(0);
    }
    for outcome in [
        "created",
        "updated",
        "deleted",
        "rejected_locally",
        "rejected_remotely",
        "deferred",
    ] {
        metrics::counter!("wazzup_sync_records_total", "outcome" => outcome).increment(0);
    }
    for kind in ["missing", "changed", "settings", "pruned"] {
        metrics::counter!("wazzup_sync_drift_repaired_total", "kind" => kind).increment(0);
    }
    for action in crate::state::history::ACTIONS {
        metrics::counter!("wazzup_sync_changes_recorded_total", "action" => action).increment(0);
    }
    for action in ["role_granted", "role_changed", "new_clients_on"] {
        metrics::counter!("wazzup_sync_access_widened_total", "action" => action).increment(0);
    }
    for reason in ["widens_access", "mass_delete", "mass_leave"] {
        metrics::gauge!("wazzup_sync_approvals_waiting", "reason" => reason).set(0.0);
    }
    metrics::gauge!("wazzup_sync_approvals_oldest_waiting_seconds").set(0.0);
    metrics::gauge!("wazzup_sync_users_in_grace").set(0.0);
    metrics::counter!("wazzup_sync_retries_total").increment(0);
    metrics::gauge!("wazzup_sync_accounts_auth_failed").set(0.0);
    metrics::gauge!("wazzup_sync_ready").set(0.0);
}

/// Installs the Prometheus recorder once per process.
pub fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        "wazzup_sync_cycle_duration_seconds".into(),
                    ),
                    &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0],
                )
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

#[derive(Clone)]
struct Ctx {
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
}

/// Serves the listener until the process ends. Returns the bound address.
pub async fn serve(
    listen: &str,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(Ctx { health, metrics });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

async fn readyz(State(ctx): State<Ctx>) -> impl IntoResponse {
    match ctx.health.not_ready().await {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn render_metrics(State(ctx): State<Ctx>) -> impl IntoResponse {
    // Keeps `wazzup_sync_ready` current for alerts, even when nothing probes /readyz.
    ctx.health.not_ready().await;
    match ctx.metrics {
        Some(h) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            h.render(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            [("content-type", "text/plain")],
            "metrics recorder not installed\n".into(),
        ),
    }
}

/// `healthcheck`: asks the local listener's `/readyz`. Ok(true) when ready.
pub async fn healthcheck(settings: &Settings) -> anyhow::Result<bool> {
    let addr: SocketAddr = settings.http.listen.parse()?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let url = format!(
        "http://{}/readyz",
        SocketAddr::new(host.parse()?, addr.port())
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    match client.get(&url).send().await {
        Ok(r) => {
            let ok = r.status().is_success();
            let body = r.text().await.unwrap_or_default();
            println!("{}", body.trim());
            Ok(ok)
        }
        Err(_) => {
            println!("not ready: nothing answers on {url}");
            Ok(false)
        }
    }
}
