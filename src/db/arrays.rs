//! One-dimensional arrays read straight from PostgreSQL's binary format.
//!
//! The grouped reads (a thousand users as one row of arrays) spend most of their decoding in
//! the driver's per-element work: a value object, a type check and a conversion per element.
//! Here an array is walked once over its bytes: a header, then per element its length (-1 for
//! NULL) and its bytes. A value sent in text format, which these queries never get, is left
//! to the driver.

use sqlx::postgres::{PgRow, PgValueFormat};
use sqlx::{Column, Row, ValueRef};

/// The element types read here, by their PostgreSQL type OIDs.
const BOOL: i32 = 16;
const INT8: i32 = 20;
const TEXT: i32 = 25;

/// The elements of column `i` of `row` (none when it is NULL), read from its bytes by `read`.
/// A value in text format is left to the driver, as `D`, and turned into `T` by `from`.
fn elements<T, D>(
    row: &PgRow,
    i: usize,
    read: impl Fn(&[u8]) -> Result<Vec<Option<T>>, String>,
    from: impl Fn(D) -> T,
) -> Result<Vec<Option<T>>, sqlx::Error>
where
    D: for<'r> sqlx::Decode<'r, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>
        + sqlx::postgres::PgHasArrayType,
{
    let named = |why: String| {
        let column = row.columns().get(i).map_or("?", |c| c.name());
        sqlx::Error::Decode(format!("column {i} ({column}): {why}").into())
    };
    let value = row.try_get_raw(i)?;
    if value.is_null() {
        return Ok(Vec::new());
    }
    if value.format() != PgValueFormat::Binary {
        let values: Option<Vec<Option<D>>> = row.try_get(i).map_err(|e| named(e.to_string()))?;
        return Ok(values
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.map(&from))
            .collect());
    }
    let bytes = value.as_bytes().map_err(sqlx::Error::Decode)?;
    read(bytes).map_err(named)
}

/// Walks an array's binary form: ndim, a flag, the element type (which must be `element`),
/// (length, lower bound) per dimension, then each element as a length and its bytes. Nothing is
/// allocated for more elements than the bytes left can hold.
fn parse<'b, T>(
    mut bytes: &'b [u8],
    element: i32,
    read: impl Fn(&'b [u8]) -> Result<T, String>,
) -> Result<Vec<Option<T>>, String> {
    let mut int = || -> Result<i32, String> {
        let (head, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or("the array ends early")?;
        bytes = rest;
        Ok(i32::from_be_bytes(*head))
    };
    let dims = int()?;
    let (_has_nulls, element_type) = (int()?, int()?);
    if element_type != element {
        return Err(format!(
            "an array of elements of type {} where {} was expected",
            type_name(element_type),
            type_name(element)
        ));
    }
    match dims {
        0 => return Ok(Vec::new()),
        1 => {}
        n => {
            return Err(format!(
                "an array of {n} dimensions, where one was expected"
            ));
        }
    }
    let len = usize::try_from(int()?).map_err(|_| "a negative array length")?;
    let _lower_bound = int()?;
    // Each element takes at least its four-byte length.
    let mut out = Vec::with_capacity(len.min(bytes.len() / 4));
    for _ in 0..len {
        let (head, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or("the array ends early")?;
        let n = i32::from_be_bytes(*head);
        bytes = rest;
        if n < 0 {
            out.push(None);
            continue;
        }
        let n = n as usize;
        if bytes.len() < n {
            return Err("the array ends early".into());
        }
        let (element, rest) = bytes.split_at(n);
        bytes = rest;
        out.push(Some(read(element)?));
    }
    Ok(out)
}

/// The elements of a `text[]`, checked to be UTF-8 in one pass over all of them (a check per
/// element costs more than its copy): joined, checked, then cut back at each element's end,
/// where a character split between two elements fails.
fn texts_of<T: for<'s> From<&'s str>>(bytes: &[u8]) -> Result<Vec<Option<T>>, String> {
    let elements = parse(bytes, TEXT, Ok)?;
    let mut joined = Vec::with_capacity(elements.iter().flatten().map(|e| e.len()).sum());
    for e in elements.iter().flatten() {
        joined.extend_from_slice(e);
    }
    let joined = String::from_utf8(joined).map_err(|_| NOT_UTF8)?;
    let mut at = 0;
    elements
        .iter()
        .map(|e| {
            e.map(|e| {
                let piece = joined.get(at..at + e.len()).ok_or(NOT_UTF8)?;
                at += e.len();
                Ok(T::from(piece))
            })
            .transpose()
        })
        .collect()
}

const NOT_UTF8: &str = "a text element that is not UTF-8";

/// A type OID as PostgreSQL names it, for the types these arrays hold.
fn type_name(oid: i32) -> String {
    match oid {
        BOOL => "boolean".into(),
        INT8 => "bigint".into(),
        TEXT => "text".into(),
        other => format!("OID {other}"),
    }
}

fn boolean(bytes: &[u8]) -> Result<bool, String> {
    match bytes {
        [b] => Ok(*b != 0),
        _ => Err("a boolean element that is not one byte".into()),
    }
}

fn int8(bytes: &[u8]) -> Result<i64, String> {
    <[u8; 8]>::try_from(bytes)
        .map(i64::from_be_bytes)
        .map_err(|_| "a bigint element that is not eight bytes".into())
}

/// A `text[]` column (NULL reads as no elements), each value as a `String` or a `CrmText`.
pub fn texts<T: for<'s> From<&'s str>>(
    row: &PgRow,
    i: usize,
) -> Result<Vec<Option<T>>, sqlx::Error> {
    elements(row, i, texts_of, |s: String| T::from(&s))
}

/// A `bool[]` column (NULL reads as no elements).
pub fn bools(row: &PgRow, i: usize) -> Result<Vec<Option<bool>>, sqlx::Error> {
    elements(row, i, |b| parse(b, BOOL, boolean), |v: bool| v)
}

/// An `int8[]` column (NULL reads as no elements).
pub fn int8s(row: &PgRow, i: usize) -> Result<Vec<Option<i64>>, sqlx::Error> {
    elements(row, i, |b| parse(b, INT8, int8), |v: i64| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An array's binary form as PostgreSQL's array_send writes it.
    fn array(element_type: i32, elements: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [
            1,
            i32::from(elements.iter().any(Option::is_none)),
            element_type,
        ] {
            b.extend(v.to_be_bytes());
        }
        b.extend((elements.len() as i32).to_be_bytes());
        b.extend(1i32.to_be_bytes());
        for e in elements {
            match e {
                None => b.extend((-1i32).to_be_bytes()),
                Some(e) => {
                    b.extend((e.len() as i32).to_be_bytes());
                    b.extend(*e);
                }
            }
        }
        b
    }

    #[test]
    fn elements_and_nulls_are_read_in_order() {
        let b = array(
            25,
            &[Some(b"u1"), None, Some("Jānis".as_bytes()), Some(b"")],
        );
        assert_eq!(
            texts_of::<String>(&b).unwrap(),
            [
                Some("u1".to_string()),
                None,
                Some("Jānis".to_string()),
                Some(String::new())
            ]
        );
        let b = array(20, &[Some(&(-7i64).to_be_bytes()), None]);
        assert_eq!(parse(&b, INT8, int8).unwrap(), [Some(-7), None]);
        let b = array(16, &[Some(&[1]), Some(&[0])]);
        assert_eq!(parse(&b, BOOL, boolean).unwrap(), [Some(true), Some(false)]);
        let empty = [0i32, 0, 25]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<u8>>();
        assert!(texts_of::<String>(&empty).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_array_is_an_error_never_a_panic() {
        let b = array(25, &[Some(b"abc"), Some(b"def")]);
        for cut in 0..b.len() {
            assert!(texts_of::<String>(&b[..cut]).is_err(), "cut at {cut}");
        }
        assert!(texts_of::<String>(&array(25, &[Some(&[0xff, 0xfe])])).is_err());
        // "ā" is two bytes: split between two elements, each alone is not UTF-8.
        assert!(texts_of::<String>(&array(25, &[Some(&[0xc4]), Some(&[0x81])])).is_err());
        assert!(texts_of::<String>(&array(25, &[Some(&[0xc4, 0x81])])).is_ok());
        assert!(parse(&array(20, &[Some(&[1, 2])]), INT8, int8).is_err());
        let two_dims = [2i32, 0, 25]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<u8>>();
        assert!(texts_of::<String>(&two_dims).is_err());
    }

    #[test]
    fn an_array_of_another_element_type_is_refused_by_name() {
        let ints = array(23, &[Some(&7i32.to_be_bytes())]);
        let err = texts_of::<String>(&ints).unwrap_err();
        assert_eq!(
            err,
            "an array of elements of type OID 23 where text was expected"
        );
        let texts = array(25, &[Some(b"t")]);
        assert!(
            parse(&texts, BOOL, boolean)
                .unwrap_err()
                .contains("where boolean")
        );
    }

    #[test]
    fn a_length_in_the_header_beyond_the_bytes_allocates_nothing_for_it() {
        let mut b = [1i32, 0, 25]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<u8>>();
        b.extend(i32::MAX.to_be_bytes());
        b.extend(1i32.to_be_bytes());
        assert_eq!(texts_of::<String>(&b).unwrap_err(), "the array ends early");
    }
}
