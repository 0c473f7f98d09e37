//! `check`: everything an operator wants to know before the first sync, one line each.

use futures::StreamExt;
use tokio::sync::watch;
use wazzup_api::{Account, RequestStats};

use super::warn_insecure;
use crate::config::Settings;
use crate::source::{self, ACCOUNTS_SHAPE, ROLES_SHAPE, USERS_SHAPE};
use crate::sync::Engine;

/// `check`: settings, both databases, the queries' columns and types, the role values, the
/// LISTEN channel, and each token with one cheap GET. One line per check; a database that
/// cannot be reached is said once and the checks that need it are skipped. Ok(true) when
/// nothing failed.
pub async fn check(settings: Settings) -> anyhow::Result<bool> {
    warn_insecure(&settings);
    let mut out = Lines { ok: true };
    out.say(Verdict::Ok, "configuration".into());
    let (_tx, rx) = watch::channel(false);
    let engine = Engine::new(settings, rx)?;
    let crm_ok = out.reachable(&engine.source_target, "CRM").await;
    if out.reachable(&engine.state_target, "state").await {
        check_history(&engine, &mut out).await;
    }
    if crm_ok {
        check_crm(&engine, &mut out).await;
    } else {
        println!(
            "skip the queries, the role values and the tokens: the CRM database cannot be reached"
        );
    }
    check_tokens(&engine, crm_ok, &mut out).await;
    Ok(out.ok)
}

/// The lines printed, and whether any failed.
struct Lines {
    ok: bool,
}

impl Lines {
    fn say(&mut self, verdict: Verdict, what: String) {
        self.ok &= verdict != Verdict::Fail;
        println!("{} {what}", verdict.label());
    }

    async fn reachable(&mut self, target: &crate::db::Target, name: &str) -> bool {
        match target.probe().await {
            Ok(()) => {
                self.say(Verdict::Ok, format!("{name} database reachable ({target})"));
                true
            }
            Err(e) => {
                self.say(Verdict::Fail, e.to_string());
                false
            }
        }
    }
}

/// The three queries' columns and types, the role values, and LISTEN.
async fn check_crm(engine: &Engine, out: &mut Lines) {
    let settings = &engine.settings;
    let multi = settings.single_token().is_none();
    let mut queries = vec![
        (&settings.source.users_query, &USERS_SHAPE),
        (&settings.source.roles_query, &ROLES_SHAPE),
    ];
    if multi {
        queries.push((&settings.source.accounts_query, &ACCOUNTS_SHAPE));
    }
    for key in &settings.source.stripped {
        out.say(
            Verdict::Ok,
            format!("WAZZUP_SYNC__{key} ended in `;`, which is stripped: the query is wrapped in the daemon's own"),
        );
    }
    for (q, shape) in queries {
        match source::check_query(&engine.source, q, shape, multi).await {
            Ok(()) => out.say(Verdict::Ok, format!("{} query columns", shape.name)),
            Err(e) => out.say(Verdict::Fail, e.to_string()),
        }
    }
    match source::role_values(&engine.source, settings).await {
        Ok(values) => {
            let lines = role_value_lines(&values, &settings.role_map());
            let refused = lines.iter().filter(|(_, refused)| *refused).count();
            let verdict = if refused > 0 {
                Verdict::Warn
            } else {
                Verdict::Ok
            };
            out.say(
                verdict,
                format!(
                    "role values in the user roles query: {} distinct, {refused} refused",
                    values.len()
                ),
            );
            for (line, _) in lines {
                println!("       {line}");
            }
        }
        Err(e) => out.say(Verdict::Fail, e.to_string()),
    }
    let channel = &settings.sync.listen_channel;
    if !channel.is_empty() {
        match super::listen::check_listen(engine).await {
            Ok(()) => out.say(
                Verdict::Ok,
                format!("LISTEN on {channel} receives notifications"),
            ),
            Err(why) => out.say(Verdict::Fail, why),
        }
    }
}

/// The history's retention and the size of its tables, once the state schema has them.
async fn check_history(engine: &Engine, out: &mut Lines) {
    let table = format!("{}.changes", engine.settings.state.schema);
    let found: Result<Option<String>, sqlx::Error> =
        sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(table)
            .fetch_one(&engine.state)
            .await;
    match found {
        Ok(Some(_)) => match super::history::describe(&engine.settings, &engine.state).await {
            Ok(line) => out.say(Verdict::Ok, line),
            Err(e) => out.say(Verdict::Warn, format!("history: {e}")),
        },
        Ok(None) => {
            let keep = engine.settings.history.retention_days;
            out.say(
                Verdict::Ok,
                format!("history kept {keep} days (0: for ever); its tables come with the first sync or `migrate`"),
            );
        }
        Err(e) => out.say(Verdict::Warn, format!("history: {e}")),
    }
}

/// Every account's token, with one `GET /v2/users?offset=0&limit=1` each.
async fn check_tokens(engine: &Engine, crm_ok: bool, out: &mut Lines) {
    let settings = &engine.settings;
    let accounts = match settings.single_token() {
        Some(t) => vec![(settings.wazzup.single_account_id.clone(), t)],
        None if !crm_ok => vec![],
        None => match source::list_accounts(&engine.source, settings).await {
            Ok((accounts, summary)) => {
                for (id, why) in summary.bad_accounts {
                    out.say(
                        Verdict::Fail,
                        format!("account {id}: {why}; a cycle skips this account"),
                    );
                }
                accounts
                    .into_iter()
                    .map(|a| (a.account_id, a.token))
                    .collect()
            }
            Err(e) => {
                out.say(Verdict::Fail, e.to_string());
                vec![]
            }
        },
    };
    // Tokens are checked `sync.concurrency` at a time (each token has its own rate limit), and
    // said in the accounts' order.
    let answers = futures::stream::iter(accounts)
        .map(|(id, token)| async move {
            let stats = RequestStats::default();
            let acct = Account {
                account_id: &id,
                token: &token,
                stats: &stats,
            };
            let answer = engine.client.get_users_page(&acct, 0, 1).await.map(drop);
            (id, answer)
        })
        .buffered(settings.sync.concurrency.max(1));
    futures::pin_mut!(answers);
    while let Some((id, answer)) = answers.next().await {
        match answer {
            Ok(()) => out.say(Verdict::Ok, format!("account {id}: token accepted")),
            Err(e) => out.say(Verdict::Fail, format!("account {id}: {e}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One line per distinct role value: how many rows carry it and what it becomes (or why it is
/// refused); true when refused.
fn role_value_lines(
    values: &[(Option<String>, i64)],
    map: &std::collections::BTreeMap<String, crate::domain::Role>,
) -> Vec<(String, bool)> {
    values
        .iter()
        .map(|(value, rows)| {
            let shown = match value {
                Some(v) => format!("{:?}", crate::domain::clip(v)),
                None => "NULL".to_string(),
            };
            let raw = value.as_deref().unwrap_or("");
            let (outcome, refused) = match crate::domain::read_role(raw, map) {
                Ok(role) if map.contains_key(&raw.trim().to_lowercase()) => {
                    (format!("-> {} (source.role_map)", role.as_str()), false)
                }
                Ok(role) => (format!("-> {}", role.as_str()), false),
                Err(r) => (format!("refused: {}: {}", r.code, r.message), true),
            };
            (format!("{shown:<24} {rows:>8} rows  {outcome}"), refused)
        })
        .collect()
}
