//! A stateful stand-in for the Wazzup Users & Settings API, for tests, the demo, the benchmark
//! and the compose file. It is not part of the daemon: the `wazzup-sync` binary contains none
//! of it.
//!
//! Per-token accounts with users and settings, the documented limits (100 per request,
//! 64/150 characters, 1,000 users, unique phones, 500 requests per 5 s), errors as
//! `{error, description, data}`, and a switchboard of faults. It listens on loopback only.

#![allow(clippy::too_many_lines)] // A test tool; its handlers read best whole.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub mod demo;

use wazzup_api::{SettingsDoc, UserPayload};

/// Users one account may hold.
pub const USER_LIMIT: usize = 1000;

/// Wazzup's rate limit: this many requests per token in each window; beyond it, HTTP 429
/// until the window's counter resets.
pub const RATE_LIMIT: (usize, Duration) = (500, Duration::from_secs(5));

/// How the simulator checks that phones are unique within an account. The public material does
/// not say which the real API does, so the daemon must converge under both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PhoneCheck {
    /// The request as a whole: the account's users once every user of the request is applied
    /// must have unique phones (two users may swap phones in one request).
    #[default]
    Request,
    /// User by user, in the request's order: a user whose phone another user holds at that
    /// moment is refused (and with it the whole request, nothing stored).
    PerUser,
}

/// A user the simulator stored, and when (for measuring how long a CRM edit took to land).
#[derive(Debug, Clone)]
pub struct Landing {
    pub token: String,
    pub id: String,
    pub name: String,
    pub at: std::time::Instant,
}

/// One simulated account.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimAccount {
    pub users: BTreeMap<String, UserPayload>,
    pub settings: SettingsDoc,
    pub user_limit: usize,
}

/// A request the simulator answered.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub token: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Ids in a users body, when any.
    pub ids: Vec<String>,
    /// The client's User-Agent (the daemon names its process there).
    pub agent: String,
    #[serde(skip)]
    pub at: Option<std::time::Instant>,
}

/// One scripted fault, consumed by the next matching request.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this status and body (the request is not applied).
    Status {
        status: u16,
        #[serde(default)]
        body: String,
        #[serde(default)]
        retry_after: Option<String>,
    },
    /// Apply the request, then answer with this `processed` instead of the real count,
    /// having applied only the first `processed` users.
    ShortProcessed { processed: usize },
    /// Wait this long before answering (beyond the client's timeout, it is a timeout).
    Delay { ms: u64 },
    /// Apply nothing; start a 200 answer and break the connection in the middle of the body.
    Drop,
    /// Apply the request, then start a 200 answer and break the connection in the middle of
    /// the body: Wazzup did it, but the client cannot know.
    AppliedDrop,
}

/// The fault switchboard.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Faults {
    /// Faults for the next requests, in order; `(method, path prefix)` filters, empty = any.
    #[serde(default)]
    pub script: VecDeque<ScriptedFault>,
    /// Answer 401 for these tokens.
    #[serde(default)]
    pub unauthorized_tokens: Vec<String>,
    /// Random errors: each matching request fails with this probability.
    #[serde(default)]
    pub error_rates: Vec<ErrorRate>,
    /// Added to every answer, milliseconds.
    #[serde(default)]
    pub latency_ms: u64,
}

/// A share of the requests to an endpoint that fail with a status.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ErrorRate {
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// 0.0..=1.0
    pub rate: f64,
    pub status: u16,
    #[serde(default)]
    pub retry_after: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ScriptedFault {
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    pub fault: Fault,
}

#[derive(Debug, Default)]
struct SimState {
    accounts: HashMap<String, SimAccount>,
    /// Unknown tokens get a new empty account (the demo); otherwise 401.
    open_registration: bool,
    requests: Vec<RequestRecord>,
    faults: Faults,
    /// Send this signal to this process when the n-th request arrives (before answering it).
    signal_at: Option<(usize, u32, &'static str)>,
    rng: Option<rand::rngs::StdRng>,
    concurrency: Concurrency,
    phone_check: PhoneCheck,
    /// Every user stored, when recording (see [`Simulator::record_landings`]).
    landings: Option<Vec<Landing>>,
    /// Requests per token allowed in each window (see [`RATE_LIMIT`]).
    rate_limit: Option<(usize, Duration)>,
    /// Per token: when its current window began, and the requests counted in it.
    windows: HashMap<String, (std::time::Instant, usize)>,
}

/// How many requests were being answered at once.
#[derive(Debug, Default, Clone)]
struct Concurrency {
    now: usize,
    peak: usize,
    /// Sum of every request's time in the server.
    busy: Duration,
    first: Option<std::time::Instant>,
    last: Option<std::time::Instant>,
}

/// Requests answered at once since the requests were last cleared.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct InFlight {
    pub peak: usize,
    /// The time-weighted mean: the requests' summed time over the time from the first request's
    /// arrival to the last answer.
    pub mean: f64,
}

type Shared = Arc<Mutex<SimState>>;

/// A running simulator.
#[derive(Clone)]
pub struct Simulator {
    addr: SocketAddr,
    state: Shared,
}

impl Simulator {
    /// Starts on a loopback address (`127.0.0.1:0` picks a free port).
    pub async fn start(listen: &str, open_registration: bool) -> anyhow::Result<Self> {
        let addr: SocketAddr = listen.parse()?;
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "The simulator listens on loopback addresses only, not {addr} (inside a container, --public allows it)"
        );
        Self::bind(addr, open_registration).await
    }

    /// Starts on any address: inside a container, so that a published port reaches it.
    pub async fn start_public(listen: &str, open_registration: bool) -> anyhow::Result<Self> {
        Self::bind(listen.parse()?, open_registration).await
    }

    async fn bind(addr: SocketAddr, open_registration: bool) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state: Shared = Arc::new(Mutex::new(SimState {
            open_registration,
            rate_limit: Some(RATE_LIMIT),
            ..Default::default()
        }));
        let app = router(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL to give the daemon.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().expect("simulator state")
    }

    /// Creates an empty account for a token.
    pub fn add_account(&self, token: &str) {
        self.lock()
            .accounts
            .entry(token.to_string())
            .or_insert_with(|| SimAccount {
                user_limit: USER_LIMIT,
                ..Default::default()
            });
    }

    /// Sets an account's user limit.
    pub fn set_user_limit(&self, token: &str, limit: usize) {
        self.add_account(token);
        self.lock().accounts.get_mut(token).unwrap().user_limit = limit;
    }

    /// Puts users straight into an account, as if someone added them in Wazzup.
    pub fn insert_users(&self, token: &str, users: &[UserPayload]) {
        self.add_account(token);
        let mut s = self.lock();
        let acct = s.accounts.get_mut(token).unwrap();
        for u in users {
            acct.users.insert(u.id.to_string(), u.clone());
        }
    }

    /// Removes a user straight from an account, as if deleted in the Wazzup UI.
    pub fn remove_user(&self, token: &str, id: &str) {
        if let Some(a) = self.lock().accounts.get_mut(token) {
            a.users.remove(id);
            a.settings.user_roles.retain(|r| r.user_id != id);
            a.settings
                .hide_phone_numbers_for_user_ids
                .retain(|u| u != id);
        }
    }

    /// An account's users, by id.
    pub fn users(&self, token: &str) -> BTreeMap<String, UserPayload> {
        self.lock()
            .accounts
            .get(token)
            .map(|a| a.users.clone())
            .unwrap_or_default()
    }

    /// An account's settings document.
    pub fn settings(&self, token: &str) -> SettingsDoc {
        self.lock()
            .accounts
            .get(token)
            .map(|a| a.settings.clone())
            .unwrap_or_default()
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.lock().requests.len()
    }

    pub fn clear_requests(&self) {
        let mut s = self.lock();
        s.requests.clear();
        s.concurrency = Concurrency::default();
    }

    /// Requests answered at once since the requests were last cleared.
    pub fn in_flight(&self) -> InFlight {
        let c = self.lock().concurrency.clone();
        let span = match (c.first, c.last) {
            (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        InFlight {
            peak: c.peak,
            mean: if span > 0.0 {
                c.busy.as_secs_f64() / span
            } else {
                0.0
            },
        }
    }

    /// Queues a fault for the next request matching `method` and `path` (None: any).
    pub fn push_fault(&self, method: Option<&str>, path: Option<&str>, fault: Fault) {
        self.lock().faults.script.push_back(ScriptedFault {
            method: method.map(str::to_string),
            path: path.map(str::to_string),
            fault,
        });
    }

    /// Sends `signal` (`KILL`, `TERM`) to `pid` when the `n`-th request (counting from now on)
    /// arrives, before it is answered or applied: a crash or stop at an exact point of a sync.
    pub fn signal_at_request(&self, n: usize, pid: u32, signal: &'static str) {
        let mut s = self.lock();
        let at = s.requests.len() + n;
        s.signal_at = Some((at, pid, signal));
    }

    /// Drops every queued fault, error rate, latency and pending signal.
    pub fn clear_faults(&self) {
        let mut s = self.lock();
        let tokens = std::mem::take(&mut s.faults.unauthorized_tokens);
        s.faults = Faults {
            unauthorized_tokens: tokens,
            ..Default::default()
        };
        s.signal_at = None;
    }

    /// Makes a share of the requests matching `method` and `path` (None: any) fail with
    /// `status`, drawn from a seeded generator so runs repeat.
    pub fn set_error_rate(
        &self,
        method: Option<&str>,
        path: Option<&str>,
        rate: f64,
        status: u16,
        seed: u64,
    ) {
        use rand::SeedableRng;
        let mut s = self.lock();
        s.rng = Some(rand::rngs::StdRng::seed_from_u64(seed));
        s.faults.error_rates.push(ErrorRate {
            method: method.map(str::to_string),
            path: path.map(str::to_string),
            rate,
            status,
            retry_after: (status == 429).then(|| "0".to_string()),
        });
    }

    /// Allows this many requests per token in each window (None: no limit); Wazzup's is
    /// [`RATE_LIMIT`], the default.
    pub fn set_rate_limit(&self, limit: Option<(usize, Duration)>) {
        let mut s = self.lock();
        s.rate_limit = limit;
        s.windows.clear();
    }

    /// Adds latency to every answer.
    pub fn set_latency(&self, ms: u64) {
        self.lock().faults.latency_ms = ms;
    }

    /// How phones are checked for uniqueness (the whole request by default).
    pub fn set_phone_check(&self, check: PhoneCheck) {
        self.lock().phone_check = check;
    }

    /// Starts recording every user stored, with the time (kept until taken).
    pub fn record_landings(&self) {
        self.lock().landings.get_or_insert_with(Vec::new);
    }

    /// Takes the users stored since the last call (recording goes on).
    pub fn take_landings(&self) -> Vec<Landing> {
        self.lock()
            .landings
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Makes every request with this token answer 401 (or stop doing so).
    pub fn set_unauthorized(&self, token: &str, on: bool) {
        let mut s = self.lock();
        s.faults.unauthorized_tokens.retain(|t| t != token);
        if on {
            s.faults.unauthorized_tokens.push(token.to_string());
        }
    }
}

/// Counts the requests being answered, around every handler.
async fn count_in_flight(
    State(state): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    {
        let mut s = state.lock().expect("simulator state");
        let c = &mut s.concurrency;
        c.now += 1;
        c.peak = c.peak.max(c.now);
        c.first.get_or_insert(started);
    }
    let resp = next.run(req).await;
    let mut s = state.lock().expect("simulator state");
    let c = &mut s.concurrency;
    c.now -= 1;
    c.busy += started.elapsed();
    c.last = Some(std::time::Instant::now());
    resp
}

fn router(state: Shared) -> Router {
    Router::new()
        .route(
            "/v2/users",
            post(users_post)
                .patch(users_post)
                .get(users_get)
                .delete(users_delete),
        )
        .route("/v2/users/{id}", get(user_get))
        .route("/v2/settings", get(settings_get).patch(settings_patch))
        .route("/_sim/state", get(sim_state))
        .route("/_sim/requests", get(sim_requests))
        .route("/_sim/faults", post(sim_faults))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_in_flight,
        ))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, description: &str, data: Option<Value>) -> Response {
    let mut body = json!({ "error": code, "description": description });
    if let Some(d) = data {
        body["data"] = d;
    }
    (status, axum::Json(body)).into_response()
}

fn ok(data: Value) -> Response {
    let ts = chrono::Utc::now().timestamp();
    (
        StatusCode::OK,
        axum::Json(json!({ "data": data, "meta": { "timestamp": ts } })),
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_string)
}

/// What the common request prologue decided.
enum Gate {
    Go(String, Option<Fault>),
    Answer(Response),
}

/// Authenticates, records the request and picks a scripted fault.
fn gate(
    state: &Shared,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    ids: Vec<String>,
) -> Gate {
    let mut s = state.lock().expect("simulator state");
    let token = bearer(headers).unwrap_or_default();
    let mut record = RequestRecord {
        token: token.clone(),
        method: method.to_string(),
        path: path.to_string(),
        status: 200,
        ids,
        agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        at: Some(std::time::Instant::now()),
    };
    if let Some((at, pid, signal)) = s.signal_at
        && s.requests.len() + 1 == at
    {
        s.signal_at = None;
        let _ = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status();
    }
    let fault_pos = s.faults.script.iter().position(|f| {
        f.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method.as_str()))
            && f.path.as_deref().is_none_or(|p| path.starts_with(p))
    });
    let mut fault = fault_pos
        .and_then(|i| s.faults.script.remove(i))
        .map(|f| f.fault);
    if fault.is_none() {
        let matching: Vec<ErrorRate> = s
            .faults
            .error_rates
            .iter()
            .filter(|r| {
                r.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method.as_str()))
                    && r.path.as_deref().is_none_or(|p| path.starts_with(p))
            })
            .cloned()
            .collect();
        for r in matching {
            let draw: f64 = match s.rng.as_mut() {
                Some(rng) => rand::Rng::random(rng),
                None => rand::random(),
            };
            if draw < r.rate {
                fault = Some(Fault::Status {
                    status: r.status,
                    body: String::new(),
                    retry_after: r.retry_after.clone(),
                });
                break;
            }
        }
    }
    if s.faults.latency_ms > 0 && fault.is_none() {
        fault = Some(Fault::Delay {
            ms: s.faults.latency_ms,
        });
    }
    let unauthorized = token.is_empty()
        || s.faults.unauthorized_tokens.contains(&token)
        || (!s.accounts.contains_key(&token) && !s.open_registration);
    if unauthorized {
        record.status = 401;
        s.requests.push(record);
        return Gate::Answer(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Missing or invalid token",
            None,
        ));
    }
    s.accounts
        .entry(token.clone())
        .or_insert_with(|| SimAccount {
            user_limit: USER_LIMIT,
            ..Default::default()
        });
    if let Some(wait) = over_rate_limit(&mut s, &token) {
        record.status = 429;
        s.requests.push(record);
        let mut resp = error(
            StatusCode::TOO_MANY_REQUESTS,
            "TOO_MANY_REQUESTS",
            "Too many requests",
            None,
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, wait.as_secs().max(1).into());
        return Gate::Answer(resp);
    }
    if let Some(Fault::Status { status, .. }) = &fault {
        record.status = *status;
    }
    s.requests.push(record);
    Gate::Go(token, fault)
}

/// Counts a request of `token` in its window: Some(time until the window resets) when it is
/// over the limit. Every request counts, refused ones too; the counter resets with the window.
fn over_rate_limit(s: &mut SimState, token: &str) -> Option<Duration> {
    let (limit, period) = s.rate_limit?;
    let now = std::time::Instant::now();
    let window = s.windows.entry(token.to_string()).or_insert((now, 0));
    if now.duration_since(window.0) >= period {
        *window = (now, 0);
    }
    window.1 += 1;
    (window.1 > limit).then(|| period.saturating_sub(now.duration_since(window.0)))
}

/// Answers a scripted status fault, or waits a scripted delay; None: go on.
async fn apply_fault(fault: &Option<Fault>) -> Option<Response> {
    match fault {
        Some(Fault::Status {
            status,
            body,
            retry_after,
        }) => {
            let mut resp = (
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body.clone(),
            )
                .into_response();
            if let Some(ra) = retry_after
                && let Ok(v) = ra.parse()
            {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Some(resp)
        }
        Some(Fault::Drop) => Some(dropped()),
        Some(Fault::Delay { ms }) => {
            tokio::time::sleep(Duration::from_millis(*ms)).await;
            None
        }
        _ => None,
    }
}

/// A 200 answer whose body breaks off in the middle.
fn dropped() -> Response {
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"data\": {\"proc")),
        Err(std::io::Error::other("connection dropped")),
    ];
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from_stream(futures::stream::iter(chunks)))
        .expect("response")
}

/// The answer given, or a broken one when the fault says to apply and then break it.
fn answer(resp: Response, fault: &Option<Fault>) -> Response {
    match fault {
        Some(Fault::AppliedDrop) if resp.status().is_success() => dropped(),
        _ => resp,
    }
}

fn is_wazzup_phone(p: &str) -> bool {
    (8..=15).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())
}

fn set_status(state: &Shared, status: u16) {
    if let Some(r) = state.lock().expect("simulator state").requests.last_mut() {
        r.status = status;
    }
}

async fn users_post(
    State(state): State<Shared>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let users = parsed
        .as_ref()
        .and_then(|v| v.get("users"))
        .and_then(Value::as_array)
        .cloned();
    let ids: Vec<String> = users
        .iter()
        .flatten()
        .filter_map(|u| u.get("id").and_then(Value::as_str).map(str::to_string))
        .collect();
    let (token, fault) = match gate(&state, &method, "/v2/users", &headers, ids) {
        Gate::Go(t, f) => (t, f),
        Gate::Answer(r) => return r,
    };
    if let Some(r) = apply_fault(&fault).await {
        return r;
    }
    let resp = apply_users(&state, &token, users, &fault, method == Method::PATCH);
    set_status(&state, resp.status().as_u16());
    answer(resp, &fault)
}

fn apply_users(
    state: &Shared,
    token: &str,
    users: Option<Vec<Value>>,
    fault: &Option<Fault>,
    update_only: bool,
) -> Response {
    let Some(users) = users.filter(|u| !u.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_USER_DATA",
            "The request body is empty",
            None,
        );
    };
    if users.len() > 100 {
        return error(
            StatusCode::BAD_REQUEST,
            "TOO_MANY_ENTITIES",
            "At most 100 users per request",
            None,
        );
    }
    // Parse and check each entry.
    let mut bad = Vec::new();
    let mut parsed = Vec::with_capacity(users.len());
    for (index, u) in users.iter().enumerate() {
        let id = u.get("id").and_then(Value::as_str).unwrap_or("");
        let name = u.get("name").and_then(Value::as_str).unwrap_or("");
        let mut fields = Vec::new();
        if id.is_empty() || id.chars().count() > 64 {
            fields.push("id");
        }
        if name.is_empty() || name.chars().count() > 150 {
            fields.push("name");
        }
        if !fields.is_empty() {
            bad.push(json!({ "index": index, "fields": fields }));
            continue;
        }
        let phone = u
            .get("phone")
            .and_then(Value::as_str)
            .filter(|p| is_wazzup_phone(p))
            .map(Into::into);
        parsed.push(UserPayload {
            id: id.into(),
            name: name.into(),
            phone,
        });
    }
    if !bad.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_USER_DATA",
            "One or more of the provided fields are invalid",
            Some(Value::Array(bad)),
        );
    }
    let mut seen = std::collections::HashSet::new();
    if !parsed.iter().all(|u| seen.insert(u.id.clone())) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error").into_response();
    }
    let mut s = state.lock().expect("simulator state");
    let check = s.phone_check;
    let acct = s.accounts.get_mut(token).expect("gated account");
    if let Err(phone) = unique_phones(&acct.users, &parsed, check) {
        return error(
            StatusCode::BAD_REQUEST,
            "USER_ALREADY_EXISTS",
            &format!("User with phone number {phone} already exists in the CRM."),
            None,
        );
    }
    if update_only {
        let parsed: Vec<_> = parsed
            .into_iter()
            .filter(|u| acct.users.contains_key(u.id.as_str()))
            .collect();
        let n = parsed.len();
        store_users(&mut s, token, parsed);
        return ok(json!({ "processed": n }));
    }
    let new = parsed
        .iter()
        .filter(|u| !acct.users.contains_key(u.id.as_str()))
        .count();
    if acct.users.len() + new > acct.user_limit {
        return error(
            StatusCode::BAD_REQUEST,
            "USER_LIMIT_EXCEEDED",
            "The 1,000-user limit has been reached",
            None,
        );
    }
    let applied = match fault {
        Some(Fault::ShortProcessed { processed }) => (*processed).min(parsed.len()),
        _ => parsed.len(),
    };
    parsed.truncate(applied);
    store_users(&mut s, token, parsed);
    ok(json!({ "processed": applied }))
}

/// Stores users in an account (replacing those with the same id), noting each when recording.
fn store_users(s: &mut SimState, token: &str, users: Vec<UserPayload>) {
    let at = std::time::Instant::now();
    if let Some(log) = s.landings.as_mut() {
        log.extend(users.iter().map(|u| Landing {
            token: token.to_string(),
            id: u.id.to_string(),
            name: u.name.to_string(),
            at,
        }));
    }
    let acct = s.accounts.get_mut(token).expect("gated account");
    for u in users {
        acct.users.insert(u.id.to_string(), u);
    }
}

/// Checks that the request leaves every phone with one user, as `check` says; Err names a phone
/// another user holds.
fn unique_phones(
    stored: &BTreeMap<String, UserPayload>,
    request: &[UserPayload],
    check: PhoneCheck,
) -> Result<(), String> {
    let mut owner: HashMap<String, String> = stored
        .values()
        .filter_map(|u| u.phone.as_ref().map(|p| (p.to_string(), u.id.to_string())))
        .collect();
    let mut phone_of: HashMap<String, Option<String>> = stored
        .values()
        .map(|u| (u.id.to_string(), u.phone.as_ref().map(ToString::to_string)))
        .collect();
    for u in request {
        // The user's old phone is free from now on (its new one may be the same).
        if let Some(Some(old)) = phone_of.get(u.id.as_str())
            && owner.get(old) == Some(&u.id.to_string())
        {
            owner.remove(old);
        }
        phone_of.insert(u.id.to_string(), u.phone.as_ref().map(ToString::to_string));
        if let Some(p) = &u.phone {
            match owner.get(p.as_str()) {
                Some(other) if check == PhoneCheck::PerUser && other != u.id.as_str() => {
                    return Err(p.to_string());
                }
                _ => {
                    owner.insert(p.to_string(), u.id.to_string());
                }
            }
        }
    }
    if check == PhoneCheck::Request {
        // Once the whole request is applied, no phone may have two users.
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for (id, phone) in &phone_of {
            if let Some(p) = phone
                && let Some(_) = seen.insert(p.as_str(), id.as_str())
            {
                return Err(p.clone());
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct Page {
    offset: Option<usize>,
    limit: Option<usize>,
}

async fn users_get(
    State(state): State<Shared>,
    method: Method,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Response {
    let (token, fault) = match gate(&state, &method, "/v2/users", &headers, vec![]) {
        Gate::Go(t, f) => (t, f),
        Gate::Answer(r) => return r,
    };
    if let Some(r) = apply_fault(&fault).await {
        return r;
    }
    let s = state.lock().expect("simulator state");
    let acct = &s.accounts[&token];
    let limit = page.limit.unwrap_or(100).clamp(1, 100);
    let users: Vec<&UserPayload> = acct
        .users
        .values()
        .skip(page.offset.unwrap_or(0))
        .take(limit)
        .collect();
    ok(json!(users))
}

async fn user_get(
    State(state): State<Shared>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (token, fault) = match gate(&state, &method, "/v2/users/", &headers, vec![id.clone()]) {
        Gate::Go(t, f) => (t, f),
        Gate::Answer(r) => return r,
    };
    if let Some(r) = apply_fault(&fault).await {
        return r;
    }
    let s = state.lock().expect("simulator state");
    match s.accounts[&token].users.get(&id) {
        Some(u) => ok(json!([u])),
        None => ok(json!([])),
    }
}

async fn users_delete(
    State(state): State<Shared>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ids: Option<Vec<String>> = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| serde_json::from_value(v.get("user_ids")?.clone()).ok());
    let (token, fault) = match gate(
        &state,
        &method,
        "/v2/users",
        &headers,
        ids.clone().unwrap_or_default(),
    ) {
        Gate::Go(t, f) => (t, f),
        Gate::Answer(r) => return r,
    };
    if let Some(r) = apply_fault(&fault).await {
        return r;
    }
    let resp = match ids {
        None => error(
            StatusCode::BAD_REQUEST,
            "INVALID_USER_DATA",
            "user_ids is required",
            None,
        ),
        Some(ids) if ids.len() > 100 => error(
            StatusCode::BAD_REQUEST,
            "TOO_MANY_ENTITIES",
            "At most 100 ids per request",
            None,
        ),
        Some(ids) => {
            let mut s = state.lock().expect("simulator state");
            let acct = s.accounts.get_mut(&token).expect("gated account");
            for id in &ids {
                acct.users.remove(id);
            }
            acct.settings
                .user_roles
                .retain(|r| !ids.iter().any(|id| *id == r.user_id));
            acct.settings
                .hide_phone_numbers_for_user_ids
                .retain(|u| !ids.contains(u));
            ok(Value::Null)
        }
    };
    set_status(&state, resp.status().as_u16());
    answer(resp, &fault)
}

async fn settings_get(State(state): State<Shared>, method: Method, headers: HeaderMap) -> Response {
    let (token, fault) = match gate(&state, &method, "/v2/settings", &headers, vec![]) {
        Gate::Go(t, f) => (t, f),
        Gate::Answer(r) => return r,
    };
    if let Some(r) = apply_fault(&fault).await {
        return r;
    }
    let s = state.lock().expect("simulator state");
    (
        StatusCode::OK,
        axum::Json(s.accounts[&token].settings.clone()),
    )
        .into_response()
}

async fn settings_patch(
    State(state): State<Shared>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (token, fault) = match gate(&state, &method, "/v2/settings", &headers, vec![]) {
        Gate::Go(t, f) => (t, f),
        Gate::Answer(r) => return r,
    };
    if let Some(r) = apply_fault(&fault).await {
        return r;
    }
    let resp = match serde_json::from_slice::<SettingsDoc>(&body) {
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "INVALID_SETTINGS",
            &format!("Invalid settings: {e}"),
            None,
        ),
        Ok(doc) => {
            let mut s = state.lock().expect("simulator state");
            let acct = s.accounts.get_mut(&token).expect("gated account");
            let unknown: Vec<&str> = doc
                .user_roles
                .iter()
                .map(|r| r.user_id.as_str())
                .chain(
                    doc.hide_phone_numbers_for_user_ids
                        .iter()
                        .map(String::as_str),
                )
                .filter(|u| !acct.users.contains_key(*u))
                .collect();
            if let Some(u) = unknown.first() {
                error(
                    StatusCode::BAD_REQUEST,
                    "USER_NOT_FOUND",
                    &format!("User {u} does not exist"),
                    None,
                )
            } else if doc.user_roles.iter().any(|r| r.channel_id.is_empty()) {
                error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_SETTINGS",
                    "channel_id is required",
                    None,
                )
            } else {
                acct.settings = doc.clone();
                (StatusCode::OK, axum::Json(doc)).into_response()
            }
        }
    };
    set_status(&state, resp.status().as_u16());
    answer(resp, &fault)
}

async fn sim_state(State(state): State<Shared>) -> Response {
    let s = state.lock().expect("simulator state");
    let accounts: BTreeMap<String, Value> = s
        .accounts
        .iter()
        .map(|(t, a)| {
            (
                wazzup_api::limit::token_key(&secrecy::SecretString::from(t.clone())),
                json!({ "users": a.users.values().collect::<Vec<_>>(), "settings": a.settings }),
            )
        })
        .collect();
    axum::Json(json!({ "accounts": accounts })).into_response()
}

async fn sim_requests(State(state): State<Shared>) -> Response {
    let s = state.lock().expect("simulator state");
    axum::Json(json!({ "count": s.requests.len() })).into_response()
}

async fn sim_faults(
    State(state): State<Shared>,
    axum::Json(faults): axum::Json<Faults>,
) -> Response {
    state.lock().expect("simulator state").faults = faults;
    StatusCode::NO_CONTENT.into_response()
}
