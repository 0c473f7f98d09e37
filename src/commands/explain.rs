//! `explain USER_ID`: everything about one user on one screen: the CRM rows as read, what
//! they became and why, what the mirror and the dead letters say, what the next cycle would
//! send, and with `--remote` what Wazzup holds now. Read-only: it sends no write request and
//! writes nothing.

use std::collections::HashSet;
use std::io::Write;

use serde::Serialize;
use tokio::sync::watch;
use wazzup_api::{Account, RequestStats, UserPayload};

use crate::config::Settings;
use crate::domain::{
    Entity, RoleEntry, SourceRole, SourceUser, mask_phone, mask_raw_phone, normalize_account,
    read_role,
};
use crate::plan::{Change, PlanRecord};
use crate::source::{self, AccountRows, SkipUnchanged, SourceAccount};
use crate::state::{self, DeadLetterRow, MirrorEntry, Selection};
use crate::sync::{AccountReport, CycleOptions, Engine};

/// What `explain` is asked.
#[derive(Debug, Clone)]
pub struct Request {
    pub user_id: String,
    pub account: Option<String>,
    pub remote: bool,
}

/// Everything about one user.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub account_id: String,
    pub user_id: String,
    /// The users-query rows with this id (phones masked).
    pub crm_rows: Vec<serde_json::Value>,
    /// What is sent to Wazzup, when the user passed every check (phone masked).
    pub sent_as: Option<UserPayload>,
    pub hide_phone_numbers: bool,
    /// Why each field is what it is.
    pub why: Vec<String>,
    /// The user's role rows and what each became.
    pub role_rows: Vec<RoleRow>,
    /// Refusals of the user or of its role rows in this reading.
    pub refused: Vec<Refusal>,
    /// What Wazzup last acknowledged (phone masked).
    pub mirror: Option<MirrorEntry>,
    /// Sent once, answer not recorded (a crash in between).
    pub pending: bool,
    /// The user's role rows in the settings document Wazzup last acknowledged.
    pub settings_last_pushed: Vec<RoleEntry>,
    pub dead_letters: Vec<DeadLetterRow>,
    /// What the next cycle would send for this user; empty: nothing.
    pub next_cycle: Vec<PlanRecord>,
    /// The user's last history rows, newest first (at most ten).
    pub history: Vec<state::history::ChangeRow>,
    /// With `--remote`: what Wazzup holds now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<Remote>,
}

/// One role row as read and what it became.
#[derive(Debug, Serialize)]
pub struct RoleRow {
    pub channel_id: Option<String>,
    pub crm_role: Option<String>,
    pub allow_get_new_clients: Option<bool>,
    /// `seller`, `manager` or `auditor`, or `refused`.
    pub became: String,
    /// The rule that decided: the exact API value, the role map's entry, or the refusal.
    pub because: String,
}

/// A refusal, as its dead letter says it.
#[derive(Debug, Serialize)]
pub struct Refusal {
    pub entity: Entity,
    pub record_id: String,
    pub code: &'static str,
    pub reason: String,
}

/// What Wazzup holds for the user now, and where it differs from what was last pushed.
#[derive(Debug, Serialize)]
pub struct Remote {
    pub user: Option<UserPayload>,
    pub roles: Vec<RoleEntry>,
    pub hide_phone_numbers: bool,
    /// Empty when Wazzup holds what was last pushed.
    pub differs: Vec<String>,
}

/// Runs `explain` and prints the explanation as a table or JSON.
pub async fn run(settings: Settings, req: Request, json: bool) -> anyhow::Result<()> {
    let (_tx, rx) = watch::channel(false);
    let engine = Engine::new(settings, rx)?;
    engine.probe().await?;
    let account = find_account(&engine, &req).await?;
    let e = explain(&engine, account, &req).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print(&e, &mut std::io::stdout())?;
    }
    Ok(())
}

/// The user's account: the one asked for, or the only one whose rows (or mirror) name it.
async fn find_account(engine: &Engine, req: &Request) -> anyhow::Result<SourceAccount> {
    let settings = &engine.settings;
    let mut ids = match (&req.account, settings.single_token()) {
        (_, Some(_)) => vec![settings.wazzup.single_account_id.clone()],
        (Some(a), None) => vec![a.clone()],
        (None, None) => source::accounts_of_user(&engine.source, settings, &req.user_id).await?,
    };
    if ids.is_empty() && state::is_migrated(&engine.state, &settings.state.schema).await? {
        ids = state::accounts_holding(&engine.state, &req.user_id).await?;
    }
    let id = match ids.as_slice() {
        [one] => one.clone(),
        [] => anyhow::bail!(
            "No account's rows name the user {:?}, and no mirror holds it",
            req.user_id
        ),
        many => anyhow::bail!(
            "The user {:?} is in accounts {}: pick one with --account",
            req.user_id,
            many.join(", ")
        ),
    };
    match settings.single_token() {
        Some(token) => Ok(SourceAccount {
            account_id: id,
            token,
            push_input_output_message_events_for_managers: settings
                .wazzup
                .push_input_output_message_events_for_managers,
        }),
        None => source::list_accounts(&engine.source, settings)
            .await?
            .0
            .into_iter()
            .find(|a| a.account_id == id)
            .ok_or_else(|| {
                anyhow::anyhow!("The accounts query has no usable row for account {id:?}")
            }),
    }
}

/// Reads the account as a cycle would (one snapshot, no account skipped), plans it without
/// sending or writing, and gathers what the state and, with `--remote`, Wazzup say.
async fn explain(
    engine: &Engine,
    account: SourceAccount,
    req: &Request,
) -> anyhow::Result<Explanation> {
    let rows = read_account(engine, &account).await?;
    let norm = normalize_account(
        &rows.users,
        &rows.roles,
        engine.normalize(),
        &mut Default::default(),
    );
    let migrated = state::is_migrated(&engine.state, &engine.settings.state.schema).await?;
    let mut report = AccountReport::new(&account.account_id);
    let opts = CycleOptions {
        dry_run: true,
        detail: true,
        ..Default::default()
    };
    engine
        .plan_account(&account, &norm, migrated, &opts, &mut report)
        .await?;
    let user = &req.user_id;
    let mut e = Explanation {
        account_id: account.account_id.clone(),
        user_id: user.clone(),
        crm_rows: rows
            .users
            .iter()
            .filter(|u| u.id.as_deref() == Some(user.as_str()))
            .map(masked_row)
            .collect(),
        sent_as: None,
        hide_phone_numbers: false,
        why: Vec::new(),
        role_rows: Vec::new(),
        refused: refusals(&norm, user),
        mirror: None,
        pending: false,
        settings_last_pushed: Vec::new(),
        dead_letters: Vec::new(),
        // What would be sent; refusals and unreadable phones are said above, not sent.
        next_cycle: report
            .records
            .into_iter()
            .filter(|r| r.user_id.as_deref() == Some(user.as_str()))
            .filter(|r| {
                !matches!(
                    r.change,
                    Change::Refused { .. } | Change::UnreadablePhone { .. }
                )
            })
            .collect(),
        history: Vec::new(),
        remote: None,
    };
    describe_user(engine, &rows.users, &norm, &mut e);
    e.role_rows = role_rows(engine, &rows.roles, &e.refused, user);
    if migrated {
        add_state(engine, &mut e).await?;
    }
    if req.remote {
        e.remote = Some(remote(engine, &account, &e).await?);
    }
    Ok(e)
}

/// The account's rows from one snapshot.
async fn read_account(engine: &Engine, account: &SourceAccount) -> anyhow::Result<AccountRows> {
    let only = HashSet::from([account.account_id.clone()]);
    let single = engine
        .settings
        .single_token()
        .is_some()
        .then(|| account.clone());
    let (mut rx, reader) = source::stream_snapshot(
        engine.source.clone(),
        engine.settings.clone(),
        single,
        Some(only),
        SkipUnchanged::default(),
        1,
        Default::default(),
    );
    let rows = rx.recv().await;
    drop(rx);
    reader.await??;
    rows.ok_or_else(|| anyhow::anyhow!("The account {:?} has no rows", account.account_id))
}

fn masked_row(u: &SourceUser) -> serde_json::Value {
    serde_json::json!({
        "id": u.id,
        "name": u.name,
        "phone": u.phone.as_deref().map(mask_raw_phone),
        "hide_phone": u.hide_phone,
    })
}

fn refusals(norm: &crate::domain::Normalized, user: &str) -> Vec<Refusal> {
    let role_prefix = format!("{user}/");
    norm.rejected
        .iter()
        .filter(|r| r.record_id == user || r.record_id.starts_with(&role_prefix))
        .map(|r| Refusal {
            entity: r.entity,
            record_id: r.record_id.clone(),
            code: r.code,
            reason: r.message.clone(),
        })
        .collect()
}

/// What the user is sent as, and why each field is what it is.
fn describe_user(
    engine: &Engine,
    rows: &[SourceUser],
    norm: &crate::domain::Normalized,
    e: &mut Explanation,
) {
    let Some(valid) = norm.users.iter().find(|u| u.payload.id == e.user_id) else {
        if e.crm_rows.is_empty() {
            e.why.push("The users query does not return this user: it is deleted from Wazzup when the mirror holds it".into());
        } else {
            e.why
                .push("The user is refused: it is not sent (see refused)".into());
        }
        return;
    };
    let raw = rows
        .iter()
        .find(|u| u.id.as_deref() == Some(e.user_id.as_str()));
    let raw_name = raw.and_then(|u| u.name.clone()).unwrap_or_default();
    if raw_name != valid.payload.name {
        e.why.push(format!(
            "name: the CRM's {raw_name:?} with surrounding spaces trimmed"
        ));
    }
    let region = engine.settings.source.default_phone_region.clone();
    let region = if region.is_empty() {
        "none".into()
    } else {
        region
    };
    let raw_phone = raw.and_then(|u| u.phone.as_deref()).map(mask_raw_phone);
    e.why.push(
        match (&valid.payload.phone, &raw_phone, &valid.unreadable_phone) {
            (Some(p), Some(r), _) => format!(
                "phone: {r:?} read with default region {region} as {}; {}",
                mask_phone(p),
                if valid.phone_valid {
                    "a known number range"
                } else {
                    "outside libphonenumber's known ranges, sent as written"
                }
            ),
            (None, _, Some(r)) => format!(
                "phone: {r:?} could not be read (default region {region}); sent without a phone"
            ),
            _ => "phone: none in the CRM".into(),
        },
    );
    e.hide_phone_numbers = valid.hide_phone;
    let mut sent = valid.payload.clone();
    sent.phone = sent.phone.as_deref().map(|p| mask_phone(p).into());
    e.sent_as = Some(sent);
}

/// Each of the user's role rows and what it became, with the rule that decided. A refusal of
/// the row's own value is the row's; one about its (user, channel) record (a conflict, a refused
/// user, a bad channel) is every such row's.
fn role_rows(
    engine: &Engine,
    rows: &[SourceRole],
    refused: &[Refusal],
    user: &str,
) -> Vec<RoleRow> {
    let map = &engine.normalize().role_map;
    rows.iter()
        .filter(|r| r.user_id.as_deref() == Some(user))
        .map(|r| {
            let record = format!("{user}/{}", r.channel_id.as_deref().unwrap_or("").trim());
            let raw = r.role.as_deref().unwrap_or("").trim();
            let of_record = refused.iter().find(|f| {
                f.record_id == record && !matches!(f.code, "unknown_role" | "ambiguous_role")
            });
            let (became, because) = match (read_role(raw, map), of_record) {
                (Err(refusal), _) => (
                    "refused".to_string(),
                    format!("{}: {}", refusal.code, refusal.message),
                ),
                (Ok(_), Some(f)) => ("refused".to_string(), format!("{}: {}", f.code, f.reason)),
                (Ok(role), None) if map.contains_key(&raw.to_lowercase()) => (
                    role.as_str().to_string(),
                    format!("source.role_map entry {:?}", raw.to_lowercase()),
                ),
                (Ok(role), None) => (role.as_str().to_string(), "the exact API value".into()),
            };
            RoleRow {
                channel_id: r.channel_id.as_deref().map(str::to_string),
                crm_role: r.role.as_deref().map(str::to_string),
                allow_get_new_clients: r.allow_get_new_clients,
                became,
                because,
            }
        })
        .collect()
}

/// The mirror, the pending log, the settings last pushed and the dead letters.
async fn add_state(engine: &Engine, e: &mut Explanation) -> anyhow::Result<()> {
    let (mirror, pending) = state::mirror_entry(&engine.state, &e.account_id, &e.user_id).await?;
    e.mirror = mirror.map(|mut m| {
        m.phone = m.phone.as_deref().map(mask_phone);
        m.phone_source = None;
        m
    });
    e.pending = pending;
    let last = state::load_account(&engine.state, &e.account_id, true).await?;
    if let Some(doc) = last.settings_doc {
        e.settings_last_pushed = doc
            .user_roles
            .into_iter()
            .filter(|r| r.user_id == e.user_id)
            .collect();
    }
    let selection = Selection {
        account: Some(e.account_id.clone()),
        id: None,
    };
    let role_prefix = format!("{}/", e.user_id);
    e.dead_letters = state::list_dead_letters(&engine.state, &selection, true)
        .await?
        .into_iter()
        .filter(|d| d.record_id == e.user_id || d.record_id.starts_with(&role_prefix))
        .collect();
    let filter = state::history::HistoryFilter {
        user_id: Some(e.user_id.clone()),
        account_id: Some(e.account_id.clone()),
        limit: 10,
        ..Default::default()
    };
    // A state schema not migrated this far has no history yet.
    e.history = state::history::history(&engine.state, &filter)
        .await
        .unwrap_or_default();
    Ok(())
}

/// What Wazzup holds now (two GETs), compared with what was last pushed.
async fn remote(
    engine: &Engine,
    account: &SourceAccount,
    e: &Explanation,
) -> anyhow::Result<Remote> {
    let stats = RequestStats::default();
    let api = Account {
        account_id: &account.account_id,
        token: &account.token,
        stats: &stats,
    };
    let user = engine.client.get_user(&api, &e.user_id).await?;
    let settings = engine.client.get_settings(&api).await?;
    let mut roles: Vec<RoleEntry> = settings
        .user_roles
        .into_iter()
        .filter(|r| r.user_id == e.user_id)
        .collect();
    roles.sort();
    let mut differs = Vec::new();
    match (&user, &e.mirror) {
        (None, Some(_)) => differs.push("the user is missing in Wazzup".to_string()),
        (Some(_), None) => differs.push("Wazzup holds a user the mirror does not know".to_string()),
        (Some(u), Some(m)) => {
            if m.name.as_deref().is_some_and(|n| n != u.name) {
                differs.push("name".into());
            }
            if m.phone != u.phone.as_deref().map(mask_phone) {
                differs.push("phone".into());
            }
        }
        (None, None) => {}
    }
    let mut pushed = e.settings_last_pushed.clone();
    pushed.sort();
    if pushed != roles {
        differs.push("roles".into());
    }
    Ok(Remote {
        user: user.map(|mut u| {
            u.phone = u.phone.as_deref().map(|p| mask_phone(p).into());
            u
        }),
        roles,
        hide_phone_numbers: settings
            .hide_phone_numbers_for_user_ids
            .contains(&e.user_id),
        differs,
    })
}

/// The explanation as a screen an operator reads top to bottom.
fn print(e: &Explanation, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "User {:?} in account {:?}", e.user_id, e.account_id)?;
    writeln!(out, "\nCRM rows (users query)")?;
    if e.crm_rows.is_empty() {
        writeln!(out, "  none")?;
    }
    for r in &e.crm_rows {
        writeln!(out, "  {r}")?;
    }
    writeln!(out, "\nSent to Wazzup as")?;
    match &e.sent_as {
        Some(u) => writeln!(
            out,
            "  id {:?}, name {:?}, phone {}, contacts' phones hidden: {}",
            u.id,
            u.name,
            u.phone.as_deref().unwrap_or("(none)"),
            if e.hide_phone_numbers { "yes" } else { "no" }
        )?,
        None => writeln!(out, "  nothing")?,
    }
    for w in &e.why {
        writeln!(out, "  - {w}")?;
    }
    writeln!(out, "\nRole rows (user roles query)")?;
    if e.role_rows.is_empty() {
        writeln!(out, "  none")?;
    }
    for r in &e.role_rows {
        writeln!(
            out,
            "  channel {}: {:?} -> {} ({}), new clients: {}",
            r.channel_id.as_deref().unwrap_or("(none)"),
            r.crm_role.as_deref().unwrap_or(""),
            r.became,
            r.because,
            if r.allow_get_new_clients == Some(true) {
                "yes"
            } else {
                "no"
            }
        )?;
    }
    for f in &e.refused {
        writeln!(
            out,
            "  refused {} {}: {}: {}",
            f.entity.as_str(),
            f.record_id,
            f.code,
            f.reason
        )?;
    }
    print_state(e, out)?;
    print_next(e, out)?;
    print_history(e, out)?;
    if let Some(r) = &e.remote {
        print_remote(r, out)?;
    }
    Ok(())
}

fn print_state(e: &Explanation, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "\nMirror (what Wazzup last acknowledged)")?;
    match &e.mirror {
        Some(m) => writeln!(
            out,
            "  hash {}, acknowledged {}, name {}, phone {}",
            m.hash,
            m.synced_at.format("%Y-%m-%d %H:%M:%S UTC"),
            m.name
                .as_deref()
                .map(|n| format!("{n:?}"))
                .unwrap_or_else(|| "(not kept)".into()),
            m.phone.as_deref().unwrap_or("(none)")
        )?,
        None => writeln!(
            out,
            "  not synced{}",
            if e.pending {
                " (sent once, answer not recorded)"
            } else {
                ""
            }
        )?,
    }
    writeln!(out, "\nSettings last pushed for this user")?;
    if e.settings_last_pushed.is_empty() {
        writeln!(out, "  no role rows")?;
    }
    for r in &e.settings_last_pushed {
        writeln!(
            out,
            "  channel {}: {}{}",
            r.channel_id,
            r.role.as_str(),
            if r.allow_get_new_clients {
                " + new clients"
            } else {
                ""
            }
        )?;
    }
    writeln!(out, "\nDead letters")?;
    if e.dead_letters.is_empty() {
        writeln!(out, "  none")?;
    }
    for d in &e.dead_letters {
        let status = d.resolution.map(|r| r.as_str()).unwrap_or("open");
        writeln!(
            out,
            "  #{} {status} {} {} {} ({}): {}",
            d.id,
            d.entity.as_str(),
            d.record_id,
            d.error_code,
            d.kind.as_str(),
            d.error_message
        )?;
    }
    Ok(())
}

fn print_history(e: &Explanation, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "\nHistory (newest first, at most 10)")?;
    if e.history.is_empty() {
        return writeln!(out, "  nothing recorded for this user");
    }
    for h in &e.history {
        let widens = if h.widens_access {
            "  [WIDENS ACCESS]"
        } else {
            ""
        };
        writeln!(
            out,
            "  {} {} {}{} ({}, cycle {}){widens}",
            h.acknowledged_at.format("%Y-%m-%d %H:%M:%S"),
            h.action,
            h.channel_id
                .as_deref()
                .map(|c| format!("{c}: "))
                .unwrap_or_default(),
            super::history::values(&h.before, &h.after),
            h.cause,
            h.cycle_id
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
        )?;
    }
    Ok(())
}

fn print_next(e: &Explanation, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "\nNext cycle")?;
    if e.next_cycle.is_empty() {
        return writeln!(out, "  nothing to send for this user");
    }
    for r in &e.next_cycle {
        let what = match &r.change {
            Change::UserCreated { .. } => "create the user".to_string(),
            Change::UserUpdated { changes } => format!(
                "update {}",
                changes.keys().copied().collect::<Vec<_>>().join(", ")
            ),
            Change::UserDeleted => "delete the user".into(),
            Change::DeleteHeld => "delete, held back by the mass-deletion guard".into(),
            Change::Leaving { delete_at } => format!(
                "leaving: left the CRM, no access; deleted from Wazzup at {} UTC",
                delete_at.format("%Y-%m-%d %H:%M:%S")
            ),
            Change::LeaveHeld => "leaving, held back by the mass-deletion guard".into(),
            Change::RoleGranted { channel_id, access } => {
                format!("grant role {} on {channel_id}", access.role.as_str())
            }
            Change::RoleChanged {
                channel_id,
                from,
                to,
            } => {
                format!(
                    "change role on {channel_id}: {} -> {}",
                    from.role.as_str(),
                    to.role.as_str()
                )
            }
            Change::NewClientsOn { channel_id, .. } => {
                format!("new clients on {channel_id}: on")
            }
            Change::NewClientsOff { channel_id, .. } => {
                format!("new clients on {channel_id}: off")
            }
            Change::RoleRevoked { channel_id, .. } => format!("revoke the role on {channel_id}"),
            Change::PhoneHidden => "contacts' phones hidden".into(),
            Change::PhoneShown => "contacts' phones shown".into(),
            Change::PushForManagersOn | Change::PushForManagersOff => {
                "the account's push setting".into()
            }
            Change::UnreadablePhone { .. } => "send without a phone (unreadable)".into(),
            Change::Refused { code, .. } => format!("nothing: refused ({code})"),
        };
        let mark = if r.widens_access {
            "  [WIDENS ACCESS]"
        } else {
            ""
        };
        writeln!(out, "  {what}{mark}")?;
    }
    Ok(())
}

fn print_remote(r: &Remote, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "\nWazzup now")?;
    match &r.user {
        Some(u) => writeln!(
            out,
            "  user: name {:?}, phone {}",
            u.name,
            u.phone.as_deref().unwrap_or("(none)")
        )?,
        None => writeln!(out, "  user: not in Wazzup")?,
    }
    for role in &r.roles {
        writeln!(out, "  channel {}: {}", role.channel_id, role.role.as_str())?;
    }
    if r.differs.is_empty() {
        writeln!(out, "  as last pushed")
    } else {
        writeln!(
            out,
            "  DIFFERS from what was last pushed: {}; the next reconcile (wazzup-sync reconcile, or sync.reconcile_schedule) pushes the CRM's version again",
            r.differs.join(", ")
        )
    }
}
