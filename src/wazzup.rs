//! The Wazzup Public API client: rate limited per token, retried on passing faults,
//! answers classified into success, rejection, refusal of the token, or transient failure.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::Rng;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

use crate::config::Settings;
use crate::domain::{SettingsDoc, UserPayload, content_hash};

/// How long a token stays slowed down after a 429.
const SLOWDOWN: Duration = Duration::from_secs(30);
/// Longest error description kept from a response body.
const MAX_DESCRIPTION: usize = 500;

/// Why a request did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 401/403: the token is missing, wrong or not allowed.
    #[error("Wazzup refused the account's token (HTTP {status})")]
    Unauthorized { status: u16 },
    /// A 4xx answer about the records: not worth retrying unchanged.
    #[error("Wazzup rejected the request (HTTP {status} {code}: {description})")]
    Rejected {
        status: u16,
        code: String,
        description: String,
        /// Positions of the offending records, when the body names them.
        indexes: Vec<usize>,
    },
    /// Worth retrying: 429, 5xx, timeouts, broken connections, undecodable bodies.
    #[error("transient failure: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
}

impl ApiError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ApiError::Transient { .. })
    }

    /// The error code folded for comparison: case and underscores ignored.
    pub fn code_is(&self, code: &str) -> bool {
        match self {
            ApiError::Rejected { code: c, .. } => fold_code(c) == fold_code(code),
            _ => false,
        }
    }
}

/// Folds an error code so that `USER_ALREADY_EXISTS` equals `userAlreadyExists`.
pub fn fold_code(code: &str) -> String {
    code.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    description: Option<Value>,
    #[serde(default)]
    data: Option<Value>,
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).collect::<String>() + "…"
    }
}

/// Reads the positions of rejected records from an error body's `data`, when present.
fn rejected_indexes(data: &Value) -> Vec<usize> {
    let items: Vec<&Value> = match data {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => match o.get("errors").or_else(|| o.get("items")) {
            Some(Value::Array(a)) => a.iter().collect(),
            _ => vec![data],
        },
        _ => vec![],
    };
    let mut out: Vec<usize> = items
        .iter()
        .filter_map(|v| v.get("index").and_then(Value::as_u64))
        .map(|i| i as usize)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Parses a `Retry-After` header: seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Classifies a complete HTTP answer. Pure, so every branch is tested without I/O.
pub fn classify(status: u16, retry_after: Option<&str>, body: &[u8]) -> Result<Value, ApiError> {
    match status {
        200..=299 => {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            serde_json::from_slice(body).map_err(|_| ApiError::Transient {
                reason: format!("HTTP {status} with a body that is not JSON"),
                retry_after: None,
            })
        }
        401 | 403 => Err(ApiError::Unauthorized { status }),
        408 | 425 | 429 | 500..=599 => Err(ApiError::Transient {
            reason: format!("HTTP {status}"),
            retry_after: retry_after.and_then(parse_retry_after),
        }),
        _ => {
            let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
            let (code, description, indexes) = match parsed {
                Some(b) => (
                    b.error
                        .map(|e| match e {
                            Value::String(s) => s,
                            other => other.to_string(),
                        })
                        .unwrap_or_else(|| format!("HTTP_{status}")),
                    b.description
                        .map(|d| match d {
                            Value::String(s) => s,
                            other => other.to_string(),
                        })
                        .unwrap_or_default(),
                    b.data.as_ref().map(rejected_indexes).unwrap_or_default(),
                ),
                None => (
                    format!("HTTP_{status}"),
                    String::from_utf8_lossy(body).trim().to_string(),
                    vec![],
                ),
            };
            Err(ApiError::Rejected {
                status,
                code: clip(&code, 100),
                description: clip(&description, MAX_DESCRIPTION),
                indexes,
            })
        }
    }
}

/// Retry settings, checked once.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: usize,
    pub initial: Duration,
    pub max: Duration,
    pub max_elapsed: Duration,
}

/// Counters for one account's cycle.
#[derive(Debug, Default)]
pub struct RequestStats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
}

impl RequestStats {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

/// One account's credentials and counters, passed with each call.
pub struct Account<'a> {
    pub account_id: &'a str,
    pub token: &'a SecretString,
    pub stats: &'a RequestStats,
}

impl Account<'_> {
    fn key(&self) -> String {
        token_fingerprint(self.token)
    }
}

/// A short, non-reversible fingerprint of a token, to notice rotation without storing it.
pub fn token_fingerprint(token: &SecretString) -> String {
    content_hash(token.expose_secret().as_bytes())[..16].to_string()
}

/// A random id for this process, sent in the User-Agent so requests can be traced to a replica.
pub fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_string())
}

/// The API client. Cheap to clone; one per process.
#[derive(Clone)]
pub struct WazzupClient {
    http: reqwest::Client,
    base: reqwest::Url,
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    slow_limiter: Arc<DefaultKeyedRateLimiter<String>>,
    slowed_until: Arc<Mutex<HashMap<String, Instant>>>,
    retry: RetryPolicy,
}

impl WazzupClient {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let base = settings.wazzup_base_url()?;
        let w = &settings.wazzup;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(w.request_timeout_secs))
            .connect_timeout(Duration::from_secs(w.request_timeout_secs.min(10)))
            .user_agent(format!(
                "wazzup-sync/{} (instance {})",
                env!("CARGO_PKG_VERSION"),
                instance_id()
            ))
            .https_only(!settings.insecure_http_in_use() && base.scheme() == "https")
            .build()?;
        let rate = NonZeroU32::new(w.rate_limit_per_second).unwrap_or(NonZeroU32::MIN);
        let slow = NonZeroU32::new((w.rate_limit_per_second / 5).max(1)).unwrap_or(NonZeroU32::MIN);
        Ok(Self {
            http,
            base,
            limiter: Arc::new(RateLimiter::keyed(Quota::per_second(rate))),
            slow_limiter: Arc::new(RateLimiter::keyed(Quota::per_second(slow))),
            slowed_until: Arc::new(Mutex::new(HashMap::new())),
            retry: RetryPolicy {
                max_attempts: w.retry_max_attempts,
                initial: Duration::from_millis(w.retry_initial_backoff_ms),
                max: Duration::from_millis(w.retry_max_backoff_ms),
                max_elapsed: Duration::from_secs(w.retry_max_elapsed_secs),
            },
        })
    }

    /// `POST /v2/users`: returns `processed`, when the answer says.
    pub async fn post_users(
        &self,
        acct: &Account<'_>,
        users: &[UserPayload],
    ) -> Result<Option<u64>, ApiError> {
        let body = serde_json::json!({ "users": users });
        let v = self
            .call(acct, Method::POST, "/v2/users", &[], Some(&body))
            .await?;
        Ok(v.get("data")
            .and_then(|d| d.get("processed"))
            .and_then(Value::as_u64))
    }

    /// `DELETE /v2/users`.
    pub async fn delete_users(&self, acct: &Account<'_>, ids: &[String]) -> Result<(), ApiError> {
        let body = serde_json::json!({ "user_ids": ids });
        self.call(acct, Method::DELETE, "/v2/users", &[], Some(&body))
            .await
            .map(|_| ())
    }

    /// `PATCH /v2/settings` with the whole document.
    pub async fn patch_settings(
        &self,
        acct: &Account<'_>,
        doc: &SettingsDoc,
    ) -> Result<(), ApiError> {
        let body = serde_json::to_value(doc).expect("settings serialize");
        self.call(acct, Method::PATCH, "/v2/settings", &[], Some(&body))
            .await
            .map(|_| ())
    }

    /// `GET /v2/settings`.
    pub async fn get_settings(&self, acct: &Account<'_>) -> Result<SettingsDoc, ApiError> {
        let v = self
            .call(acct, Method::GET, "/v2/settings", &[], None)
            .await?;
        let v = match v {
            Value::Object(ref o) if o.contains_key("data") && !o.contains_key("user_roles") => {
                o["data"].clone()
            }
            other => other,
        };
        serde_json::from_value(v).map_err(|_| ApiError::Transient {
            reason: "GET /v2/settings answered with an unexpected document".into(),
            retry_after: None,
        })
    }

    /// `GET /v2/users`, one page.
    pub async fn get_users_page(
        &self,
        acct: &Account<'_>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<UserPayload>, ApiError> {
        let v = self
            .call(
                acct,
                Method::GET,
                "/v2/users",
                &[("offset", offset.to_string()), ("limit", limit.to_string())],
                None,
            )
            .await?;
        let data = v.get("data").cloned().unwrap_or(Value::Array(vec![]));
        serde_json::from_value(data).map_err(|_| ApiError::Transient {
            reason: "GET /v2/users answered with an unexpected document".into(),
            retry_after: None,
        })
    }

    /// Every user of the account, page by page.
    pub async fn get_all_users(&self, acct: &Account<'_>) -> Result<Vec<UserPayload>, ApiError> {
        const PAGE: usize = 100;
        let mut all = Vec::new();
        loop {
            let page = self.get_users_page(acct, all.len(), PAGE).await?;
            let n = page.len();
            all.extend(page);
            if n < PAGE {
                return Ok(all);
            }
        }
    }

    async fn call(
        &self,
        acct: &Account<'_>,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("JSON body"));
        let key = acct.key();
        let url = format!("{}{}", self.base.as_str().trim_end_matches('/'), path);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.initial)
            .with_max_delay(self.retry.max)
            .with_max_times(self.retry.max_attempts.saturating_sub(1))
            .with_total_delay(Some(self.retry.max_elapsed));
        let attempt = || async {
            self.wait_turn(&key).await;
            acct.stats.requests.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(acct.token.expose_secret())
                .header(reqwest::header::ACCEPT, "application/json");
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(b) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            let result = match req.send().await {
                Err(e) => Err(ApiError::Transient {
                    reason: describe_reqwest_error(&e),
                    retry_after: None,
                }),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    match resp.bytes().await {
                        Ok(bytes) => classify(status, retry_after.as_deref(), &bytes),
                        Err(e) => Err(ApiError::Transient {
                            reason: format!(
                                "HTTP {status}, body cut off: {}",
                                describe_reqwest_error(&e)
                            ),
                            retry_after: None,
                        }),
                    }
                }
            };
            let status_label = match &result {
                Ok(_) => "ok".to_string(),
                Err(ApiError::Unauthorized { status }) | Err(ApiError::Rejected { status, .. }) => {
                    status.to_string()
                }
                Err(ApiError::Transient { reason, .. }) => {
                    if reason.starts_with("HTTP 429") {
                        self.slow_down(&key);
                        "429".into()
                    } else {
                        "transient".into()
                    }
                }
            };
            metrics::counter!("wazzup_sync_requests_total",
                "endpoint" => format!("{method} {path}"), "status" => status_label.clone())
            .increment(1);
            tracing::debug!(
                account_id = acct.account_id,
                method = %method,
                path,
                status = %status_label,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Wazzup request"
            );
            result
        };
        attempt
            .retry(backoff)
            .when(ApiError::is_transient)
            .adjust(|e, dur| {
                // Full jitter on the exponential step; Retry-After wins when given.
                let dur = dur?;
                match e {
                    ApiError::Transient {
                        retry_after: Some(ra),
                        ..
                    } => Some((*ra).min(self.retry.max_elapsed)),
                    _ => Some(rand::rng().random_range(Duration::ZERO..=dur)),
                }
            })
            .notify(|e, dur| {
                acct.stats.retries.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("wazzup_sync_retries_total").increment(1);
                tracing::info!(
                    account_id = acct.account_id,
                    path,
                    error = %e,
                    wait_ms = dur.as_millis() as u64,
                    "Retrying a Wazzup request after a transient failure"
                );
            })
            .await
    }

    async fn wait_turn(&self, key: &String) {
        self.limiter.until_key_ready(key).await;
        let slowed = {
            let mut map = self.slowed_until.lock().expect("slowdown map");
            match map.get(key) {
                Some(until) if *until > Instant::now() => true,
                Some(_) => {
                    map.remove(key);
                    false
                }
                None => false,
            }
        };
        if slowed {
            self.slow_limiter.until_key_ready(key).await;
        }
    }

    /// True while a recent 429 keeps this token at the reduced rate.
    pub fn is_slowed(&self, token: &SecretString) -> bool {
        self.slowed_until
            .lock()
            .expect("slowdown map")
            .get(&token_fingerprint(token))
            .is_some_and(|until| *until > Instant::now())
    }

    fn slow_down(&self, key: &str) {
        self.slowed_until
            .lock()
            .expect("slowdown map")
            .insert(key.to_string(), Instant::now() + SLOWDOWN);
    }
}

/// Describes a transport error without the URL (which never holds a secret, but keeps lines short).
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "broken body"
    } else if e.is_request() {
        "request failed"
    } else {
        "transport error"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} ({})", clip(&cause, 200))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_bodies_are_json_or_empty() {
        assert_eq!(classify(200, None, b"").unwrap(), Value::Null);
        assert_eq!(
            classify(200, None, br#"{"data":{"processed":2}}"#).unwrap()["data"]["processed"],
            2
        );
        assert!(classify(200, None, b"<html>").unwrap_err().is_transient());
    }

    #[test]
    fn throttling_and_server_errors_are_transient() {
        let e = classify(429, Some("7"), b"").unwrap_err();
        assert!(
            matches!(e, ApiError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(7))
        );
        assert!(
            classify(502, None, b"<html>Bad gateway</html>")
                .unwrap_err()
                .is_transient()
        );
        assert!(classify(503, None, b"").unwrap_err().is_transient());
    }

    #[test]
    fn auth_failures_are_told_apart() {
        assert!(matches!(
            classify(401, None, b"").unwrap_err(),
            ApiError::Unauthorized { status: 401 }
        ));
        assert!(matches!(
            classify(403, None, b"{}").unwrap_err(),
            ApiError::Unauthorized { status: 403 }
        ));
    }

    #[test]
    fn rejections_carry_code_description_and_indexes() {
        let e = classify(
            400,
            None,
            br#"{"error":"INVALID_USER_DATA","description":"bad","data":[{"index":3,"fields":["name"]},{"index":1}]}"#,
        )
        .unwrap_err();
        match &e {
            ApiError::Rejected {
                code,
                description,
                indexes,
                status,
            } => {
                assert_eq!(code, "INVALID_USER_DATA");
                assert_eq!(description, "bad");
                assert_eq!(indexes, &[1, 3]);
                assert_eq!(*status, 400);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.code_is("invalidUserData"));
        let e = classify(400, None, b"not json at all").unwrap_err();
        assert!(e.code_is("HTTP_400"));
        let e = classify(422, None, b"").unwrap_err();
        assert!(matches!(e, ApiError::Rejected { ref indexes, .. } if indexes.is_empty()));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        let future =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        let d = parse_retry_after(&future).unwrap();
        assert!(d <= Duration::from_secs(120) && d >= Duration::from_secs(100));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
