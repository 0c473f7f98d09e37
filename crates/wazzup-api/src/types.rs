//! The wire types: their JSON is exactly what `POST /v2/users` and `PATCH /v2/settings` take.

use serde::{Deserialize, Serialize};

/// A Wazzup role, as the API spells it. The UI's "Manager" is `seller`, "Supervisor" is
/// `manager`, "Quality Control" is `auditor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Seller,
    Manager,
    Auditor,
}

impl Role {
    /// Parses an API value exactly: only `seller`, `manager` and `auditor`, surrounding spaces
    /// forgiven. `Manager` is the UI name of `seller`, so no other spelling is accepted.
    pub fn from_api(s: &str) -> Option<Role> {
        match s.trim() {
            "seller" => Some(Role::Seller),
            "manager" => Some(Role::Manager),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Seller => "seller",
            Role::Manager => "manager",
            Role::Auditor => "auditor",
        }
    }
}

/// A user exactly as it is sent to `POST /v2/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPayload {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub phone: Option<String>,
}

/// One role assignment in the settings document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoleEntry {
    pub user_id: String,
    pub channel_id: String,
    pub role: Role,
    pub allow_get_new_clients: bool,
}

/// An account's whole settings document, as sent to `PATCH /v2/settings` (which replaces it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SettingsDoc {
    pub user_roles: Vec<RoleEntry>,
    #[serde(default)]
    pub hide_phone_numbers_for_user_ids: Vec<String>,
    pub push_input_output_message_events_for_managers: bool,
}

impl SettingsDoc {
    /// Sorts and dedups both lists, so that documents equal in meaning are equal.
    pub fn canonicalize(&mut self) {
        self.user_roles.sort();
        self.user_roles.dedup();
        self.hide_phone_numbers_for_user_ids.sort();
        self.hide_phone_numbers_for_user_ids.dedup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_api_values_are_roles() {
        assert_eq!(Role::from_api(" manager "), Some(Role::Manager));
        assert_eq!(Role::from_api("Manager"), None);
        assert_eq!(Role::from_api("SELLER"), None);
    }

    #[test]
    fn a_user_without_a_phone_is_sent_without_the_field() {
        let u = UserPayload {
            id: "1".into(),
            name: "A".into(),
            phone: None,
        };
        assert_eq!(
            serde_json::to_string(&u).unwrap(),
            r#"{"id":"1","name":"A"}"#
        );
    }
}
