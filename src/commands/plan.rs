//! `plan`: what a cycle would send, account by account, and with `--detail` record by
//! record. Sends nothing, writes nothing.

use std::io::Write;

use tokio::sync::watch;

use crate::config::Settings;
use crate::plan::{Access, Change, PlanRecord};
use crate::sync::{CycleOptions, CycleReport, Engine};

/// `plan`: what a cycle would do; sends nothing, writes nothing.
pub async fn plan(settings: Settings, detail: bool) -> anyhow::Result<CycleReport> {
    let (_tx, rx) = watch::channel(false);
    let engine = Engine::new(settings, rx)?;
    engine.probe().await?;
    let opts = CycleOptions {
        dry_run: true,
        detail,
        ..Default::default()
    };
    match engine.run_cycle(&opts).await {
        Ok(report) => Ok(report),
        Err(e) => Err(anyhow::anyhow!(engine.explain(&e).await)),
    }
}

/// Prints a plan as a table.
pub fn print_plan(report: &CycleReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<24} {:>8} {:>8} {:>8} {:>10} {:>9} {:>8}",
        "ACCOUNT", "CREATE", "UPDATE", "DELETE", "SETTINGS", "INVALID", "WAITING"
    )?;
    for a in &report.accounts {
        let delete = match a.deletes_blocked {
            Some((n, _)) => format!("{n} held"),
            None => a.would_delete.to_string(),
        };
        writeln!(
            out,
            "{:<24} {:>8} {:>8} {:>8} {:>10} {:>9} {:>8}",
            a.account_id,
            a.would_create,
            a.would_update,
            delete,
            if a.settings_changed { "change" } else { "same" },
            a.rejected_locally,
            a.waiting
        )?;
    }
    for (id, why) in &report.bad_accounts {
        writeln!(out, "{id:<24} skipped: {why}")?;
    }
    if let Some(records) = &report.records {
        print_records(records, out)?;
    }
    if report.orphan_users + report.orphan_roles > 0 {
        writeln!(
            out,
            "{} user rows and {} role rows belong to no account row and are skipped",
            report.orphan_users, report.orphan_roles
        )?;
    }
    Ok(())
}

/// Prints `plan --detail`'s records, one line each; changes that widen access are marked.
fn print_records(records: &[PlanRecord], out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out)?;
    if records.is_empty() {
        return writeln!(out, "No record would change.");
    }
    writeln!(
        out,
        "{:<16} {:<20} {:<22} DETAIL",
        "ACCOUNT", "USER", "ACTION"
    )?;
    for r in records {
        let detail = describe_change(&r.change);
        let mark = if r.widens_access {
            "  [WIDENS ACCESS]"
        } else {
            ""
        };
        writeln!(
            out,
            "{:<16} {:<20} {:<22} {detail}{mark}",
            crate::domain::clip(&r.account_id),
            crate::domain::clip(r.user_id.as_deref().unwrap_or("(account)")),
            r.change.action()
        )?;
    }
    Ok(())
}

/// The table's detail of one change; its action is `Change::action`, the history's name.
fn describe_change(c: &Change) -> String {
    let access = |a: &Access| {
        format!(
            "{}{}",
            a.role.as_str(),
            if a.allow_get_new_clients {
                " + new clients"
            } else {
                ""
            }
        )
    };
    let value = |v: &Option<String>| match v {
        Some(v) => format!("{v:?}"),
        None => "(none)".to_string(),
    };
    match c {
        Change::UserCreated { name, phone } => match phone {
            Some(p) => format!("name {name:?}, phone {p}"),
            None => format!("name {name:?}, no phone"),
        },
        Change::UserUpdated { changes } => changes
            .iter()
            .map(|(field, ch)| format!("{field}: {} -> {}", value(&ch.from), value(&ch.to)))
            .collect::<Vec<_>>()
            .join(", "),
        Change::UserDeleted => String::new(),
        Change::DeleteHeld => "held back by the mass-deletion guard".into(),
        Change::Leaving { delete_at } => format!(
            "left the CRM: no access; deleted from Wazzup at {} UTC",
            delete_at.format("%Y-%m-%d %H:%M:%S")
        ),
        Change::LeaveHeld => {
            "left the CRM with too many others: held back by the mass-deletion guard".into()
        }
        Change::RoleGranted {
            channel_id,
            access: a,
        }
        | Change::RoleRevoked {
            channel_id,
            access: a,
        } => format!("channel {channel_id}: {}", access(a)),
        Change::RoleChanged {
            channel_id,
            from,
            to,
        }
        | Change::NewClientsOn {
            channel_id,
            from,
            to,
        }
        | Change::NewClientsOff {
            channel_id,
            from,
            to,
        } => format!("channel {channel_id}: {} -> {}", access(from), access(to)),
        Change::PhoneHidden => "contacts' phones hidden".into(),
        Change::PhoneShown => "contacts' phones shown".into(),
        Change::PushForManagersOn => "supervisors: every chat".into(),
        Change::PushForManagersOff => "supervisors: their own chats".into(),
        Change::UnreadablePhone { phone } => {
            format!("{phone:?} is not a phone number; sent without a phone")
        }
        Change::Refused { code, reason, .. } => format!("{code}: {reason}"),
    }
}
