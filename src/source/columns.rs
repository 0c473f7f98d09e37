//! Reading the three queries' columns: which exist, and each value as text or boolean
//! (integer, uuid and char(n) columns are read as text), one row at a time.

use futures::TryStreamExt;
use sqlx::postgres::PgRow;
use sqlx::{Column, Row, TypeInfo};

use super::{SourceError, in_query};
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

    /// Column `n` (of the names) of a row of this result set, as text.
    pub(super) fn text(&self, row: &PgRow, n: usize) -> Result<Option<String>, SourceError> {
        match (self.0[n], self.1[n]) {
            (Some(i), Some(kind)) => Ok(read_text(row, i, kind)?),
            _ => Ok(None),
        }
    }

    /// Column `n` (of the names) of a row of this result set, when it is a bigint.
    pub(super) fn int8(&self, row: &PgRow, n: usize) -> Result<Option<i64>, SourceError> {
        match (self.0[n], self.1[n]) {
            (Some(i), Some(Kind::Int8)) => Ok(row.try_get_unchecked::<Option<i64>, _>(i)?),
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

pub(super) fn decode_user(row: &PgRow, c: &Columns) -> Result<SourceUser, SourceError> {
    Ok(SourceUser {
        account_id: c.text(row, 0)?,
        id: c.text(row, 1)?,
        name: c.text(row, 2)?,
        phone: c.text(row, 3)?,
        row_hash: c.int8(row, 4)?,
        hide_phone: c.boolean(row, 5)?,
    })
}

pub(super) fn decode_role(row: &PgRow, c: &Columns) -> Result<SourceRole, SourceError> {
    Ok(SourceRole {
        account_id: c.text(row, 0)?,
        user_id: c.text(row, 1)?,
        channel_id: c.text(row, 2)?,
        role: c.text(row, 3)?,
        allow_get_new_clients: c.boolean(row, 4)?,
    })
}

/// The column the reader adds to the users query: PostgreSQL's hash of the whole row.
pub(super) const ROW_HASH_COLUMN: &str = "wazzup_sync_row_hash";

pub(super) const USER_COLUMNS: [&str; 6] = [
    "account_id",
    "id",
    "name",
    "phone",
    ROW_HASH_COLUMN,
    "hide_phone",
];
pub(super) const ROLE_COLUMNS: [&str; 5] = [
    "account_id",
    "user_id",
    "channel_id",
    "role",
    "allow_get_new_clients",
];

/// A query's rows, decoded, one at a time, with one row of look-ahead.
pub(super) struct RowReader<'c, T> {
    pub(super) rows: futures::stream::BoxStream<'c, Result<PgRow, sqlx::Error>>,
    pub(super) cols: Option<Columns>,
    pub(super) shape: &'static QueryShape,
    pub(super) names: &'static [&'static str],
    pub(super) needs_account: bool,
    pub(super) decode: fn(&PgRow, &Columns) -> Result<T, SourceError>,
    pub(super) account: fn(&T) -> Option<&str>,
    pub(super) head: Option<T>,
}

impl<'c, T> RowReader<'c, T> {
    pub(super) fn new(
        rows: futures::stream::BoxStream<'c, Result<PgRow, sqlx::Error>>,
        shape: &'static QueryShape,
        names: &'static [&'static str],
        needs_account: bool,
        decode: fn(&PgRow, &Columns) -> Result<T, SourceError>,
        account: fn(&T) -> Option<&str>,
    ) -> Self {
        Self {
            rows,
            cols: None,
            shape,
            names,
            needs_account,
            decode,
            account,
            head: None,
        }
    }

    /// Takes every remaining row.
    pub(super) async fn take_all(&mut self) -> Result<Vec<T>, SourceError> {
        let mut out = Vec::new();
        while let Some(h) = self.head.take() {
            out.push(h);
            self.advance().await?;
        }
        Ok(out)
    }

    pub(super) async fn advance(&mut self) -> Result<(), SourceError> {
        let next = self
            .rows
            .try_next()
            .await
            .map_err(in_query(self.shape.name))?;
        self.head = match next {
            None => None,
            Some(row) => {
                if self.cols.is_none() {
                    let c = Columns::of(&row, self.shape, self.names)?;
                    if self.needs_account && c.0[0].is_none() {
                        return Err(SourceError::MissingColumn {
                            query: self.shape.name,
                            column: "account_id",
                        });
                    }
                    self.cols = Some(c);
                }
                Some((self.decode)(&row, self.cols.as_ref().expect("columns"))?)
            }
        };
        Ok(())
    }

    /// The account of the next row: Some(None) for a row without one, None at the end.
    pub(super) fn next_account(&self) -> Option<Option<&str>> {
        self.head.as_ref().map(|h| (self.account)(h))
    }

    /// Takes every row of `account` (rows arrive ordered by account).
    pub(super) async fn take(&mut self, account: Option<&str>) -> Result<Vec<T>, SourceError> {
        let mut out = Vec::new();
        while let Some(h) = &self.head {
            if (self.account)(h) != account {
                break;
            }
            out.push(self.head.take().expect("head"));
            self.advance().await?;
        }
        Ok(out)
    }
}
