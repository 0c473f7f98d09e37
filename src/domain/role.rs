//! Role values: the operator's map decides first, then only the exact API values pass.

use std::collections::BTreeMap;

use foldhash::HashSet;

pub use wazzup_api::{Role, RoleEntry};

use super::user::{clip_opt, has_control};
use super::{Entity, Rejection, SourceRole, clip};

/// How much of an account's chats a role opens: seller < auditor < manager.
pub fn reach(role: Role) -> u8 {
    match role {
        Role::Seller => 0,
        Role::Auditor => 1,
        Role::Manager => 2,
    }
}

/// Why a CRM role value was not turned into an API role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRefusal {
    /// `ambiguous_role` or `unknown_role`.
    pub code: &'static str,
    pub message: String,
}

/// Reads a CRM role value: the operator's map decides first (keys folded to lower case), then
/// only the exact API values pass. Any other spelling of `manager` is the UI name of `seller`
/// and is refused as ambiguous, never read as `manager`.
pub fn read_role(raw: &str, map: &BTreeMap<String, Role>) -> Result<Role, RoleRefusal> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        // Never mapped: a row without a role must not get one by default.
        return Err(RoleRefusal {
            code: "unknown_role",
            message: "The role row has no role (NULL or blank): write seller, manager or auditor in the view, or leave the row out".into(),
        });
    }
    if !map.is_empty()
        && let Some(role) = map.get(&trimmed.to_lowercase())
    {
        return Ok(*role);
    }
    if let Some(role) = Role::from_api(trimmed) {
        return Ok(role);
    }
    let shown = clip(trimmed);
    let how_to_map = |to: &str| role_map_hint(trimmed, to);
    if trimmed.eq_ignore_ascii_case("manager") {
        return Err(RoleRefusal {
            code: "ambiguous_role",
            message: format!(
                "The role {shown:?} is ambiguous: \"Manager\" is the Wazzup UI name of the API role seller (own contacts only), while the API role manager is the UI's \"Supervisor\" (every chat). It is not read as manager. Map it: {} for the UI's Manager, or write exactly \"manager\" in the view for a Supervisor",
                how_to_map("seller")
            ),
        });
    }
    let near = if trimmed.eq_ignore_ascii_case("seller") || trimmed.eq_ignore_ascii_case("auditor")
    {
        format!(
            "; only the exact lower-case API value passes: write \"{}\" in the view or map it with {}",
            trimmed.to_lowercase(),
            how_to_map(&trimmed.to_lowercase())
        )
    } else {
        format!(
            "; map it with {}",
            how_to_map("<seller, manager or auditor>")
        )
    };
    Err(RoleRefusal {
        code: "unknown_role",
        message: format!(
            "The role {shown:?} is not one of the API values seller, manager, auditor (UI names: Manager = seller, Supervisor = manager, Quality Control = auditor) and is not in source.role_map{near}"
        ),
    })
}

/// How to map a CRM role value: an environment variable when the value can name one, else TOML.
fn role_map_hint(crm: &str, to: &str) -> String {
    if !crm.is_empty()
        && crm.len() <= 64
        && crm.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        format!("WAZZUP_SYNC__SOURCE__ROLE_MAP__{}={to}", crm.to_uppercase())
    } else {
        format!(
            "[source.role_map] {:?} = \"{to}\" in the config file",
            clip(crm)
        )
    }
}

/// Role rows turned into the document's entries. Each row is checked; then a (user, channel)
/// given conflicting values is refused, and identical rows are merged. `valid_ids` are the
/// users that will be sent, `known_ids` every user id the users query returned. The entries
/// come out sorted; each string is copied once, for the entry that keeps it.
pub(super) fn read_role_rows(
    rows: &[SourceRole],
    map: &BTreeMap<String, Role>,
    valid_ids: &HashSet<&str>,
    known_ids: &HashSet<&str>,
    rejected: &mut Vec<Rejection>,
) -> Vec<RoleEntry> {
    let mut checked: Vec<(Checked<'_>, usize)> = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        match read_row(r, map, valid_ids, known_ids) {
            Ok(row) => checked.push((row, i)),
            Err((code, message)) => rejected.push(refuse_row(r, code, message)),
        }
    }
    // Stable: the rows of one (user, channel) keep their order in a refusal's payload.
    checked.sort_by(|(a, _), (b, _)| (a.user_id, a.channel_id).cmp(&(b.user_id, b.channel_id)));
    let mut entries = Vec::with_capacity(checked.len());
    for group in
        checked.chunk_by(|(a, _), (b, _)| a.user_id == b.user_id && a.channel_id == b.channel_id)
    {
        let (first, _) = &group[0];
        if group
            .iter()
            .all(|(g, _)| g.role == first.role && g.new_clients == first.new_clients)
        {
            entries.push(RoleEntry {
                user_id: first.user_id.into(),
                channel_id: first.channel_id.into(),
                role: first.role,
                allow_get_new_clients: first.new_clients,
            });
            continue;
        }
        rejected.push(Rejection {
            entity: Entity::Settings,
            record_id: format!("{}/{}", clip(first.user_id), clip(first.channel_id)),
            code: "duplicate_role",
            message: format!(
                "The user has {} conflicting role rows for this channel; keep one",
                group.len()
            ),
            payload: serde_json::Value::Array(
                group.iter().map(|(_, i)| row_payload(&rows[*i])).collect(),
            ),
        });
    }
    entries
}

/// A role row that passed its checks, borrowing the row's strings.
struct Checked<'r> {
    user_id: &'r str,
    channel_id: &'r str,
    role: Role,
    new_clients: bool,
}

/// One row, checked, or why it is refused.
fn read_row<'r>(
    r: &'r SourceRole,
    map: &BTreeMap<String, Role>,
    valid_ids: &HashSet<&str>,
    known_ids: &HashSet<&str>,
) -> Result<Checked<'r>, (&'static str, String)> {
    let user_id = match r.user_id.as_deref() {
        Some(u) if !u.is_empty() => u,
        _ => return Err(("unknown_user", "The role row has no user_id".into())),
    };
    let channel_id = match r.channel_id.as_deref() {
        Some(c) if has_control(c) => {
            return Err((
                "invalid_channel_id",
                "The channel id contains control characters".into(),
            ));
        }
        Some(c) if !c.trim().is_empty() => c.trim(),
        _ => {
            return Err((
                "empty_channel_id",
                "The role row has an empty channel_id".into(),
            ));
        }
    };
    let role = read_role(r.role.as_deref().unwrap_or(""), map)
        .map_err(|refusal| (refusal.code, refusal.message))?;
    if !valid_ids.contains(user_id) {
        return Err(if known_ids.contains(user_id) {
            (
                "user_rejected",
                "The role belongs to a user that was refused; fix the user first".into(),
            )
        } else {
            (
                "unknown_user",
                "The role belongs to a user id that the users query does not return".into(),
            )
        });
    }
    Ok(Checked {
        user_id,
        channel_id,
        role,
        new_clients: r.allow_get_new_clients.unwrap_or(false),
    })
}

/// A role row's refusal: its record id is `user/channel`, under the account's settings.
fn refuse_row(r: &SourceRole, code: &'static str, message: String) -> Rejection {
    Rejection {
        entity: Entity::Settings,
        record_id: format!(
            "{}/{}",
            clip(r.user_id.as_deref().unwrap_or("")),
            clip(r.channel_id.as_deref().unwrap_or(""))
        ),
        code,
        message,
        payload: row_payload(r),
    }
}

fn row_payload(r: &SourceRole) -> serde_json::Value {
    serde_json::json!({
        "user_id": clip_opt(&r.user_id),
        "channel_id": clip_opt(&r.channel_id),
        "role": clip_opt(&r.role),
        "allow_get_new_clients": r.allow_get_new_clients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operators_map_decides_before_the_api_values() {
        let map: BTreeMap<String, Role> = [
            ("manager".to_string(), Role::Seller),
            ("supervisor".to_string(), Role::Manager),
        ]
        .into();
        for raw in ["Manager", "MANAGER", "manager", " manager "] {
            assert_eq!(read_role(raw, &map), Ok(Role::Seller), "{raw}");
        }
        assert_eq!(read_role("SUPERVISOR", &map), Ok(Role::Manager));
        assert_eq!(read_role(" auditor", &map), Ok(Role::Auditor));
    }

    #[test]
    fn without_a_map_entry_a_capitalised_manager_is_ambiguous_and_never_read_as_manager() {
        let none = BTreeMap::new();
        assert_eq!(read_role(" manager ", &none), Ok(Role::Manager));
        for raw in ["Manager", "MANAGER", "mAnAgEr"] {
            let e = read_role(raw, &none).unwrap_err();
            assert_eq!(e.code, "ambiguous_role", "{raw}");
            assert!(
                e.message
                    .contains("WAZZUP_SYNC__SOURCE__ROLE_MAP__MANAGER=seller"),
                "{}",
                e.message
            );
        }
        for raw in ["Seller", "AUDITOR", "admin", "Quality Control", ""] {
            assert_eq!(
                read_role(raw, &none).unwrap_err().code,
                "unknown_role",
                "{raw}"
            );
        }
        assert!(
            read_role("Quality Control", &none)
                .unwrap_err()
                .message
                .contains("[source.role_map] \"Quality Control\"")
        );
    }

    #[test]
    fn a_row_without_a_role_is_refused_even_when_the_map_names_an_empty_value() {
        let map: BTreeMap<String, Role> = [(String::new(), Role::Seller)].into();
        for raw in ["", "   "] {
            let e = read_role(raw, &map).unwrap_err();
            assert_eq!(e.code, "unknown_role");
            assert!(
                e.message.contains("has no role (NULL or blank)"),
                "{}",
                e.message
            );
            assert!(!e.message.contains("role_map"), "{}", e.message);
        }
    }
}
