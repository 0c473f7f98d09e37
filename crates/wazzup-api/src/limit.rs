//! The per-token rate limit: every token gets its own budget, and a token that met a 429 is
//! slowed to a fifth of it for a while. Tokens are keyed by a fingerprint, never by value.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use secrecy::{ExposeSecret, SecretString};

/// How long a token stays slowed down after a 429.
pub const SLOWDOWN: Duration = Duration::from_secs(30);

/// A short, non-reversible fingerprint of a token, to tell tokens apart without keeping them.
pub fn token_key(token: &SecretString) -> String {
    blake3::hash(token.expose_secret().as_bytes()).to_hex()[..16].to_string()
}

/// Requests per second per token, and the slower rate after a 429.
pub struct TokenLimiter {
    normal: DefaultKeyedRateLimiter<String>,
    slow: DefaultKeyedRateLimiter<String>,
    slowed_until: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for TokenLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLimiter").finish_non_exhaustive()
    }
}

impl TokenLimiter {
    pub fn new(per_second: u32) -> Self {
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let slow = NonZeroU32::new((per_second / 5).max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            normal: RateLimiter::keyed(Quota::per_second(rate)),
            slow: RateLimiter::keyed(Quota::per_second(slow)),
            slowed_until: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until the token may send its next request.
    pub async fn wait_turn(&self, key: &String) {
        self.normal.until_key_ready(key).await;
        if self.is_slowed(key) {
            self.slow.until_key_ready(key).await;
        }
    }

    /// Slows the token down for [`SLOWDOWN`].
    pub fn slow_down(&self, key: &str) {
        self.slowed_until
            .lock()
            .expect("slowdown map")
            .insert(key.to_string(), Instant::now() + SLOWDOWN);
    }

    /// True while a recent 429 keeps this token at the reduced rate.
    pub fn is_slowed(&self, key: &str) -> bool {
        let mut map = self.slowed_until.lock().expect("slowdown map");
        match map.get(key) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                map.remove(key);
                false
            }
            None => false,
        }
    }
}
