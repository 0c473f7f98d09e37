//! The Wazzup Partner API's users and settings, as this project uses them.
//!
//! - [`types`]: the wire types (`UserPayload`, `SettingsDoc`, `Role`…), whose JSON is what is sent.
//! - [`classify`]: a pure function that turns an HTTP answer into success, a rejection of the
//!   records, a refusal of the token or a transient fault.
//! - [`retry`]: the retry decision for transient faults (exponential, full jitter, Retry-After).
//! - [`limit`]: the per-token rate limit, slowed down after a 429.
//! - [`client`]: the HTTP client that puts them together.

pub mod classify;
pub mod client;
pub mod error;
pub mod limit;
pub mod retry;
pub mod types;

pub use bytes::Bytes;
pub use classify::{classify, parse_retry_after};
pub use client::{Account, ClientConfig, NoObserver, Observer, RequestStats, WazzupClient};
pub use error::{ApiError, fold_code};
pub use retry::RetryPolicy;
pub use types::{Role, RoleEntry, SettingsDoc, SettingsDocRef, Text, UserPayload};
