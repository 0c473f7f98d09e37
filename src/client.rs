//! The Wazzup client as the daemon builds it from its settings, and the observer that turns
//! every request and retry into metrics and log lines.

use std::sync::Arc;
use std::time::Duration;

use wazzup_api::{ApiError, ClientConfig, Observer, RetryPolicy, WazzupClient};

use crate::config::Settings;

/// A random id for this process, sent in the User-Agent so requests can be traced to a replica.
pub fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_string())
}

/// Builds the client: base URL checked, timeouts, the per-token rate, the retry policy.
pub fn build(settings: &Settings) -> anyhow::Result<WazzupClient> {
    let base_url = settings.wazzup_base_url()?;
    let w = &settings.wazzup;
    let config = ClientConfig {
        https_only: !settings.insecure_http_in_use() && base_url.scheme() == "https",
        base_url,
        timeout: Duration::from_secs(w.request_timeout_secs),
        rate_per_second: w.rate_limit_per_second,
        retry: RetryPolicy {
            max_attempts: w.retry_max_attempts,
            initial: Duration::from_millis(w.retry_initial_backoff_ms),
            max: Duration::from_millis(w.retry_max_backoff_ms),
            max_elapsed: Duration::from_secs(w.retry_max_elapsed_secs),
        },
        user_agent: format!(
            "wazzup-sync/{} (instance {})",
            env!("CARGO_PKG_VERSION"),
            instance_id()
        ),
    };
    Ok(WazzupClient::new(config, Arc::new(Metrics))?)
}

/// Counts requests by endpoint and status, and retries; logs each request at DEBUG and each
/// retry at INFO.
struct Metrics;

impl Observer for Metrics {
    fn request(&self, account_id: &str, endpoint: &str, status: &str, elapsed: Duration) {
        metrics::counter!("wazzup_sync_requests_total",
            "endpoint" => endpoint.to_string(), "status" => status.to_string())
        .increment(1);
        tracing::debug!(
            account_id,
            endpoint,
            status,
            elapsed_ms = elapsed.as_millis() as u64,
            "Wazzup request"
        );
    }

    fn retry(&self, account_id: &str, endpoint: &str, error: &ApiError, wait: Duration) {
        metrics::counter!("wazzup_sync_retries_total").increment(1);
        tracing::info!(
            account_id,
            path = endpoint.split(' ').nth(1).unwrap_or(endpoint),
            error = %error,
            wait_ms = wait.as_millis() as u64,
            "Retrying a Wazzup request after a transient failure"
        );
    }
}
