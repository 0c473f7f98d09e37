//! `dead-letters`: list, retry and discard refused records by hand.

use std::io::Write;
use std::process::ExitCode;

use crate::config::Settings;
use crate::state::{self, DeadLetterKind, DeadLetterRow, Selection};
use crate::sync::CycleOptions;

/// What an operator asked of the dead letters.
#[derive(Debug, Clone)]
pub enum Action {
    List { all: bool, json: bool },
    Retry { now: bool },
    Discard,
}

/// The state pool of a read command, once the state database answers; None (and a line
/// saying so) when there is no state schema yet.
pub(super) async fn state_pool(settings: &Settings) -> anyhow::Result<Option<sqlx::PgPool>> {
    let pool = state::connect(settings)?;
    crate::db::probe_all(&[&state::target(settings)?]).await?;
    if !state::is_migrated(&pool, &settings.state.schema).await? {
        println!("No state schema yet: nothing has been synced.");
        return Ok(None);
    }
    Ok(Some(pool))
}

/// Runs a `dead-letters` command; `retry --now` runs a cycle for the accounts it touched.
pub async fn run(
    settings: Settings,
    action: Action,
    selection: Selection,
) -> anyhow::Result<ExitCode> {
    let Some(pool) = state_pool(&settings).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    match action {
        Action::List { all, json } => {
            let rows = state::list_dead_letters(&pool, &selection, all).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&rows, &mut std::io::stdout())?;
            }
        }
        Action::Retry { now } => {
            let accounts = state::retry_dead_letters(&pool, &selection).await?;
            println!(
                "Marked dead letters of {} account(s) due for the next cycle.",
                accounts.len()
            );
            if now && !accounts.is_empty() {
                let opts = CycleOptions {
                    only_accounts: Some(accounts.into_iter().collect()),
                    trigger: crate::sync::Trigger::Retry,
                    ..Default::default()
                };
                return super::sync::sync_and_report(settings, opts).await;
            }
        }
        Action::Discard => {
            let n = state::discard_dead_letters(&pool, &selection).await?;
            println!("Discarded {n} dead letter(s).");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn clip(s: &str, n: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= n {
        one_line
    } else {
        one_line
            .chars()
            .take(n.saturating_sub(1))
            .collect::<String>()
            + "…"
    }
}

/// Prints dead letters as a table a human can act on.
pub fn print_table(rows: &[DeadLetterRow], out: &mut impl Write) -> std::io::Result<()> {
    if rows.is_empty() {
        return writeln!(out, "No dead letters.");
    }
    writeln!(
        out,
        "{:>6}  {:<14} {:<8} {:<20} {:<8} {:<28} {:>4}  {:<16}  WHY / WHAT TO FIX",
        "ID", "ACCOUNT", "ENTITY", "RECORD", "KIND", "CODE", "TRY", "NEXT ATTEMPT"
    )?;
    for r in rows {
        let next = match (&r.resolved_at, &r.next_attempt_at, r.kind) {
            (Some(_), _, _) => r
                .resolution
                .map(|res| res.as_str().to_string())
                .unwrap_or_else(|| "resolved".into()),
            (None, _, DeadLetterKind::Invalid) => "when fixed in CRM".into(),
            (None, Some(t), _) => t.format("%Y-%m-%d %H:%M").to_string(),
            (None, None, _) => "next cycle".into(),
        };
        let code = match r.http_status {
            Some(s) => format!("{} ({s})", r.error_code),
            None => r.error_code.clone(),
        };
        writeln!(
            out,
            "{:>6}  {:<14} {:<8} {:<20} {:<8} {:<28} {:>4}  {:<16}  {}",
            r.id,
            clip(&r.account_id, 14),
            r.entity.as_str(),
            clip(&r.record_id, 20),
            r.kind.as_str(),
            clip(&code, 28),
            r.attempts,
            next,
            clip(&r.error_message, 200)
        )?;
    }
    Ok(())
}
