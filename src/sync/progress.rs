//! Progress lines for long cycles, so a first sync is not silence.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

/// Logs a long cycle's progress every few seconds: accounts done of those to sync, users
/// pushed, and the rate.
pub struct CycleProgress {
    accounts_done: Arc<AtomicUsize>,
    users_pushed: Arc<AtomicUsize>,
    ticker: tokio::task::JoinHandle<()>,
}

impl CycleProgress {
    pub fn start(to_sync: Arc<AtomicUsize>) -> Self {
        let accounts_done = Arc::new(AtomicUsize::new(0));
        let users_pushed = Arc::new(AtomicUsize::new(0));
        let (done, pushed) = (accounts_done.clone(), users_pushed.clone());
        let started = Instant::now();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            every.tick().await;
            loop {
                every.tick().await;
                let pushed = pushed.load(AtomicOrdering::Relaxed);
                tracing::info!(
                    accounts_done = done.load(AtomicOrdering::Relaxed),
                    accounts_total = to_sync.load(AtomicOrdering::Relaxed),
                    users_pushed = pushed,
                    users_per_sec =
                        (pushed as f64 / started.elapsed().as_secs_f64()).round() as u64,
                    "Cycle in progress"
                );
            }
        });
        Self {
            accounts_done,
            users_pushed,
            ticker,
        }
    }

    pub fn account_done(&self, users_pushed: usize) {
        self.accounts_done.fetch_add(1, AtomicOrdering::Relaxed);
        self.users_pushed
            .fetch_add(users_pushed, AtomicOrdering::Relaxed);
    }

    pub fn stop(&self) {
        self.ticker.abort();
    }
}

/// Logs long pushes every few seconds, so a first sync is not silence.
pub struct Progress<'a> {
    account_id: &'a str,
    total: usize,
    done: usize,
    started: Instant,
    last: Instant,
}

impl<'a> Progress<'a> {
    pub fn new(account_id: &'a str, total: usize) -> Self {
        let now = Instant::now();
        Self {
            account_id,
            total,
            done: 0,
            started: now,
            last: now,
        }
    }
    /// Notes how many users are done so far; logs every few seconds.
    pub fn set(&mut self, done: usize) {
        self.done = done;
        if self.last.elapsed() >= Duration::from_secs(5) {
            self.last = Instant::now();
            let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                account_id = self.account_id,
                done = self.done,
                total = self.total,
                users_per_sec = rate.round() as u64,
                "Pushing users"
            );
        }
    }
}
