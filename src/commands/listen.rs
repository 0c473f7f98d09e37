//! LISTEN for the CRM's notifications: a session of its own (`source.listen_url`), proved to
//! hear before it is trusted, reopened when lost.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Settings;
use crate::ops::Health;
use crate::source;
use crate::sync::Engine;

/// Prefix of the notifications the daemon sends itself to see that LISTEN works.
const PROBE_PREFIX: &str = "wazzup-sync:probe:";

/// A session for LISTEN: `source.listen_url` (a direct connection), or the CRM URL.
pub(super) fn listen_pool(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    let opts = source::connect_options(settings.listen_url())?;
    Ok(crate::db::pool_options()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(settings.source.connect_timeout_secs))
        .connect_lazy_with(opts))
}

/// The advice for a LISTEN that hears nothing.
fn listen_advice(channel: &str) -> String {
    format!(
        "LISTEN on {channel} receives no notifications: the CRM connection most likely goes through a transaction pooler such as PgBouncer, which cannot carry LISTEN. Set WAZZUP_SYNC__SOURCE__LISTEN_URL to a direct connection to the CRM database; until then changes are picked up by the schedule only"
    )
}

/// Opens a LISTEN session and proves it hears before listening on the real channel: a
/// notification on a random channel of its own, sent through the CRM pool, must arrive within
/// a few seconds. Through a transaction pooler it never does (or lands on another client), and
/// the real channel is never listened on, so no stray registration is left on a pooled server.
async fn open_listener(
    engine: &Engine,
    pool: &sqlx::PgPool,
) -> Result<sqlx::postgres::PgListener, String> {
    let channel = &engine.settings.sync.listen_channel;
    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .map_err(|e| {
            format!(
                "Failed to open the LISTEN session: {}",
                crate::db::describe(&e)
            )
        })?;
    let probe = format!("{PROBE_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let probe_channel = probe.replace([':', '-'], "_");
    listener
        .listen(&probe_channel)
        .await
        .map_err(|e| format!("Failed to LISTEN: {}", crate::db::describe(&e)))?;
    if let Err(why) = notify(engine, &probe_channel, &probe).await {
        return Err(format!(
            "{} (the test notification failed: {why})",
            listen_advice(channel)
        ));
    }
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.payload() == probe => return true,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return false,
            }
        }
    })
    .await;
    if heard != Ok(true) {
        return Err(listen_advice(channel));
    }
    let fail =
        |e: sqlx::Error| format!("Failed to LISTEN on {channel}: {}", crate::db::describe(&e));
    listener.unlisten(&probe_channel).await.map_err(fail)?;
    listener.listen(channel).await.map_err(fail)?;
    if decisions_share_listen(&engine.settings) {
        let decisions = crate::state::approvals::decisions_channel(&engine.settings.state.schema);
        listener.listen(&decisions).await.map_err(fail)?;
    }
    Ok(listener)
}

/// Sends one notification through the CRM pool.
async fn notify(engine: &Engine, channel: &str, payload: &str) -> Result<(), String> {
    let describe = |e: sqlx::Error| crate::db::describe(&e);
    let mut tx = source::begin_read_only(&engine.source)
        .await
        .map_err(describe)?;
    sqlx::query("SELECT pg_notify($1, $2)::text")
        .persistent(false)
        .bind(channel)
        .bind(payload)
        .execute(&mut *tx)
        .await
        .map_err(describe)?;
    tx.commit().await.map_err(describe)
}

pub(super) async fn check_listen(engine: &Engine) -> Result<(), String> {
    let pool = listen_pool(&engine.settings).map_err(|e| e.to_string())?;
    let result = open_listener(engine, &pool).await.map(|_| ());
    pool.close().await;
    result
}

/// Keeps a LISTEN session open and passes every notification's payload (an account id) on.
/// A session that cannot be opened, or that hears nothing (a transaction pooler), is an error
/// said at growing intervals and fails readiness. Each time LISTEN starts hearing (at start-up
/// too, where the first cycle may have read the CRM before LISTEN was up) and each time a lost
/// session is reopened, a cycle for every account follows, since a change committed in between
/// sent a notification nobody heard.
pub(super) async fn listen_forever(
    engine: Engine,
    pool: sqlx::PgPool,
    tx: mpsc::UnboundedSender<String>,
    health: Arc<Health>,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        let mut listener = match open_listener(&engine, &pool).await {
            Ok(l) => l,
            Err(why) => {
                health.listen_failed(Some(why.clone()));
                tracing::error!(error = %why, retry_in_secs = delay.as_secs(), "LISTEN is not working");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(super::run::MAX_RETRY_DELAY);
                continue;
            }
        };
        health.listen_failed(None);
        delay = Duration::from_secs(1);
        if tx.send(String::new()).is_err() {
            return;
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.payload().starts_with(PROBE_PREFIX) => {}
                Ok(Some(n)) => {
                    if tx.send(n.payload().trim().to_string()).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    tracing::warn!(
                        "Lost the LISTEN session; reopening it and syncing every account in case a notification was missed"
                    );
                    if tx.send(String::new()).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::db::describe(&e), "The LISTEN session failed; reopening it");
                    break;
                }
            }
        }
    }
}

/// Whether the state lives in the database LISTEN already has a session on (same host, port
/// and database), so that session hears the approval decisions too and no second one is held.
pub(super) fn decisions_share_listen(settings: &Settings) -> bool {
    use std::str::FromStr;
    let parse = |url: &secrecy::SecretString| {
        sqlx::postgres::PgConnectOptions::from_str(secrecy::ExposeSecret::expose_secret(url)).ok()
    };
    match (parse(settings.listen_url()), parse(settings.state_url())) {
        (Some(l), Some(s)) => {
            !settings.sync.listen_channel.is_empty()
                && l.get_host() == s.get_host()
                && l.get_port() == s.get_port()
                && l.get_database() == s.get_database()
        }
        _ => false,
    }
}

/// Listens on the state database for approval decisions (`wazzup-sync approvals approve`
/// notifies the decided accounts' ids) and passes them on, so that the approved changes go out
/// within a second. A lost session is reopened at growing intervals; meanwhile the schedule
/// picks the decisions up (they make the accounts' next cycle look at them).
pub(super) async fn listen_decisions(engine: Engine, tx: mpsc::UnboundedSender<String>) {
    let channel = crate::state::approvals::decisions_channel(&engine.settings.state.schema);
    let pool = match crate::state::listen_pool(&engine.settings) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %crate::db::describe(&e), "Cannot listen for approval decisions");
            return;
        }
    };
    let mut delay = Duration::from_secs(1);
    loop {
        let opened = async {
            let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = match opened.await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %crate::db::describe(&e), retry_in_secs = delay.as_secs(),
                    "Cannot listen for approval decisions; the schedule picks them up");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(super::run::MAX_RETRY_DELAY);
                continue;
            }
        };
        delay = Duration::from_secs(1);
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    let account = n.payload().trim();
                    if !account.is_empty() && tx.send(account.to_string()).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %crate::db::describe(&e), "The session listening for approval decisions failed; reopening it");
                    break;
                }
            }
        }
    }
}
