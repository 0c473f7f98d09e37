//! Reading the three queries' columns: which exist, and each value as text or boolean
//! (integer, uuid and char(n) columns are read as text). The accounts query is read one row
//! at a time; users and roles one account at a time, as one row of arrays ([`grouped_sql`]).

use futures::TryStreamExt;
use sqlx::postgres::PgRow;
use sqlx::{Column, Row, TypeInfo};

use super::{SourceError, in_query};
use crate::db::arrays::{bools, int8s, texts};
use crate::domain::{SourceRole, SourceUser};

/// The columns each query must or may return.
pub struct QueryShape {
    pub name: &'static str,
    pub required: &'static [&'static str],
    pub optional: &'static [&'static str],
}

pub const USERS_SHAPE: QueryShape = QueryShape {
    name: "users",
    required: &["id", "name"],
    optional: &["account_id", "phone", "hide_phone"],
};
pub const ROLES_SHAPE: QueryShape = QueryShape {
    name: "user roles",
    required: &["user_id", "channel_id", "role"],
    optional: &["account_id", "allow_get_new_clients"],
};
pub const ACCOUNTS_SHAPE: QueryShape = QueryShape {
    name: "accounts",
    required: &["account_id", "token"],
    optional: &["push_input_output_message_events_for_managers"],
};

pub(super) fn column_index(row: &PgRow, name: &str) -> Option<usize> {
    row.columns()
        .iter()
        .position(|c| c.name().eq_ignore_ascii_case(name))
}

/// How one column's values are read, decided once per result set from its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    /// char(n): pads with spaces that mean nothing (and that `::text` drops).
    PaddedText,
    Int2,
    Int4,
    Int8,
    Uuid,
    Bool,
}

impl Kind {
    /// The kind of column `i`, when its type is one the daemon reads as `expected`.
    fn of(
        row: &PgRow,
        query: &'static str,
        i: usize,
        expected: &'static str,
    ) -> Result<Kind, SourceError> {
        let ty = row.columns()[i].type_info().name();
        let kind = if expected == "boolean" {
            (ty == "BOOL").then_some(Kind::Bool)
        } else {
            match ty.to_ascii_uppercase().as_str() {
                "TEXT" | "VARCHAR" | "NAME" | "CITEXT" | "UNKNOWN" => Some(Kind::Text),
                "BPCHAR" | "CHAR" => Some(Kind::PaddedText),
                "INT2" => Some(Kind::Int2),
                "INT4" => Some(Kind::Int4),
                "INT8" => Some(Kind::Int8),
                "UUID" => Some(Kind::Uuid),
                _ => None,
            }
        };
        kind.ok_or_else(|| SourceError::WrongType {
            query,
            column: row.columns()[i].name().to_string(),
            found: ty.to_string(),
            expected,
        })
    }
}

/// Reads a value of a column whose kind was checked against this result set's types.
fn read_text(row: &PgRow, i: usize, kind: Kind) -> Result<Option<String>, sqlx::Error> {
    Ok(match kind {
        Kind::Text => row
            .try_get_unchecked::<Option<&str>, _>(i)?
            .map(str::to_string),
        Kind::PaddedText => row
            .try_get_unchecked::<Option<&str>, _>(i)?
            .map(|v| v.trim_end_matches(' ').to_string()),
        Kind::Int2 => row
            .try_get_unchecked::<Option<i16>, _>(i)?
            .map(|v| v.to_string()),
        Kind::Int4 => row
            .try_get_unchecked::<Option<i32>, _>(i)?
            .map(|v| v.to_string()),
        Kind::Int8 => row
            .try_get_unchecked::<Option<i64>, _>(i)?
            .map(|v| v.to_string()),
        Kind::Uuid => row
            .try_get_unchecked::<Option<uuid::Uuid>, _>(i)?
            .map(|v| v.to_string()),
        Kind::Bool => None,
    })
}

/// Reads a text column; integer and uuid columns are turned into text.
pub(super) fn text(
    row: &PgRow,
    query: &'static str,
    idx: Option<usize>,
) -> Result<Option<String>, SourceError> {
    let Some(i) = idx else { return Ok(None) };
    let kind = Kind::of(row, query, i, "text")?;
    Ok(read_text(row, i, kind)?)
}

pub(super) fn boolean(
    row: &PgRow,
    query: &'static str,
    idx: Option<usize>,
) -> Result<Option<bool>, SourceError> {
    let Some(i) = idx else { return Ok(None) };
    Kind::of(row, query, i, "boolean")?;
    Ok(row.try_get_unchecked::<Option<bool>, _>(i)?)
}

/// Column positions of one query, found from its first row, each with the kind its values
/// are read as. Every name but the last is read as text; the last is a boolean.
#[derive(Debug, Clone)]
pub(super) struct Columns(pub(super) Vec<Option<usize>>, Vec<Option<Kind>>);

impl Columns {
    pub(super) fn of(
        row: &PgRow,
        shape: &QueryShape,
        names: &[&'static str],
    ) -> Result<Self, SourceError> {
        for c in shape.required {
            if column_index(row, c).is_none() {
                return Err(SourceError::MissingColumn {
                    query: shape.name,
                    column: c,
                });
            }
        }
        let idx: Vec<Option<usize>> = names.iter().map(|n| column_index(row, n)).collect();
        let last = names.len().saturating_sub(1);
        let kinds = idx
            .iter()
            .enumerate()
            .map(|(n, i)| {
                let expected = if n == last { "boolean" } else { "text" };
                i.map(|i| Kind::of(row, shape.name, i, expected))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        Ok(Columns(idx, kinds))
    }

    /// How column `n` (of the names) is read, when the query has it.
    pub(super) fn kind(&self, n: usize) -> Option<Kind> {
        self.1[n]
    }

    /// Column `n` (of the names) of a row of this result set, as text.
    pub(super) fn text(&self, row: &PgRow, n: usize) -> Result<Option<String>, SourceError> {
        match (self.0[n], self.1[n]) {
            (Some(i), Some(kind)) => Ok(read_text(row, i, kind)?),
            _ => Ok(None),
        }
    }

    /// Column `n` (of the names) of a row of this result set, as a boolean.
    pub(super) fn boolean(&self, row: &PgRow, n: usize) -> Result<Option<bool>, SourceError> {
        match self.0[n] {
            Some(i) => Ok(row.try_get_unchecked::<Option<bool>, _>(i)?),
            None => Ok(None),
        }
    }
}

/// The column the reader adds to the users query: PostgreSQL's hash of the whole row.
const ROW_HASH_COLUMN: &str = "wazzup_sync_row_hash";

/// How a query is read grouped by account: its shape, the columns asked for (account id
/// first, a boolean last), whether each row's hash is added, and how a grouped row decodes.
pub(super) struct Grouping<G: 'static> {
    pub(super) shape: &'static QueryShape,
    pub(super) names: &'static [&'static str],
    pub(super) hashed: bool,
    pub(super) decode: fn(&PgRow) -> Result<Group<G>, sqlx::Error>,
}

pub(super) const USERS_GROUPED: Grouping<Vec<SourceUser>> = Grouping {
    shape: &USERS_SHAPE,
    names: &["account_id", "id", "name", "phone", "hide_phone"],
    hashed: true,
    decode: decode_users,
};
pub(super) const ROLES_GROUPED: Grouping<Vec<SourceRole>> = Grouping {
    shape: &ROLES_SHAPE,
    names: &[
        "account_id",
        "user_id",
        "channel_id",
        "role",
        "allow_get_new_clients",
    ],
    hashed: false,
    decode: decode_roles,
};

/// An identifier quoted for SQL.
pub(super) fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The statement that reads a query one account at a time: PostgreSQL groups the rows by
/// account and sends each account as one row holding one array per column (each value as
/// text, the last column as a boolean), so that a thousand rows cost one row to receive and
/// decode. `cols` are the query's columns as `probe` found them; a users query (`hash`) also
/// gets each row's hash, computed as the fingerprints compute it. In single-account mode
/// (`multi` false) every row is aggregated into one row. Binds `$1`: the ids of the accounts
/// not to read.
pub(super) fn grouped_sql(query: &str, probed: &Probed, hash: bool, multi: bool) -> String {
    let (cols, names) = (&probed.cols, &probed.spelled);
    let last = cols.0.len() - 1;
    let mut select = Vec::with_capacity(cols.0.len() + 1);
    let account = cols.0[0].map(|i| format!("q.{}", quoted(&names[i])));
    select.push(match (&account, multi) {
        (Some(a), true) => format!("{a}::text COLLATE \"C\""),
        _ => "NULL::text".to_string(),
    });
    for (n, idx) in cols.0.iter().enumerate().skip(1) {
        select.push(match (idx, n == last) {
            (Some(i), false) => format!("array_agg(q.{}::text)", quoted(&names[*i])),
            (Some(i), true) => format!("array_agg(q.{})", quoted(&names[*i])),
            (None, false) => "NULL::text[]".to_string(),
            (None, true) => "NULL::bool[]".to_string(),
        });
    }
    if hash {
        select.push(format!(
            "array_agg({}) AS {ROW_HASH_COLUMN}",
            probed.row_hash()
        ));
    }
    let select = select.join(", ");
    match account.filter(|_| multi) {
        Some(a) => format!(
            "SELECT {select} FROM ({query}) AS q \
             WHERE {a} IS NULL OR NOT ({a}::text = ANY($1::text[])) \
             GROUP BY 1 ORDER BY 1"
        ),
        None => format!("SELECT {select} FROM ({query}) AS q"),
    }
}

/// The condition that keeps the rows of some accounts: the query's account column compared in
/// its own type, so that an index on it serves (an integer or uuid column is not cast to text).
/// Binds `$1`: the ids as text, as [`ids_for`] gives them.
pub(super) fn account_filter(column: &str, kind: Option<Kind>) -> String {
    let col = format!("q.{}", quoted(column));
    match kind {
        Some(Kind::Int2 | Kind::Int4 | Kind::Int8) => format!("{col} = ANY($1::text[]::int8[])"),
        Some(Kind::Uuid) => format!("{col} = ANY($1::text[]::uuid[])"),
        _ => format!("{col}::text = ANY($1::text[])"),
    }
}

/// The condition that keeps the rows of the account `id` (an SQL text expression): the
/// query's account column compared in its own type, as in [`account_filter`].
fn account_match(column: &str, kind: Option<Kind>, id: &str) -> String {
    let col = format!("q.{}", quoted(column));
    match kind {
        Some(Kind::Int2 | Kind::Int4 | Kind::Int8) => format!("{col} = {id}::int8"),
        Some(Kind::Uuid) => format!("{col} = {id}::uuid"),
        _ => format!("{col}::text = {id}"),
    }
}

/// The ids a column of this kind can hold, spelled as PostgreSQL spells its values as text:
/// an id an integer or uuid column cannot hold matches none of its rows (and would fail the cast).
pub(super) fn ids_for(ids: &[String], kind: Option<Kind>) -> Vec<String> {
    let canonical = |id: &String| match kind {
        Some(Kind::Int2 | Kind::Int4 | Kind::Int8) => {
            id.parse::<i64>().is_ok_and(|n| n.to_string() == *id)
        }
        Some(Kind::Uuid) => uuid::Uuid::parse_str(id).is_ok_and(|u| u.to_string() == *id),
        _ => true,
    };
    ids.iter().filter(|id| canonical(id)).cloned().collect()
}

/// A query's rows of one named account `a.id` (a subquery named `q`): by the account column in
/// its own type (an index on it serves), or every row in single-account mode (`multi` false).
fn rows_of(query: &str, probed: &Probed, multi: bool) -> String {
    let matched = if multi {
        account_match(probed.account_column(), probed.cols.kind(0), "a.id")
    } else {
        "true".to_string()
    };
    format!("(SELECT * FROM ({query}) AS q WHERE {matched} OFFSET 0) AS q")
}

/// One array per column asked for (each as text, the last as a boolean), NULL for a column the
/// query lacks.
fn column_arrays(probed: &Probed) -> Vec<String> {
    let cols = &probed.cols;
    let last = cols.0.len() - 1;
    cols.0
        .iter()
        .enumerate()
        .skip(1)
        .map(|(n, idx)| {
            let col = idx.map(|i| format!("q.{}", quoted(&probed.spelled[i])));
            match (col, n == last) {
                (Some(c), false) => format!("array_agg({c}::text)"),
                (Some(c), true) => format!("array_agg({c})"),
                (None, false) => "NULL::text[]".to_string(),
                (None, true) => "NULL::bool[]".to_string(),
            }
        })
        .collect()
}

/// The statement that reads the named accounts of `$1` (their ids as [`ids_for`] gives them,
/// in byte order), each on its own and giving one row even without rows: the account, its
/// users as [`grouped_sql`] reads them with their hashes (the same columns, so
/// [`USERS_GROUPED`]'s decoder reads them), then its role rows' count and the sum of their
/// hashes (the role fingerprint, as the scheduled cycle's fingerprints compute it). The role
/// rows themselves are read only for the accounts whose role fingerprint moved
/// ([`named_roles_sql`]). In single-account mode (`multi` false) `$1` holds the one account,
/// and every row is its.
pub(super) fn named_sql(
    (users_query, users): (&str, &Probed),
    (roles_query, roles): (&str, &Probed),
    multi: bool,
) -> String {
    let mut user_cols = column_arrays(users);
    user_cols.push(format!("array_agg({})", users.row_hash()));
    format!(
        "SELECT a.id, u.*, r.n, r.s FROM unnest($1::text[]) AS a(id) \
         CROSS JOIN LATERAL (SELECT {} FROM {}) AS u \
         CROSS JOIN LATERAL (SELECT count(*) AS n, COALESCE(sum({}), 0)::text AS s FROM {}) AS r \
         ORDER BY a.id COLLATE \"C\"",
        user_cols.join(", "),
        rows_of(users_query, users, multi),
        roles.row_hash(),
        rows_of(roles_query, roles, multi),
    )
}

/// The role rows of the named accounts of `$1`, read as [`named_sql`] reads users (the columns
/// [`ROLES_GROUPED`]'s decoder reads).
pub(super) fn named_roles_sql(query: &str, probed: &Probed, multi: bool) -> String {
    format!(
        "SELECT a.id, x.* FROM unnest($1::text[]) AS a(id) \
         CROSS JOIN LATERAL (SELECT {} FROM {}) AS x ORDER BY a.id COLLATE \"C\"",
        column_arrays(probed).join(", "),
        rows_of(query, probed, multi),
    )
}

/// A query's columns as [`probe`] found them: positions and kinds, and the names as the query
/// spells them.
#[derive(Debug, Clone)]
pub(crate) struct Probed {
    pub(super) cols: Columns,
    pub(super) spelled: Vec<String>,
}

impl Probed {
    /// The account column as the query spells it.
    pub(super) fn account_column(&self) -> &str {
        self.cols.0[0]
            .map(|i| self.spelled[i].as_str())
            .unwrap_or("account_id")
    }

    /// PostgreSQL's hash of a row as the daemon reads it (`q` the query's row): its account
    /// and every column read, each as text, hashed apart (a seed per column, a constant for
    /// NULL) and combined. A column the daemon does not read changes nothing; making the row's
    /// whole text would cost PostgreSQL twice as much.
    pub(super) fn row_hash(&self) -> String {
        let parts: Vec<String> = self
            .cols
            .0
            .iter()
            .enumerate()
            .filter_map(|(n, idx)| {
                idx.map(|i| {
                    format!(
                        "coalesce(hashtextextended(q.{}::text, {n}), {n})",
                        quoted(&self.spelled[i])
                    )
                })
            })
            .collect();
        if parts.is_empty() {
            "0::int8".to_string()
        } else {
            format!("({})", parts.join(" # "))
        }
    }
}

/// Checks a query's columns and their types without running it (`LIMIT 0`): the required
/// ones, `account_id` when rows are grouped by account, and the types of all of them.
pub(super) async fn probe(
    conn: &mut sqlx::PgConnection,
    query: &str,
    shape: &'static QueryShape,
    names: &[&'static str],
    needs_account: bool,
) -> Result<Probed, SourceError> {
    let row = super::crm_query(format!(
        "SELECT q.* FROM (SELECT 1) AS one LEFT JOIN LATERAL (SELECT * FROM ({query}) AS q LIMIT 0) AS q ON true"
    ))
    .fetch_one(conn)
    .await
    .map_err(in_query(shape.name))?;
    let cols = Columns::of(&row, shape, names)?;
    if needs_account && cols.0[0].is_none() {
        return Err(SourceError::MissingColumn {
            query: shape.name,
            column: "account_id",
        });
    }
    let spelled = row.columns().iter().map(|c| c.name().to_string()).collect();
    Ok(Probed { cols, spelled })
}

/// One account's users from a grouped row (see [`grouped_sql`]).
fn decode_users(row: &PgRow) -> Result<Group<Vec<SourceUser>>, sqlx::Error> {
    let account: Option<String> = row.try_get_unchecked(0)?;
    let (mut names, mut phones) = (texts(row, 2)?.into_iter(), texts(row, 3)?.into_iter());
    let mut hide = bools(row, 4)?.into_iter();
    let hashes = int8s(row, 5)?.into_iter();
    let users = texts(row, 1)?
        .into_iter()
        .zip(hashes)
        .map(|(id, row_hash)| SourceUser {
            id,
            name: names.next().flatten(),
            phone: phones.next().flatten(),
            hide_phone: hide.next().flatten(),
            row_hash,
        })
        .collect();
    Ok((account, users))
}

/// One account's role rows from a grouped row (see [`grouped_sql`]).
fn decode_roles(row: &PgRow) -> Result<Group<Vec<SourceRole>>, sqlx::Error> {
    let account: Option<String> = row.try_get_unchecked(0)?;
    let (mut channels, mut roles) = (texts(row, 2)?.into_iter(), texts(row, 3)?.into_iter());
    let mut allow = bools(row, 4)?.into_iter();
    let rows = texts(row, 1)?
        .into_iter()
        .map(|user_id| SourceRole {
            user_id,
            channel_id: channels.next().flatten(),
            role: roles.next().flatten(),
            allow_get_new_clients: allow.next().flatten(),
        })
        .collect();
    Ok((account, rows))
}

/// What a read of named accounts ([`named_sql`]) learns of one account: its users, and its
/// role rows' count and hash sum.
#[derive(Debug, Default)]
pub(crate) struct Named {
    pub(crate) users: Vec<SourceUser>,
    pub(crate) roles: (i64, String),
}

/// One account from a row of [`named_sql`].
pub(super) fn decode_named(row: &PgRow) -> Result<Group<Named>, sqlx::Error> {
    let (account, users) = decode_users(row)?;
    let roles = (row.try_get(6)?, row.try_get(7)?);
    Ok((account, Named { users, roles }))
}

/// One account's rows: its id (None for rows without one) and the rows.
pub(super) type Group<G> = (Option<String>, G);

/// What a reader yields per account, and how the groups of one account add up.
pub(super) trait Rows: Default {
    fn append(&mut self, other: Self);
}

impl<T> Rows for Vec<T> {
    fn append(&mut self, mut other: Self) {
        Vec::append(self, &mut other);
    }
}

impl Rows for Named {
    /// An account comes in one group.
    fn append(&mut self, other: Self) {
        *self = other;
    }
}

/// A grouped query's accounts, one at a time, with one account of look-ahead.
pub(super) struct GroupReader<'c, G> {
    rows: futures::stream::BoxStream<'c, Result<PgRow, sqlx::Error>>,
    query: &'static str,
    decode: fn(&PgRow) -> Result<Group<G>, sqlx::Error>,
    pub(super) head: Option<Group<G>>,
}

impl<'c, G: Rows> GroupReader<'c, G> {
    pub(super) fn new(
        rows: futures::stream::BoxStream<'c, Result<PgRow, sqlx::Error>>,
        query: &'static str,
        decode: fn(&PgRow) -> Result<Group<G>, sqlx::Error>,
    ) -> Self {
        Self {
            rows,
            query,
            decode,
            head: None,
        }
    }

    /// Takes every remaining row.
    pub(super) async fn take_all(&mut self) -> Result<G, SourceError> {
        let mut out = G::default();
        while let Some((_, rows)) = self.head.take() {
            out.append(rows);
            self.advance().await?;
        }
        Ok(out)
    }

    pub(super) async fn advance(&mut self) -> Result<(), SourceError> {
        let next = self.rows.try_next().await.map_err(in_query(self.query))?;
        self.head = next
            .map(|row| (self.decode)(&row))
            .transpose()
            .map_err(in_query(self.query))?;
        Ok(())
    }

    /// The account of the next group: Some(None) for rows without one, None at the end.
    pub(super) fn next_account(&self) -> Option<Option<&str>> {
        self.head.as_ref().map(|(account, _)| account.as_deref())
    }

    /// Takes the rows of `account` (groups arrive ordered by account, each once).
    pub(super) async fn take(&mut self, account: Option<&str>) -> Result<G, SourceError> {
        if self.next_account() != Some(account) {
            return Ok(G::default());
        }
        let (_, rows) = self.head.take().expect("head");
        self.advance().await?;
        Ok(rows)
    }
}
