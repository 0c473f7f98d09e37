//! Settings: built-in defaults < `config/default.toml` < `--config FILE` < `WAZZUP_SYNC__*` variables,
//! checked once at start-up into typed values.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::postgres::PgConnectOptions;

use crate::domain::Role;

/// The defaults shipped in the binary (the same file as `config/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// Prefix of every environment variable the daemon reads.
pub const ENV_PREFIX: &str = "WAZZUP_SYNC";

/// A setting that cannot be used; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This process's name in the history (empty: host name and pid; see [`Settings::instance`]).
    pub instance: String,
    pub source: SourceSettings,
    pub state: StateSettings,
    pub wazzup: WazzupSettings,
    pub sync: SyncSettings,
    pub history: HistorySettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySettings {
    /// Days history rows are kept; 0: for ever.
    pub retention_days: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub enabled: bool,
    pub listen: String,
    pub ready_max_periods: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    pub url: SecretString,
    pub users_query: String,
    pub roles_query: String,
    pub accounts_query: String,
    pub default_phone_region: String,
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
    /// A direct (session) connection for LISTEN when the URL goes through a transaction pooler.
    pub listen_url: SecretString,
    #[serde(default)]
    pub role_map: BTreeMap<String, String>,
    /// The query settings whose trailing `;` was stripped at load, for `check` to say so.
    #[serde(skip)]
    pub stripped: Vec<&'static str>,
}

impl SourceSettings {
    /// Makes queries pasted from psql work inside the daemon's own: a trailing `;` is stripped,
    /// and a query whose last line holds a `--` comment ends with a new line, so that the
    /// comment cannot swallow what is written after it.
    fn tidy_queries(&mut self) {
        for (key, q) in [
            ("SOURCE__USERS_QUERY", &mut self.users_query),
            ("SOURCE__ROLES_QUERY", &mut self.roles_query),
            ("SOURCE__ACCOUNTS_QUERY", &mut self.accounts_query),
        ] {
            let (tidy, stripped) = tidy_query(q);
            *q = tidy;
            if stripped {
                self.stripped.push(key);
            }
        }
    }
}

/// A query as the daemon can wrap it, and whether a trailing `;` was stripped (see
/// [`SourceSettings::tidy_queries`]). Strings, quoted names, dollar quotes and comments are
/// skipped over, so only a `;` that ends the code is taken.
pub fn tidy_query(sql: &str) -> (String, bool) {
    let mut text = sql.to_string();
    let mut stripped = false;
    while let Some(end) = last_code_byte(&text) {
        if text.as_bytes()[end] != b';' {
            break;
        }
        text.remove(end);
        stripped = true;
    }
    let text = text.trim_end().to_string();
    let last_line = text.rsplit('\n').next().unwrap_or_default();
    if last_line.contains("--") {
        (text + "\n", stripped)
    } else {
        (text, stripped)
    }
}

/// The byte index of the last character of code: not whitespace, and not in a comment.
fn last_code_byte(sql: &str) -> Option<usize> {
    let b = sql.as_bytes();
    let (mut i, mut last) = (0, None);
    while i < b.len() {
        let rest = &sql[i..];
        let skip_to = |close: &str, from: usize| {
            rest[from..]
                .find(close)
                .map_or(b.len(), |at| i + from + at + close.len())
        };
        let next = if rest.starts_with("--") {
            // A line comment: not code.
            i = skip_to("\n", 2);
            continue;
        } else if rest.starts_with("/*") {
            i = block_comment_end(sql, i);
            continue;
        } else if b[i] == b'\'' || b[i] == b'"' {
            quoted_end(b, i)
        } else if let Some(tag) = dollar_tag(rest) {
            skip_to(tag, tag.len())
        } else {
            i + rest.chars().next().map_or(1, char::len_utf8)
        };
        if !b[i].is_ascii_whitespace() {
            // A token's first byte: a `;` alone, never the `;` inside a string.
            last = Some(i);
        }
        i = next;
    }
    last
}

/// Where a `/* … */` comment starting at `start` ends (PostgreSQL nests them).
fn block_comment_end(sql: &str, start: usize) -> usize {
    let b = sql.as_bytes();
    let (mut depth, mut i) = (0usize, start);
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => (depth, i) = (depth + 1, i + 2),
            (b'*', b'/') => {
                (depth, i) = (depth - 1, i + 2);
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    b.len()
}

/// Where a '…' string or "…" name starting at `start` ends (a doubled quote is inside it).
fn quoted_end(b: &[u8], start: usize) -> usize {
    let quote = b[start];
    let mut i = start + 1;
    while i < b.len() {
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// The `$tag$` opening a dollar-quoted string at the start of `rest`, if one does.
fn dollar_tag(rest: &str) -> Option<&str> {
    let body = rest.strip_prefix('$')?;
    let end = body.find('$')?;
    let tag = &body[..end];
    let valid = tag
        .chars()
        .enumerate()
        .all(|(n, c)| c == '_' || c.is_alphabetic() || (n > 0 && c.is_ascii_digit()));
    valid.then(|| &rest[..end + 2])
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    pub url: SecretString,
    pub schema: String,
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WazzupSettings {
    pub base_url: String,
    pub token: SecretString,
    pub push_input_output_message_events_for_managers: bool,
    pub single_account_id: String,
    pub request_timeout_secs: u64,
    pub rate_limit_per_second: u32,
    pub allow_insecure_http: bool,
    pub retry_max_attempts: usize,
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    pub retry_max_elapsed_secs: u64,
    pub auth_cooldown_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    pub schedule: String,
    pub delete_missing: bool,
    pub concurrency: usize,
    pub batches_in_flight: usize,
    pub batch_size: usize,
    pub mass_delete_max_percent: u32,
    pub mass_delete_min: usize,
    pub allow_mass_delete: bool,
    pub reconcile_schedule: String,
    pub prune_unknown: bool,
    pub listen_channel: String,
    pub shutdown_grace_secs: u64,
    /// Hold every change that widens access until a person approves it.
    pub hold_widening: bool,
    /// How long a user who left the CRM stays in Wazzup, without access, before it is
    /// deleted (`24h`, `90m`, `0s`); see [`Settings::delete_grace`].
    pub delete_grace: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: String,
    pub level: String,
}

impl Settings {
    /// Loads the layered configuration from the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Loads the layered configuration with the given variables standing in for the environment.
    pub fn load_from(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut vars: config::Map<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        read_secret_files(&mut vars)?;
        let mut builder = Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .add_source(File::new("config/default.toml", FileFormat::Toml).required(false));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "Configuration file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(vars)),
        );
        let raw = builder.build().map_err(describe_config_error)?;
        let mut settings: Settings = raw.try_deserialize().map_err(describe_config_error)?;
        settings.source.tidy_queries();
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_source()?;
        self.validate_wazzup()?;
        self.validate_sync()?;
        self.validate_http_and_log()
    }

    fn validate_source(&self) -> Result<(), ConfigError> {
        let s = self;
        if s.source.url.expose_secret().trim().is_empty() {
            return Err(bad(
                "SOURCE__URL",
                "is not set: the CRM's PostgreSQL URL is required",
            ));
        }
        PgConnectOptions::from_str(s.source.url.expose_secret())
            .map_err(|_| bad("SOURCE__URL", "is not a valid PostgreSQL URL"))?;
        if !s.state.url.expose_secret().trim().is_empty() {
            PgConnectOptions::from_str(s.state.url.expose_secret())
                .map_err(|_| bad("STATE__URL", "is not a valid PostgreSQL URL"))?;
        }
        if !s.source.listen_url.expose_secret().trim().is_empty() {
            PgConnectOptions::from_str(s.source.listen_url.expose_secret())
                .map_err(|_| bad("SOURCE__LISTEN_URL", "is not a valid PostgreSQL URL"))?;
        }
        if s.source.max_connections < 2 {
            return Err(bad(
                "SOURCE__MAX_CONNECTIONS",
                "must be at least 2: a cycle reads on two connections at once",
            ));
        }
        for (key, secs) in [
            (
                "SOURCE__CONNECT_TIMEOUT_SECS",
                s.source.connect_timeout_secs,
            ),
            ("STATE__CONNECT_TIMEOUT_SECS", s.state.connect_timeout_secs),
        ] {
            if secs == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        if !is_identifier(&s.state.schema) {
            return Err(bad(
                "STATE__SCHEMA",
                "must be a lower-case SQL identifier (letters, digits, _; at most 63)",
            ));
        }
        for (key, q) in [
            ("SOURCE__USERS_QUERY", &s.source.users_query),
            ("SOURCE__ROLES_QUERY", &s.source.roles_query),
            ("SOURCE__ACCOUNTS_QUERY", &s.source.accounts_query),
        ] {
            if q.trim().is_empty() {
                return Err(bad(key, "is empty"));
            }
        }
        if !s.source.default_phone_region.is_empty() {
            phonenumber::country::Id::from_str(&s.source.default_phone_region.to_uppercase())
                .map_err(|_| {
                    bad(
                        "SOURCE__DEFAULT_PHONE_REGION",
                        "is not an ISO 3166 region code such as RU or LV",
                    )
                })?;
        }
        for (crm, api) in &s.source.role_map {
            if Role::from_api(api).is_none() {
                return Err(ConfigError(format!(
                    "{ENV_PREFIX}__SOURCE__ROLE_MAP__{}: '{api}' is not an API role: write exactly seller, manager or auditor (the UI's Manager is seller, Supervisor is manager, Quality Control is auditor)",
                    crm.to_uppercase()
                )));
            }
        }
        Ok(())
    }

    fn validate_wazzup(&self) -> Result<(), ConfigError> {
        let s = self;
        self.wazzup_base_url()?;
        if s.wazzup.rate_limit_per_second == 0 {
            return Err(bad("WAZZUP__RATE_LIMIT_PER_SECOND", "must be at least 1"));
        }
        if s.wazzup.request_timeout_secs == 0 {
            return Err(bad("WAZZUP__REQUEST_TIMEOUT_SECS", "must be at least 1"));
        }
        if s.wazzup.retry_max_attempts == 0 {
            return Err(bad("WAZZUP__RETRY_MAX_ATTEMPTS", "must be at least 1"));
        }
        if s.wazzup.single_account_id.trim().is_empty() {
            return Err(bad("WAZZUP__SINGLE_ACCOUNT_ID", "is empty"));
        }
        if let Some(why) = token_fault(s.wazzup.token.expose_secret()) {
            return Err(bad("WAZZUP__TOKEN", why));
        }
        Ok(())
    }

    fn validate_sync(&self) -> Result<(), ConfigError> {
        let s = self;
        if s.sync.batch_size == 0 || s.sync.batch_size > 100 {
            return Err(bad(
                "SYNC__BATCH_SIZE",
                "must be between 1 and 100 (Wazzup's limit)",
            ));
        }
        if s.sync.concurrency == 0 {
            return Err(bad("SYNC__CONCURRENCY", "must be at least 1"));
        }
        if s.sync.batches_in_flight == 0 {
            return Err(bad("SYNC__BATCHES_IN_FLIGHT", "must be at least 1"));
        }
        if s.sync.mass_delete_max_percent > 100 {
            return Err(bad("SYNC__MASS_DELETE_MAX_PERCENT", "must be 0..100"));
        }
        validate_cron(&s.sync.schedule).map_err(|e| bad("SYNC__SCHEDULE", &e))?;
        validate_cron(&s.sync.reconcile_schedule)
            .map_err(|e| bad("SYNC__RECONCILE_SCHEDULE", &e))?;
        if parse_duration(&s.sync.delete_grace).is_none() {
            return Err(bad(
                "SYNC__DELETE_GRACE",
                "must be a duration such as 24h, 90m, 7d or 0s",
            ));
        }
        if !s.sync.listen_channel.is_empty() && !is_identifier(&s.sync.listen_channel) {
            return Err(bad(
                "SYNC__LISTEN_CHANNEL",
                "must be a lower-case SQL identifier",
            ));
        }
        Ok(())
    }

    fn validate_http_and_log(&self) -> Result<(), ConfigError> {
        let s = self;
        s.http
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|_| bad("HTTP__LISTEN", "must be an address such as 0.0.0.0:9090"))?;
        if !matches!(s.log.format.as_str(), "json" | "pretty" | "auto") {
            return Err(bad("LOG__FORMAT", "must be json, pretty or auto"));
        }
        tracing_subscriber::EnvFilter::try_new(&s.log.level)
            .map_err(|_| bad("LOG__LEVEL", "is not a valid log filter"))?;
        if s.instance.trim().chars().count() > 200 {
            return Err(bad("INSTANCE", "must be at most 200 characters"));
        }
        Ok(())
    }

    /// The Wazzup base URL, checked: https, or http to a loopback address (or when allowed).
    pub fn wazzup_base_url(&self) -> Result<reqwest::Url, ConfigError> {
        let url = reqwest::Url::parse(self.wazzup.base_url.trim_end_matches('/'))
            .map_err(|_| bad("WAZZUP__BASE_URL", "is not a valid URL"))?;
        match url.scheme() {
            "https" => Ok(url),
            "http" if is_loopback(&url) || self.wazzup.allow_insecure_http => Ok(url),
            "http" => Err(bad(
                "WAZZUP__BASE_URL",
                "uses plain http to a non-loopback host; use https or set WAZZUP_SYNC__WAZZUP__ALLOW_INSECURE_HTTP=true",
            )),
            _ => Err(bad("WAZZUP__BASE_URL", "must be an https URL")),
        }
    }

    /// True when plain http goes to a non-loopback host (allowed only by the insecure setting).
    pub fn insecure_http_in_use(&self) -> bool {
        self.wazzup_base_url()
            .map(|u| u.scheme() == "http" && !is_loopback(&u))
            .unwrap_or(false)
    }

    /// How long a user who left the CRM keeps its Wazzup user (checked at start-up).
    pub fn delete_grace(&self) -> std::time::Duration {
        parse_duration(&self.sync.delete_grace).unwrap_or_default()
    }

    /// This process's name in the history: `instance`, or `host:pid`.
    pub fn instance(&self) -> String {
        let set = self.instance.trim();
        if !set.is_empty() {
            return set.to_string();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown-host".into());
        format!("{host}:{}", std::process::id())
    }

    /// The single-account token, when single-account mode is on.
    pub fn single_token(&self) -> Option<SecretString> {
        let t = self.wazzup.token.expose_secret().trim();
        (!t.is_empty()).then(|| SecretString::from(t.to_string()))
    }

    /// The state database URL (the source URL when none is set).
    pub fn state_url(&self) -> &SecretString {
        if self.state.url.expose_secret().trim().is_empty() {
            &self.source.url
        } else {
            &self.state.url
        }
    }

    /// The URL LISTEN uses: `source.listen_url`, or the CRM URL when that is empty.
    pub fn listen_url(&self) -> &SecretString {
        if self.source.listen_url.expose_secret().trim().is_empty() {
            &self.source.url
        } else {
            &self.source.listen_url
        }
    }

    /// The variable an operator fixes when the state database cannot be reached.
    pub fn state_url_variable(&self) -> String {
        if self.state.url.expose_secret().trim().is_empty() {
            format!(
                "{ENV_PREFIX}__SOURCE__URL, which the state database uses while {ENV_PREFIX}__STATE__URL is unset"
            )
        } else {
            format!("{ENV_PREFIX}__STATE__URL")
        }
    }

    /// The default phone region, when one is set.
    pub fn phone_region(&self) -> Option<phonenumber::country::Id> {
        phonenumber::country::Id::from_str(&self.source.default_phone_region.to_uppercase()).ok()
    }

    /// The CRM-role map, keys folded to lower case.
    pub fn role_map(&self) -> BTreeMap<String, Role> {
        self.source
            .role_map
            .iter()
            .filter_map(|(k, v)| Some((k.trim().to_lowercase(), Role::from_api(v)?)))
            .collect()
    }
}

/// The secret settings, which can also be read from a file named by the same variable with
/// `_FILE` appended (as Docker and Kubernetes mount secrets).
pub const SECRET_VARIABLES: [&str; 4] = [
    "SOURCE__URL",
    "SOURCE__LISTEN_URL",
    "STATE__URL",
    "WAZZUP__TOKEN",
];

/// Replaces each `<VAR>_FILE` by `<VAR>` holding the file's content, trailing newlines
/// dropped. Both set, or a file that cannot be read, is an error naming the variables or the
/// file, never the content.
fn read_secret_files(vars: &mut config::Map<String, String>) -> Result<(), ConfigError> {
    for key in SECRET_VARIABLES {
        let name = format!("{ENV_PREFIX}__{key}");
        let file_var = format!("{name}_FILE");
        let Some(path) = vars.remove(&file_var) else {
            continue;
        };
        if vars.contains_key(&name) {
            return Err(ConfigError(format!(
                "{name} and {file_var} are both set; set only one of them"
            )));
        }
        let content = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError(format!("{file_var}: cannot read the file {path}: {e}")))?;
        vars.insert(name, content.trim_end_matches(['\n', '\r']).to_string());
    }
    Ok(())
}

/// Why a token (trimmed) cannot be sent in an HTTP header, if it cannot: the token itself is
/// never part of the answer.
pub fn token_fault(token: &str) -> Option<&'static str> {
    token
        .trim()
        .chars()
        .any(|c| !c.is_ascii() || c.is_ascii_control())
        .then_some("has a character a token cannot hold in an HTTP header (a line break, a control or non-ASCII character)")
}

fn bad(key: &str, what: &str) -> ConfigError {
    ConfigError(format!("{ENV_PREFIX}__{key} {what}"))
}

/// Where a TOML error is and what kind it is (`: at line 3, column 7: invalid string`), without
/// the quoted line, which may hold a secret.
fn toml_error_place(cause: &str) -> String {
    let place = cause
        .lines()
        .next()
        .and_then(|l| l.find(" at line ").map(|i| l[i + 1..].trim().to_string()));
    let kind = cause
        .lines()
        .map(str::trim)
        .rfind(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && !l.starts_with(|c: char| c.is_ascii_digit())
                && !l.contains("parse error")
        })
        .map(str::to_string);
    match (place, kind) {
        (Some(p), Some(k)) => format!(": {p}: {k}"),
        (Some(p), None) => format!(": {p}"),
        _ => String::new(),
    }
}

/// Turns the config crate's error into one line naming the variable, never echoing a value.
fn describe_config_error(e: config::ConfigError) -> ConfigError {
    match &e {
        config::ConfigError::Type {
            key: Some(key),
            expected,
            ..
        } => ConfigError(format!(
            "{} has a wrong value: expected {expected}",
            env_name(key)
        )),
        config::ConfigError::FileParse { uri, cause } => ConfigError(format!(
            "Configuration file {} is not valid TOML{}",
            uri.as_deref().unwrap_or("?"),
            toml_error_place(&cause.to_string())
        )),
        _ => {
            let msg = e.to_string();
            if let Some(field) = msg
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                ConfigError(format!(
                    "Unknown setting '{field}' (check the WAZZUP_SYNC__ variables and the config file): {msg}"
                ))
            } else if let Some(field) = msg
                .strip_prefix("missing field `")
                .and_then(|r| r.split('`').next())
            {
                ConfigError(format!("Missing setting '{field}'"))
            } else {
                ConfigError(format!("Invalid configuration: {msg}"))
            }
        }
    }
}

fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}__{}",
        key.replace('.', "__").replace('-', "_").to_uppercase()
    )
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// The time between two runs of a cron schedule (the next two occurrences from now).
pub fn cron_period(expr: &str) -> Option<std::time::Duration> {
    let cron = croner::Cron::from_str(expr).ok()?;
    let now = chrono::Utc::now();
    let a = cron.find_next_occurrence(&now, false).ok()?;
    let b = cron.find_next_occurrence(&a, false).ok()?;
    (b - a).to_std().ok()
}

/// Checks a six-field cron expression (with seconds).
/// A duration written as numbers with units, `s`, `m`, `h`, `d` or `w`, one after another:
/// `24h`, `90m`, `1h30m`, `0s`. None for anything else (a bare number too).
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        let unit = match rest[digits..].chars().next()? {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
        rest = &rest[digits + 1..];
    }
    Some(std::time::Duration::from_secs(total))
}

pub fn validate_cron(expr: &str) -> Result<(), String> {
    if expr.split_whitespace().count() != 6 {
        return Err(format!(
            "must be a cron expression with seconds (6 fields), got {} fields",
            expr.split_whitespace().count()
        ));
    }
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map(|_| ())
        .map_err(|_| "is not a valid cron expression".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_pasted_from_psql_loses_its_semicolon_and_ends_after_its_comment() {
        let cases = [
            ("SELECT 1", "SELECT 1", false),
            ("SELECT 1;", "SELECT 1", true),
            ("SELECT 1 ;;\n  ", "SELECT 1", true),
            ("SELECT 1; -- the users\n", "SELECT 1 -- the users\n", true),
            ("SELECT 1\n-- the users", "SELECT 1\n-- the users\n", false),
            (
                "SELECT 1; /* the /* nested */ users */",
                "SELECT 1 /* the /* nested */ users */",
                true,
            ),
            ("SELECT ';'", "SELECT ';'", false),
            ("SELECT 'it''s;'", "SELECT 'it''s;'", false),
            ("SELECT \"a;\" FROM t", "SELECT \"a;\" FROM t", false),
            ("SELECT $x$;$x$", "SELECT $x$;$x$", false),
            ("SELECT $$ ; $$;", "SELECT $$ ; $$", true),
            (
                "SELECT 'a' -- no; comment",
                "SELECT 'a' -- no; comment\n",
                false,
            ),
            ("SELECT 'ü';", "SELECT 'ü'", true),
        ];
        for (pasted, wrapped, stripped) in cases {
            assert_eq!(
                tidy_query(pasted),
                (wrapped.to_string(), stripped),
                "{pasted:?}"
            );
        }
    }

    #[test]
    fn check_is_told_which_queries_lost_a_semicolon() {
        let s = Settings::load_from(
            None,
            vars(&[
                ("WAZZUP_SYNC__SOURCE__URL", "postgres://u@localhost/crm"),
                ("WAZZUP_SYNC__SOURCE__ROLES_QUERY", "SELECT * FROM roles;"),
            ]),
        )
        .unwrap();
        assert_eq!(s.source.stripped, ["SOURCE__ROLES_QUERY"]);
        assert_eq!(s.source.roles_query, "SELECT * FROM roles");
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_when_only_the_source_url_is_set() {
        let s = Settings::load_from(
            None,
            vars(&[("WAZZUP_SYNC__SOURCE__URL", "postgres://u@localhost/crm")]),
        )
        .unwrap();
        assert_eq!(s.sync.schedule, "*/30 * * * * *");
        assert_eq!(s.state.schema, "wazzup_sync");
        assert_eq!(s.wazzup.base_url, "https://tech.wazzup24.com");
        assert!(s.single_token().is_none());
        assert!(s.sync.delete_missing);
    }

    #[test]
    fn missing_source_url_names_the_variable() {
        let e = Settings::load_from(None, vars(&[])).unwrap_err();
        assert!(e.0.contains("WAZZUP_SYNC__SOURCE__URL"), "{e}");
    }

    #[test]
    fn a_wrongly_typed_value_names_the_variable_and_hides_the_value() {
        let e = Settings::load_from(
            None,
            vars(&[
                ("WAZZUP_SYNC__SOURCE__URL", "postgres://localhost/crm"),
                ("WAZZUP_SYNC__SYNC__DELETE_MISSING", "sometimes"),
            ]),
        )
        .unwrap_err();
        assert!(e.0.contains("WAZZUP_SYNC__SYNC__DELETE_MISSING"), "{e}");
        assert!(!e.0.contains("sometimes"), "{e}");
    }

    #[test]
    fn the_period_of_a_schedule_is_known() {
        assert_eq!(
            cron_period("*/30 * * * * *"),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            cron_period("0 0 3 * * *"),
            Some(std::time::Duration::from_secs(86400))
        );
    }

    #[test]
    fn a_bad_schedule_is_refused() {
        let e = Settings::load_from(
            None,
            vars(&[
                ("WAZZUP_SYNC__SOURCE__URL", "postgres://localhost/crm"),
                ("WAZZUP_SYNC__SYNC__SCHEDULE", "every minute"),
            ]),
        )
        .unwrap_err();
        assert!(e.0.contains("WAZZUP_SYNC__SYNC__SCHEDULE"), "{e}");
    }

    #[test]
    fn plain_http_is_only_for_loopback() {
        let base = [("WAZZUP_SYNC__SOURCE__URL", "postgres://localhost/crm")];
        let mut v = vars(&base);
        v.push((
            "WAZZUP_SYNC__WAZZUP__BASE_URL".into(),
            "http://example.com".into(),
        ));
        let e = Settings::load_from(None, v.clone()).unwrap_err();
        assert!(e.0.contains("WAZZUP_SYNC__WAZZUP__BASE_URL"), "{e}");
        v.push((
            "WAZZUP_SYNC__WAZZUP__ALLOW_INSECURE_HTTP".into(),
            "true".into(),
        ));
        let s = Settings::load_from(None, v).unwrap();
        assert!(s.insecure_http_in_use());
        let mut v = vars(&base);
        v.push((
            "WAZZUP_SYNC__WAZZUP__BASE_URL".into(),
            "http://127.0.0.1:8080".into(),
        ));
        assert!(!Settings::load_from(None, v).unwrap().insecure_http_in_use());
    }

    #[test]
    fn an_unknown_setting_is_refused() {
        let e = Settings::load_from(
            None,
            vars(&[
                ("WAZZUP_SYNC__SOURCE__URL", "postgres://localhost/crm"),
                ("WAZZUP_SYNC__SYNC__SCHEDULLE", "* * * * * *"),
            ]),
        )
        .unwrap_err();
        assert!(e.0.contains("schedulle"), "{e}");
    }

    #[test]
    fn the_token_never_appears_in_debug_output() {
        let s = Settings::load_from(
            None,
            vars(&[
                (
                    "WAZZUP_SYNC__SOURCE__URL",
                    "postgres://u:hunter2@localhost/crm",
                ),
                ("WAZZUP_SYNC__WAZZUP__TOKEN", "tok-very-secret"),
            ]),
        )
        .unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("tok-very-secret"));
        assert!(!dbg.contains("hunter2"));
        assert!(s.single_token().is_some());
    }

    #[test]
    fn a_secret_can_come_from_a_file_without_its_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("wzs-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "tok-from-file\n").unwrap();
        let path = file.to_str().unwrap();
        let s = Settings::load_from(
            None,
            vars(&[
                ("WAZZUP_SYNC__SOURCE__URL", "postgres://localhost/crm"),
                ("WAZZUP_SYNC__WAZZUP__TOKEN_FILE", path),
            ]),
        )
        .unwrap();
        assert_eq!(s.single_token().unwrap().expose_secret(), "tok-from-file");
        let e = Settings::load_from(
            None,
            vars(&[
                ("WAZZUP_SYNC__SOURCE__URL", "postgres://localhost/crm"),
                ("WAZZUP_SYNC__WAZZUP__TOKEN", "x"),
                ("WAZZUP_SYNC__WAZZUP__TOKEN_FILE", path),
            ]),
        )
        .unwrap_err();
        assert!(
            e.0.contains("WAZZUP_SYNC__WAZZUP__TOKEN and WAZZUP_SYNC__WAZZUP__TOKEN_FILE"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_crm_connection_or_a_token_with_a_line_break_stops_start_up_naming_the_variable() {
        let e = Settings::load_from(
            None,
            vars(&[
                ("WAZZUP_SYNC__SOURCE__URL", "postgres://localhost/crm"),
                ("WAZZUP_SYNC__SOURCE__MAX_CONNECTIONS", "1"),
            ]),
        )
        .unwrap_err();
        assert!(
            e.0.starts_with("WAZZUP_SYNC__SOURCE__MAX_CONNECTIONS must be at least 2"),
            "{e}"
        );
        for token in ["tok-secret\nline2", "tok\u{7}secret", "tok-sécret"] {
            let e = Settings::load_from(
                None,
                vars(&[
                    ("WAZZUP_SYNC__SOURCE__URL", "postgres://localhost/crm"),
                    ("WAZZUP_SYNC__WAZZUP__TOKEN", token),
                ]),
            )
            .unwrap_err();
            assert!(
                e.0.starts_with("WAZZUP_SYNC__WAZZUP__TOKEN has a character"),
                "{e}"
            );
            assert!(!e.0.contains("secret") && !e.0.contains("sécret"), "{e}");
        }
    }

    #[test]
    fn a_toml_error_names_its_line_and_kind_but_never_quotes_the_file() {
        let dir = std::env::temp_dir().join(format!("wzs-toml-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(
            &file,
            "[source]\nurl = \"postgres://u:hunter2@db/crm\"\nusers_query = \"SELECT 1\n",
        )
        .unwrap();
        let e = Settings::load_from(Some(file.as_path()), vars(&[])).unwrap_err();
        assert!(e.0.contains("is not valid TOML: at line 3, column"), "{e}");
        assert!(!e.0.contains("hunter2") && !e.0.contains("SELECT"), "{e}");
        assert_eq!(e.0.lines().count(), 1, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_role_map_to_a_non_api_role_is_refused() {
        let e = Settings::load_from(
            None,
            vars(&[
                ("WAZZUP_SYNC__SOURCE__URL", "postgres://localhost/crm"),
                ("WAZZUP_SYNC__SOURCE__ROLE_MAP__SUPERVISOR", "boss"),
            ]),
        )
        .unwrap_err();
        assert!(e.0.contains("ROLE_MAP__SUPERVISOR"), "{e}");
    }
}
