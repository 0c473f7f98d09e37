//! The accounts query: one row per account, its token and its push setting. A row without
//! an id or a token, or an id on two rows, is refused with the reason.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use secrecy::SecretString;
use sqlx::postgres::PgPool;

use super::columns::{ACCOUNTS_SHAPE, Columns};
use super::{ReadSummary, SourceAccount, SourceError, begin_read_only, crm_query, in_query};
use crate::config::Settings;

/// The statement that reads the accounts query as it is.
pub(super) fn all_accounts(settings: &Settings) -> AccountsStatement {
    crm_query(settings.source.accounts_query.clone())
}

/// A statement whose rows are accounts query rows.
pub(super) type AccountsStatement =
    sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Reads the accounts `statement` returns (a small result) inside the given transaction.
pub(super) async fn read_accounts(
    conn: &mut sqlx::PgConnection,
    statement: AccountsStatement,
    summary: &mut ReadSummary,
) -> Result<Vec<SourceAccount>, SourceError> {
    let mut rows = statement.fetch(conn);
    let mut cols: Option<Columns> = None;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut all = Vec::new();
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(in_query(ACCOUNTS_SHAPE.name))?
    {
        let c = match &cols {
            Some(c) => c,
            None => cols.insert(Columns::of(
                &row,
                &ACCOUNTS_SHAPE,
                &[
                    "account_id",
                    "token",
                    "push_input_output_message_events_for_managers",
                ],
            )?),
        };
        let account_id = c.text(&row, 0)?;
        let token = c.text(&row, 1)?;
        let push = c.boolean(&row, 2)?.unwrap_or(false);
        match (account_id, token) {
            (Some(id), Some(token)) if !id.trim().is_empty() && !token.trim().is_empty() => {
                if let Some(why) = crate::config::token_fault(&token) {
                    summary
                        .bad_accounts
                        .push((id, format!("the account row's token {why}")));
                    continue;
                }
                *seen.entry(id.clone()).or_default() += 1;
                all.push(SourceAccount {
                    account_id: id,
                    token: SecretString::from(token.trim().to_string()),
                    push_input_output_message_events_for_managers: push,
                });
            }
            (Some(id), _) if !id.trim().is_empty() => summary
                .bad_accounts
                .push((id, "the account row has no token".into())),
            _ => summary
                .bad_accounts
                .push(("(no id)".into(), "an account row has no account_id".into())),
        }
    }
    let mut accounts = Vec::with_capacity(all.len());
    for a in all {
        if seen[&a.account_id] > 1 {
            if !summary
                .bad_accounts
                .iter()
                .any(|(id, _)| *id == a.account_id)
            {
                summary.bad_accounts.push((
                    a.account_id.clone(),
                    "the account id appears on more than one row of the accounts query".into(),
                ));
            }
        } else {
            accounts.push(a);
        }
    }
    accounts.sort_by(|a, b| a.account_id.cmp(&b.account_id));
    Ok(accounts)
}

/// The accounts the accounts query returns (for `check`).
pub async fn list_accounts(
    pool: &PgPool,
    settings: &Settings,
) -> Result<(Vec<SourceAccount>, ReadSummary), SourceError> {
    let mut tx = begin_read_only(pool).await?;
    let mut summary = ReadSummary::default();
    let accounts = read_accounts(&mut tx, all_accounts(settings), &mut summary).await?;
    tx.rollback().await?;
    Ok((accounts, summary))
}
