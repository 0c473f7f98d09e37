//! The HTTP client: one per process, cheap to clone. Each call waits its token's turn, sends,
//! classifies the answer and retries transient faults; an [`Observer`] hears every request and
//! retry (the daemon turns them into metrics and log lines).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use backon::Retryable;
use bytes::Bytes;
use rand::Rng;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::classify::classify;
use crate::error::ApiError;
use crate::limit::{TokenLimiter, token_key};
use crate::retry::RetryPolicy;
use crate::types::{SettingsDoc, UserPayload};

/// Users per page of `GET /v2/users`.
const PAGE: usize = 100;

/// How the client is built.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The API's base URL, without a trailing slash.
    pub base_url: reqwest::Url,
    /// Per request.
    pub timeout: Duration,
    pub rate_per_second: u32,
    pub retry: RetryPolicy,
    pub user_agent: String,
    /// Refuse plain http (on unless the caller allowed it).
    pub https_only: bool,
}

/// Hears every request and every retry.
pub trait Observer: Send + Sync {
    /// A request was answered (or failed): `status` is `ok`, an HTTP status, `429` or `transient`.
    fn request(&self, account_id: &str, endpoint: &str, status: &str, elapsed: Duration);
    /// A transient failure is retried after `wait`.
    fn retry(&self, account_id: &str, endpoint: &str, error: &ApiError, wait: Duration);
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn request(&self, _: &str, _: &str, _: &str, _: Duration) {}
    fn retry(&self, _: &str, _: &str, _: &ApiError, _: Duration) {}
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
#[derive(Debug)]
pub struct Account<'a> {
    pub account_id: &'a str,
    pub token: &'a SecretString,
    pub stats: &'a RequestStats,
}

/// One request, ready to be sent (again).
struct Request<'a> {
    method: Method,
    path: &'a str,
    query: &'a [(&'a str, String)],
    /// Shared, so that a retry resends it without copying it.
    body: Option<Bytes>,
}

impl Request<'_> {
    fn endpoint(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// The API client.
#[derive(Clone)]
pub struct WazzupClient {
    /// Built at the first request: loading the TLS roots costs start-up time that a cycle
    /// with nothing to send never needs.
    http: Arc<OnceLock<reqwest::Client>>,
    config: Arc<ClientConfig>,
    base: reqwest::Url,
    limiter: Arc<TokenLimiter>,
    retry: RetryPolicy,
    observer: Arc<dyn Observer>,
}

impl std::fmt::Debug for WazzupClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WazzupClient")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl WazzupClient {
    pub fn new(config: ClientConfig, observer: Arc<dyn Observer>) -> reqwest::Result<Self> {
        Ok(Self {
            http: Arc::new(OnceLock::new()),
            base: config.base_url.clone(),
            limiter: Arc::new(TokenLimiter::new(config.rate_per_second)),
            retry: config.retry.clone(),
            config: Arc::new(config),
            observer,
        })
    }

    /// The HTTP client, built on first use.
    fn http(&self) -> Result<&reqwest::Client, ApiError> {
        if let Some(http) = self.http.get() {
            return Ok(http);
        }
        let c = &self.config;
        let http = reqwest::Client::builder()
            .timeout(c.timeout)
            .connect_timeout(c.timeout.min(Duration::from_secs(10)))
            .user_agent(c.user_agent.clone())
            .https_only(c.https_only)
            .build()
            .map_err(|e| transient(format!("could not build the HTTP client: {e}")))?;
        Ok(self.http.get_or_init(|| http))
    }

    /// `POST /v2/users`: returns `processed`, when the answer says. The body is serialized
    /// once, straight from the payloads.
    pub async fn post_users<U: Serialize>(
        &self,
        acct: &Account<'_>,
        users: &[U],
    ) -> Result<Option<u64>, ApiError> {
        #[derive(Serialize)]
        struct Body<'a, U> {
            users: &'a [U],
        }
        #[derive(Deserialize)]
        struct Answer {
            data: Option<Processed>,
        }
        #[derive(Deserialize)]
        struct Processed {
            processed: Option<u64>,
        }
        let body = serde_json::to_vec(&Body { users }).expect("JSON");
        let answer = self
            .call(acct, Method::POST, "/v2/users", &[], Some(body.into()))
            .await?;
        // An answer without `processed` (or an empty one) says nothing about how many landed.
        Ok(serde_json::from_slice::<Answer>(&answer)
            .ok()
            .and_then(|a| a.data)
            .and_then(|d| d.processed))
    }

    /// `DELETE /v2/users`.
    pub async fn delete_users(&self, acct: &Account<'_>, ids: &[String]) -> Result<(), ApiError> {
        #[derive(Serialize)]
        struct Body<'a> {
            user_ids: &'a [String],
        }
        let body = serde_json::to_vec(&Body { user_ids: ids }).expect("JSON");
        self.call(acct, Method::DELETE, "/v2/users", &[], Some(body.into()))
            .await
            .map(|_| ())
    }

    /// `PATCH /v2/settings` with the whole document, already serialized (the caller hashes
    /// the same bytes). The answer's body is not read.
    pub async fn patch_settings(
        &self,
        acct: &Account<'_>,
        doc_json: Bytes,
    ) -> Result<(), ApiError> {
        self.call(acct, Method::PATCH, "/v2/settings", &[], Some(doc_json))
            .await
            .map(|_| ())
    }

    /// `GET /v2/settings` (the document, bare or wrapped in `data`).
    pub async fn get_settings(&self, acct: &Account<'_>) -> Result<SettingsDoc, ApiError> {
        #[derive(Deserialize)]
        struct Wrapped {
            data: SettingsDoc,
        }
        let body = self
            .call(acct, Method::GET, "/v2/settings", &[], None)
            .await?;
        serde_json::from_slice::<SettingsDoc>(&body)
            .or_else(|_| serde_json::from_slice::<Wrapped>(&body).map(|w| w.data))
            .map_err(|_| unexpected("GET /v2/settings"))
    }

    /// `GET /v2/users`, one page.
    pub async fn get_users_page(
        &self,
        acct: &Account<'_>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<UserPayload>, ApiError> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            data: Option<Vec<UserPayload>>,
        }
        let query = [("offset", offset.to_string()), ("limit", limit.to_string())];
        let body = self
            .call(acct, Method::GET, "/v2/users", &query, None)
            .await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        serde_json::from_slice::<Page>(&body)
            .map(|p| p.data.unwrap_or_default())
            .map_err(|_| unexpected("GET /v2/users"))
    }

    /// `GET /v2/users/{id}`: the user, when Wazzup holds it.
    pub async fn get_user(
        &self,
        acct: &Account<'_>,
        id: &str,
    ) -> Result<Option<UserPayload>, ApiError> {
        let path = format!("/v2/users/{}", percent_encode(id));
        let body = self.call(acct, Method::GET, &path, &[], None).await?;
        let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|_| unexpected("GET /v2/users/{id}"))?
        };
        let users: Vec<UserPayload> = match v.get("data") {
            Some(Value::Array(_)) => serde_json::from_value(v["data"].clone()),
            Some(one @ Value::Object(_)) => serde_json::from_value(one.clone()).map(|u| vec![u]),
            _ => Ok(vec![]),
        }
        .map_err(|_| unexpected("GET /v2/users/{id}"))?;
        Ok(users.into_iter().find(|u| u.id == id))
    }

    /// Every user of the account, page by page.
    pub async fn get_all_users(&self, acct: &Account<'_>) -> Result<Vec<UserPayload>, ApiError> {
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

    /// True while a recent 429 keeps this token at the reduced rate.
    pub fn is_slowed(&self, token: &SecretString) -> bool {
        self.limiter.is_slowed(&token_key(token))
    }

    /// Sends a request, retrying transient faults as the policy says.
    async fn call(
        &self,
        acct: &Account<'_>,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Bytes>,
    ) -> Result<Bytes, ApiError> {
        let request = Request {
            method,
            path,
            query,
            body,
        };
        let endpoint = request.endpoint();
        let key = token_key(acct.token);
        (|| self.send_once(acct, &key, &request))
            .retry(self.retry.schedule())
            .when(ApiError::is_transient)
            .adjust(|e, step| self.retry.delay(e, step?, rand::rng().random()))
            .notify(|e, wait| {
                acct.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.observer.retry(acct.account_id, &endpoint, e, wait);
            })
            .await
    }

    /// One attempt: wait the token's turn, send, read the whole body, classify.
    async fn send_once(
        &self,
        acct: &Account<'_>,
        key: &String,
        r: &Request<'_>,
    ) -> Result<Bytes, ApiError> {
        self.limiter.wait_turn(key).await;
        acct.stats.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let url = format!("{}{}", self.base.as_str().trim_end_matches('/'), r.path);
        let mut req = self
            .http()?
            .request(r.method.clone(), &url)
            .bearer_auth(acct.token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json");
        if !r.query.is_empty() {
            req = req.query(r.query);
        }
        if let Some(b) = &r.body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.clone());
        }
        let result = answer(req.send().await).await;
        let status = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => e.status_label(),
        };
        if status == "429" {
            self.limiter.slow_down(key);
        }
        self.observer
            .request(acct.account_id, &r.endpoint(), &status, started.elapsed());
        result
    }
}

/// Reads an answer to its end and classifies it; a success gives its body.
async fn answer(sent: reqwest::Result<reqwest::Response>) -> Result<Bytes, ApiError> {
    let resp = sent.map_err(|e| transient(describe_reqwest_error(&e)))?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match resp.bytes().await {
        Ok(bytes) => classify(status, retry_after.as_deref(), &bytes).map(|()| bytes),
        Err(e) => Err(transient(format!(
            "HTTP {status}, body cut off: {}",
            describe_reqwest_error(&e)
        ))),
    }
}

fn transient(reason: String) -> ApiError {
    ApiError::Transient {
        reason,
        retry_after: None,
    }
}

fn unexpected(what: &str) -> ApiError {
    transient(format!("{what} answered with an unexpected document"))
}

/// Encodes a user id for a URL path segment.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Describes a transport error without the URL, its innermost cause included.
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
        let cause: String = cause.chars().take(200).collect();
        format!("{kind} ({cause})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_encoded_for_the_path() {
        assert_eq!(percent_encode("u-1_a.b~"), "u-1_a.b~");
        assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
    }
}
