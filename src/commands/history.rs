//! `history` and `access`: the record of what Wazzup acknowledged, and who holds which role now.
//! Both only read the state database.

use std::io::Write;
use std::process::ExitCode;

use chrono::{DateTime, NaiveDate, Utc};

use crate::config::Settings;
use crate::state::{self, history};

/// What `history` was asked for, as typed.
#[derive(Debug, Clone, Default)]
pub struct HistoryArgs {
    pub user_id: Option<String>,
    pub account: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub actions: Option<String>,
    pub widens_access: bool,
    pub cycle: Option<i64>,
    pub limit: i64,
    pub format: String,
}

/// What `access` was asked for.
#[derive(Debug, Clone, Default)]
pub struct AccessArgs {
    pub account: Option<String>,
    pub roles: Option<String>,
    pub channel: Option<String>,
    pub format: String,
}

/// A point in time given as an age (`7d`, `12h`, `30m`, `1h30m`) or a date (`2026-12-01`, midnight UTC)
/// or an RFC 3339 time; None when it is none of these.
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let t = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(t) {
        return Some(at.with_timezone(&Utc));
    }
    if let Ok(day) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Some(day.and_hms_opt(0, 0, 0)?.and_utc());
    }
    let age = chrono::Duration::from_std(crate::config::parse_duration(t)?).ok()?;
    now.checked_sub_signed(age)
}

/// The filter `history` reads with, or the one line that says what is wrong.
pub fn filter(args: &HistoryArgs, now: DateTime<Utc>) -> Result<history::HistoryFilter, String> {
    let time = |flag: &str, v: &Option<String>| -> Result<Option<DateTime<Utc>>, String> {
        v.as_deref()
            .map(|t| {
                parse_time(t, now).ok_or_else(|| {
                    format!("{flag} {t:?} is neither an age such as 7d, 12h or 30m nor a date such as 2026-12-01")
                })
            })
            .transpose()
    };
    let mut actions = Vec::new();
    for a in args.actions.iter().flat_map(|a| a.split(',')) {
        let a = a.trim();
        if a.is_empty() {
            continue;
        }
        if !history::ACTIONS.contains(&a) {
            return Err(format!(
                "--action {a:?} is not an action; the actions are {}",
                history::ACTIONS.join(", ")
            ));
        }
        actions.push(a.to_string());
    }
    if args.limit < 1 {
        return Err(format!("--limit {} must be at least 1", args.limit));
    }
    Ok(history::HistoryFilter {
        user_id: args.user_id.clone(),
        account_id: args.account.clone(),
        since: time("--since", &args.since)?,
        until: time("--until", &args.until)?,
        actions,
        widens_access: args.widens_access,
        cycle: args.cycle,
        limit: args.limit,
    })
}

/// `history`: exit 2 with one line for a bad filter; the rows, newest first, otherwise.
pub async fn run_history(settings: Settings, args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let f = match filter(&args, Utc::now()) {
        Ok(f) => f,
        Err(why) => {
            eprintln!("wazzup-sync: {why}");
            return Ok(ExitCode::from(2));
        }
    };
    let Some(pool) = history_pool(&settings).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    let rows = history::history(&pool, &f).await?;
    let mut out = std::io::stdout().lock();
    match args.format.as_str() {
        "json" => write_json_lines(&rows, &mut out)?,
        "csv" => write_history_csv(&rows, &mut out)?,
        _ => print_history(&rows, &mut out)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `access`: who holds which role on which channel now.
pub async fn run_access(settings: Settings, args: AccessArgs) -> anyhow::Result<ExitCode> {
    let roles: Vec<String> = args
        .roles
        .iter()
        .flat_map(|r| r.split(','))
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect();
    if let Some(bad) = roles
        .iter()
        .find(|r| crate::domain::Role::from_api(r).is_none())
    {
        eprintln!(
            "wazzup-sync: --role {bad:?} is not a role; the roles are seller, manager, auditor"
        );
        return Ok(ExitCode::from(2));
    }
    let Some(pool) = history_pool(&settings).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    let mut rows = history::access(
        &pool,
        args.account.as_deref(),
        &roles,
        args.channel.as_deref(),
    )
    .await?;
    rows.sort_by(|a, b| {
        (&a.account_id, &a.channel_id, &a.role)
            .cmp(&(&b.account_id, &b.channel_id, &b.role))
            .then_with(|| crate::domain::compare_ids(&a.user_id, &b.user_id))
    });
    let mut out = std::io::stdout().lock();
    match args.format.as_str() {
        "json" => write_json_lines(&rows, &mut out)?,
        "csv" => write_access_csv(&rows, &mut out)?,
        _ => print_access(&rows, &mut out)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The state pool, when the state schema holds the history (a line says why not otherwise).
async fn history_pool(settings: &Settings) -> anyhow::Result<Option<sqlx::PgPool>> {
    let Some(pool) = super::dead_letters::state_pool(settings).await? else {
        return Ok(None);
    };
    let table = format!("{}.changes", settings.state.schema);
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(table)
        .fetch_one(&pool)
        .await?;
    if found.is_none() {
        println!("No history yet: the state schema predates it; `wazzup-sync migrate` adds it.");
        return Ok(None);
    }
    Ok(Some(pool))
}

/// One JSON object per line, for log pipelines.
fn write_json_lines<T: serde::Serialize>(rows: &[T], out: &mut impl Write) -> std::io::Result<()> {
    for r in rows {
        serde_json::to_writer(&mut *out, r)?;
        writeln!(out)?;
    }
    Ok(())
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// CSV rows with a header row, lines ending in CRLF, as a spreadsheet opens them.
fn write_csv(header: &[&str], rows: Vec<Vec<String>>, out: &mut impl Write) -> std::io::Result<()> {
    write!(out, "{}\r\n", header.join(","))?;
    for row in rows {
        let fields: Vec<String> = row.iter().map(|f| csv_field(f)).collect();
        write!(out, "{}\r\n", fields.join(","))?;
    }
    Ok(())
}

fn json_text(v: &Option<serde_json::Value>) -> String {
    v.as_ref().map(|v| v.to_string()).unwrap_or_default()
}

fn write_history_csv(rows: &[history::ChangeRow], out: &mut impl Write) -> std::io::Result<()> {
    let header = [
        "acknowledged_at",
        "account_id",
        "user_id",
        "channel_id",
        "action",
        "before",
        "after",
        "widens_access",
        "cause",
        "cycle_id",
        "instance",
        "actor",
        "note",
        "id",
        "approval_id",
    ];
    let rows = rows
        .iter()
        .map(|r| {
            vec![
                r.acknowledged_at.to_rfc3339(),
                r.account_id.clone(),
                r.user_id.clone().unwrap_or_default(),
                r.channel_id.clone().unwrap_or_default(),
                r.action.clone(),
                json_text(&r.before),
                json_text(&r.after),
                r.widens_access.to_string(),
                r.cause.clone(),
                r.cycle_id.map(|c| c.to_string()).unwrap_or_default(),
                r.instance.clone().unwrap_or_default(),
                r.actor.clone().unwrap_or_default(),
                r.note.clone().unwrap_or_default(),
                r.id.to_string(),
                r.approval_id.map(|a| a.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    write_csv(&header, rows, out)
}

fn write_access_csv(rows: &[history::AccessRow], out: &mut impl Write) -> std::io::Result<()> {
    let header = [
        "account_id",
        "user_id",
        "name",
        "channel_id",
        "role",
        "receives_new_clients",
        "phones_hidden",
        "since",
    ];
    let rows = rows
        .iter()
        .map(|r| {
            vec![
                r.account_id.clone(),
                r.user_id.clone(),
                r.name.clone().unwrap_or_default(),
                r.channel_id.clone(),
                r.role.clone(),
                r.receives_new_clients.to_string(),
                r.phones_hidden.to_string(),
                r.since.map(|t| t.to_rfc3339()).unwrap_or_default(),
            ]
        })
        .collect();
    write_csv(&header, rows, out)
}

/// A change's values in a line: `before -> after`, without JSON's braces (a role as
/// `manager + new clients`).
pub fn values(before: &Option<serde_json::Value>, after: &Option<serde_json::Value>) -> String {
    let show = |v: &Option<serde_json::Value>| match v {
        None => String::new(),
        Some(serde_json::Value::Object(m)) if m.contains_key("role") => format!(
            "{}{}",
            m["role"].as_str().unwrap_or_default(),
            if m.get("allow_get_new_clients") == Some(&serde_json::Value::Bool(true)) {
                " + new clients"
            } else {
                ""
            }
        ),
        Some(serde_json::Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k} {s:?}"),
                other => format!("{k} {other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => other.to_string(),
    };
    match (before, after) {
        (None, None) => String::new(),
        (None, a) => show(a),
        (b, None) => format!("was {}", show(b)),
        (b, a) => format!("{} -> {}", show(b), show(a)),
    }
}

fn print_history(rows: &[history::ChangeRow], out: &mut impl Write) -> std::io::Result<()> {
    if rows.is_empty() {
        return writeln!(out, "No history rows.");
    }
    writeln!(
        out,
        "{:<20} {:<10} {:<12} {:<14} {:<20} {:<13} {:<6} VALUES",
        "WHEN (UTC)", "ACCOUNT", "USER", "CHANNEL", "ACTION", "CAUSE", "CYCLE"
    )?;
    for r in rows {
        let widens = if r.widens_access {
            "  [WIDENS ACCESS]"
        } else {
            ""
        };
        writeln!(
            out,
            "{:<20} {:<10} {:<12} {:<14} {:<20} {:<13} {:<6} {}{widens}",
            r.acknowledged_at.format("%Y-%m-%d %H:%M:%S"),
            super::dead_letters::clip(&r.account_id, 10),
            super::dead_letters::clip(r.user_id.as_deref().unwrap_or("(account)"), 12),
            super::dead_letters::clip(r.channel_id.as_deref().unwrap_or("-"), 14),
            r.action,
            r.cause,
            r.cycle_id
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            values(&r.before, &r.after),
        )?;
    }
    Ok(())
}

fn print_access(rows: &[history::AccessRow], out: &mut impl Write) -> std::io::Result<()> {
    if rows.is_empty() {
        return writeln!(out, "Nobody holds such a role.");
    }
    writeln!(
        out,
        "{:<10} {:<12} {:<20} {:<14} {:<8} {:<11} {:<13} SINCE (UTC)",
        "ACCOUNT", "USER", "NAME", "CHANNEL", "ROLE", "NEW CLIENTS", "PHONES HIDDEN"
    )?;
    for r in rows {
        let yes = |b: bool| if b { "yes" } else { "no" };
        writeln!(
            out,
            "{:<10} {:<12} {:<20} {:<14} {:<8} {:<11} {:<13} {}",
            super::dead_letters::clip(&r.account_id, 10),
            super::dead_letters::clip(&r.user_id, 12),
            super::dead_letters::clip(r.name.as_deref().unwrap_or(""), 20),
            super::dead_letters::clip(&r.channel_id, 14),
            r.role,
            yes(r.receives_new_clients),
            yes(r.phones_hidden),
            r.since
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "before history began".into()),
        )?;
    }
    Ok(())
}

/// The history's retention, and both tables' rows and size (for `check`).
pub async fn describe(
    settings: &Settings,
    pool: &sqlx::PgPool,
) -> Result<String, state::StateError> {
    let [(changes, changes_bytes), (cycles, cycles_bytes)] = history::sizes(pool).await?;
    let keep = match settings.history.retention_days {
        0 => "kept for ever".to_string(),
        d => format!("kept {d} days"),
    };
    Ok(format!(
        "history {keep}: changes {changes} rows ({:.1} MiB), cycles {cycles} rows ({:.1} MiB)",
        changes_bytes as f64 / 1048576.0,
        cycles_bytes as f64 / 1048576.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_dates_and_times_are_read_and_anything_else_is_refused() {
        let now = DateTime::parse_from_rfc3339("2026-12-07T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |t: &str| parse_time(t, now).map(|d| d.to_rfc3339());
        assert_eq!(at("7d").as_deref(), Some("2026-11-30T12:00:00+00:00"));
        assert_eq!(at("12h").as_deref(), Some("2026-12-07T00:00:00+00:00"));
        assert_eq!(
            at("2026-12-01").as_deref(),
            Some("2026-12-01T00:00:00+00:00")
        );
        assert_eq!(
            at("2026-12-01T10:00:00+02:00").as_deref(),
            Some("2026-12-01T08:00:00+00:00")
        );
        for bad in [
            "",
            "7",
            "d7",
            "7 days",
            "2026-13-01",
            "yesterday",
            "9999999999999d",
        ] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_bad_flag_is_one_line_naming_it() {
        let args = |f: fn(&mut HistoryArgs)| {
            let mut a = HistoryArgs {
                limit: 10,
                ..Default::default()
            };
            f(&mut a);
            filter(&a, Utc::now())
        };
        let err = args(|a| a.since = Some("last week".into())).unwrap_err();
        assert!(err.starts_with("--since \"last week\""), "{err}");
        let err = args(|a| a.actions = Some("role_granted,role_given".into())).unwrap_err();
        assert!(err.starts_with("--action \"role_given\""), "{err}");
        assert!(!err.contains('\n'));
        let ok = args(|a| a.actions = Some("role_granted, role_changed".into())).unwrap();
        assert_eq!(ok.actions, ["role_granted", "role_changed"]);
    }

    #[test]
    fn csv_fields_with_commas_quotes_and_line_breaks_are_quoted() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }
}
