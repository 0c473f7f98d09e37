//! The per-account advisory lock: two processes never sync one account at once.

use sqlx::PgConnection;

use super::Result;

/// Takes the per-account advisory lock on this session, if no other process holds it.
pub async fn try_lock_account(
    conn: &mut PgConnection,
    schema: &str,
    account_id: &str,
) -> Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(format!("wazzup-sync:{schema}:{account_id}"))
        .fetch_one(conn)
        .await
        .map_err(Into::into)
}

pub async fn unlock_account(conn: &mut PgConnection, schema: &str, account_id: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(format!("wazzup-sync:{schema}:{account_id}"))
        .execute(conn)
        .await?;
    Ok(())
}
