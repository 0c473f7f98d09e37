//! Users: the checks a users-query row must pass before it is sent, and the valid user.

use std::cmp::Ordering;

pub use wazzup_api::UserPayload;

use super::hash::json_hash;
use super::{CrmText, Entity, Rejection, SourceUser};

/// Longest user id Wazzup accepts, in characters.
pub const MAX_ID_CHARS: usize = 64;
/// Longest user name Wazzup accepts, in characters.
pub const MAX_NAME_CHARS: usize = 150;
/// Longest string kept in a dead letter's payload.
const MAX_STORED_CHARS: usize = 256;

/// A user that passed every local check.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidUser {
    pub payload: UserPayload,
    pub hash: String,
    pub hide_phone: bool,
    /// The region and CRM text the phone was read from (the phone cache's key).
    pub phone_source: Option<CrmText>,
    /// Whether libphonenumber knows the phone's range.
    pub phone_valid: bool,
    /// The CRM's phone, masked, when it could not be read and the user is sent without one.
    pub unreadable_phone: Option<String>,
    /// The salted hash of the CRM row this user was made from, when PostgreSQL computed it.
    pub source_hash: Option<i64>,
    /// True when the mirror already remembers that very row (the user was not read again).
    pub row_remembered: bool,
}

/// The hash the mirror keeps for a payload Wazzup acknowledged.
pub fn user_hash(payload: &UserPayload) -> String {
    json_hash(payload)
}

/// Orders ids numerically when both are integers, otherwise as strings.
pub fn compare_ids(a: &str, b: &str) -> Ordering {
    compare_parsed((id_number(a), a), (id_number(b), b))
}

/// An id as the integer [`compare_ids`] orders it by, when it is one.
pub fn id_number(id: &str) -> Option<u128> {
    id.parse().ok()
}

/// [`compare_ids`] for ids whose [`id_number`] was taken once, before sorting.
pub fn compare_parsed((na, a): (Option<u128>, &str), (nb, b): (Option<u128>, &str)) -> Ordering {
    match (na, nb) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        _ => a.cmp(b),
    }
}

/// Cuts long strings so a hostile row cannot bloat the dead-letter table or a log line.
pub fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_STORED_CHARS {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(MAX_STORED_CHARS).collect();
        out.push('…');
        out
    }
}

pub(super) fn clip_opt(s: &Option<CrmText>) -> serde_json::Value {
    match s {
        Some(s) => serde_json::Value::String(clip(s)),
        None => serde_json::Value::Null,
    }
}

pub(super) fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control())
}

/// The row as a dead letter keeps it (strings clipped).
pub(super) fn row_payload(u: &SourceUser) -> serde_json::Value {
    serde_json::json!({
        "id": clip_opt(&u.id),
        "name": clip_opt(&u.name),
        "phone": clip_opt(&u.phone),
        "hide_phone": u.hide_phone,
    })
}

/// The record id of a refused row: its id, or a short hash of the row when it has none.
fn record_id_of(id: &Option<CrmText>, payload: &serde_json::Value) -> String {
    match id {
        Some(id) if !id.is_empty() => clip(id),
        _ => format!(
            "(no id {})",
            &super::content_hash(payload.to_string().as_bytes())[..8]
        ),
    }
}

/// A refusal of a users-query row.
pub(super) fn refuse(u: &SourceUser, code: &'static str, message: String) -> Rejection {
    let payload = row_payload(u);
    Rejection {
        entity: Entity::User,
        record_id: record_id_of(&u.id, &payload),
        code,
        message,
        payload,
    }
}

/// The row's id and trimmed name, or why the row is refused.
pub(super) fn check_user(u: &SourceUser) -> Result<(CrmText, CrmText), (&'static str, String)> {
    let id = check_id(u.id.as_deref())?;
    let name = check_name(u.name.as_deref())?;
    Ok((id.into(), name.into()))
}

fn check_id(id: Option<&str>) -> Result<&str, (&'static str, String)> {
    let Some(id) = id else {
        return Err(("invalid_id", "The user id is NULL".into()));
    };
    let chars = id.chars().count();
    if id.trim().is_empty() {
        return Err(("invalid_id", "The user id is empty".into()));
    }
    if chars > MAX_ID_CHARS {
        return Err((
            "invalid_id",
            format!("The user id has {chars} characters; Wazzup allows at most {MAX_ID_CHARS}"),
        ));
    }
    if has_control(id) {
        return Err((
            "invalid_id",
            "The user id contains control characters".into(),
        ));
    }
    Ok(id)
}

fn check_name(name: Option<&str>) -> Result<&str, (&'static str, String)> {
    let Some(name) = name.map(str::trim) else {
        return Err(("invalid_name", "The user name is NULL".into()));
    };
    let chars = name.chars().count();
    if chars == 0 {
        return Err(("invalid_name", "The user name is empty".into()));
    }
    if chars > MAX_NAME_CHARS {
        return Err((
            "invalid_name",
            format!(
                "The user name has {chars} characters after trimming; Wazzup allows at most {MAX_NAME_CHARS}"
            ),
        ));
    }
    if has_control(name) {
        return Err((
            "invalid_name",
            "The user name contains control characters (line breaks, tabs, NUL...)".into(),
        ));
    }
    Ok(name)
}

/// What Wazzup last acknowledged for a user: the mirror's name and phone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LastPushed {
    /// None for users synced before names were kept.
    pub name: Option<String>,
    pub phone: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crm_value_is_sent_as_it_was_read_without_a_copy() {
        // The domain's text and the API's are one type: this moves, it does not convert.
        let read = CrmText::from("Jānis 😀 with a name longer than 24 bytes");
        let sent: wazzup_api::Text = read;
        assert_eq!(sent, "Jānis 😀 with a name longer than 24 bytes");
        assert!(sent.is_heap_allocated());
        assert!(
            !CrmText::from("short id").is_heap_allocated(),
            "short values stay inline"
        );
    }

    #[test]
    fn the_hash_changes_with_the_payload_and_only_with_it() {
        let a = UserPayload {
            id: "1".into(),
            name: "A".into(),
            phone: None,
        };
        let mut b = a.clone();
        assert_eq!(user_hash(&a), user_hash(&b));
        b.phone = Some("37126123456".into());
        assert_ne!(user_hash(&a), user_hash(&b));
    }

    #[test]
    fn numeric_ids_compare_as_numbers() {
        assert_eq!(compare_ids("9", "10"), Ordering::Less);
        assert_eq!(compare_ids("b", "a"), Ordering::Greater);
    }
}
