//! `approvals`: the changes held until a person decides; `list`, `approve`, `reject`.

use std::io::Write;
use std::process::ExitCode;

use crate::config::Settings;
use crate::state::approvals::{self, Approval, Decision};

/// Which approvals a decision is about, who decides, and why.
#[derive(Debug, Clone, Default)]
pub struct DecideArgs {
    pub ids: Vec<String>,
    pub account: Option<String>,
    pub all: bool,
    pub by: Option<String>,
    pub note: Option<String>,
}

/// `approvals list`: the open approvals, oldest first.
pub async fn run_list(
    settings: Settings,
    account: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let Some(pool) = approvals_pool(&settings).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    let rows = approvals::open_approvals(&pool, account.as_deref()).await?;
    let mut out = std::io::stdout().lock();
    if json {
        for r in &rows {
            serde_json::to_writer(&mut out, r)?;
            writeln!(out)?;
        }
    } else {
        print_approvals(&rows, &mut out)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `approvals approve` and `approvals reject`. A missing `--by`, an id that is not a number,
/// unknown or already closed, is exit 2 with one line.
pub async fn run_decide(
    settings: Settings,
    decision: Decision,
    args: DecideArgs,
) -> anyhow::Result<ExitCode> {
    let refuse = |line: String| {
        eprintln!("wazzup-sync: {line}");
        Ok(ExitCode::from(2))
    };
    let Some(by) = args.by.as_deref().map(str::trim).filter(|b| !b.is_empty()) else {
        return refuse("--by NAME is required: the history records who decided".into());
    };
    let mut ids = Vec::new();
    for id in &args.ids {
        match id.trim().parse::<i64>() {
            Ok(n) => ids.push(n),
            Err(_) => return refuse(format!("{id:?} is not an approval id (a number)")),
        }
    }
    let whole_account = args.all && args.account.is_some();
    if ids.is_empty() != whole_account {
        return refuse(
            "name the approvals (ID ...) or an account (--account A --all), not both".into(),
        );
    }
    let Some(pool) = approvals_pool(&settings).await? else {
        return Ok(ExitCode::from(2));
    };
    if whole_account {
        ids = approvals::open_approvals(&pool, args.account.as_deref())
            .await?
            .into_iter()
            .filter(|a| a.status == "waiting")
            .map(|a| a.id)
            .collect();
    } else {
        let found = approvals::approvals_by_id(&pool, &ids).await?;
        if let Some(line) = not_decidable(&ids, &found) {
            return refuse(line);
        }
    }
    let channel = approvals::decisions_channel(&settings.state.schema);
    let decided =
        approvals::decide(&pool, &ids, decision, (by, args.note.as_deref()), &channel).await?;
    let verb = match decision {
        Decision::Approve => "Approved",
        Decision::Reject => "Rejected",
    };
    let list: Vec<String> = decided.iter().map(|a| a.id.to_string()).collect();
    match list.is_empty() {
        true => println!("Nothing was waiting."),
        false => println!("{verb} {} by {by}: {}", list.len(), list.join(", ")),
    }
    Ok(ExitCode::SUCCESS)
}

/// The line that says why these ids cannot be decided: unknown, or already closed.
fn not_decidable(ids: &[i64], found: &[Approval]) -> Option<String> {
    let unknown: Vec<String> = ids
        .iter()
        .filter(|id| !found.iter().any(|a| a.id == **id))
        .map(|id| id.to_string())
        .collect();
    if !unknown.is_empty() {
        let s = if unknown.len() == 1 { "" } else { "s" };
        return Some(format!("no approval{s} {}", unknown.join(", ")));
    }
    found
        .iter()
        .find(|a| !matches!(a.status.as_str(), "waiting" | "approved" | "rejected"))
        .map(|a| format!("approval {} is {}: nothing to decide", a.id, a.status))
}

/// The state pool, when the state schema holds the approvals (a line says why not otherwise).
async fn approvals_pool(settings: &Settings) -> anyhow::Result<Option<sqlx::PgPool>> {
    let Some(pool) = super::dead_letters::state_pool(settings).await? else {
        return Ok(None);
    };
    let table = format!("{}.approvals", settings.state.schema);
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(table)
        .fetch_one(&pool)
        .await?;
    if found.is_none() {
        println!(
            "No approvals yet: the state schema predates them; `wazzup-sync migrate` adds them."
        );
        return Ok(None);
    }
    Ok(Some(pool))
}

fn print_approvals(rows: &[Approval], out: &mut impl Write) -> std::io::Result<()> {
    if rows.is_empty() {
        return writeln!(out, "Nothing waits for a decision.");
    }
    writeln!(
        out,
        "{:<6} {:<10} {:<12} {:<14} {:<14} {:<14} {:<9} {:<20} VALUES",
        "ID", "ACCOUNT", "USER", "CHANNEL", "ACTION", "REASON", "STATUS", "HELD SINCE (UTC)"
    )?;
    for a in rows {
        let clip = super::dead_letters::clip;
        let decided = match (&a.decided_by, a.status.as_str()) {
            (Some(by), "approved" | "rejected") => format!("  ({} by {by})", a.status),
            _ => String::new(),
        };
        writeln!(
            out,
            "{:<6} {:<10} {:<12} {:<14} {:<14} {:<14} {:<9} {:<20} {}{decided}",
            a.id,
            clip(&a.account_id, 10),
            clip(a.user_id.as_deref().unwrap_or("(account)"), 12),
            clip(a.channel_id.as_deref().unwrap_or("-"), 14),
            a.action,
            a.reason,
            a.status,
            a.held_at.format("%Y-%m-%d %H:%M:%S"),
            super::history::values(&a.before, &a.after),
        )?;
    }
    Ok(())
}
