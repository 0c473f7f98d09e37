//! The commands, one file each: `run` (the daemon, with [`listen`] for NOTIFY), `sync` and
//! `reconcile`, `plan`, `check`, `migrate`, `dead-letters`, `explain`, `history` and `access`,
//! `approvals`. `main.rs` only parses the
//! command line and calls these.

use crate::config::Settings;
use crate::sync::CycleReport;

pub mod approvals;
pub mod check;
pub mod dead_letters;
pub mod explain;
pub mod history;
pub mod listen;
pub mod plan;
pub mod run;
pub mod sync;

pub use check::check;
pub use plan::{plan, print_plan};
pub use run::run_daemon;
pub use sync::{migrate, sync_once};

/// Says once that tokens travel in the clear, when the operator allowed plain http.
pub(crate) fn warn_insecure(settings: &Settings) {
    if settings.insecure_http_in_use() {
        tracing::warn!(
            "WAZZUP_SYNC__WAZZUP__ALLOW_INSECURE_HTTP is on: tokens travel over plain http to a non-loopback host"
        );
    }
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Exit status of `sync`: 0 when every account completed.
pub fn exit_code(report: &CycleReport) -> i32 {
    if report.all_ok() { 0 } else { 1 }
}

/// Names the accounts that did not complete, for the final line of `sync`.
pub fn failed_accounts(report: &CycleReport) -> Vec<String> {
    report
        .accounts
        .iter()
        .filter(|a| !a.outcome.is_ok())
        .map(|a| match a.outcome.reason() {
            Some(why) => format!("{}: {why}", a.account_id),
            None => a.account_id.clone(),
        })
        .chain(
            report
                .bad_accounts
                .iter()
                .map(|(id, w)| format!("{id}: {w}")),
        )
        .collect()
}
