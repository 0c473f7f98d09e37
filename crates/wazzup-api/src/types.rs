//! The wire types: their JSON is exactly what `POST /v2/users` and `PATCH /v2/settings` take.

use serde::{Deserialize, Serialize};

/// A string of the wire types: kept inline when short (up to 24 bytes), as ids, names, phones
/// and channel ids mostly are, so a thousand users do not cost thousands of allocations. Its
/// JSON is a plain string.
pub type Text = compact_str::CompactString;

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
    pub id: Text,
    pub name: Text,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub phone: Option<Text>,
}

/// One role assignment in the settings document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoleEntry {
    pub user_id: Text,
    pub channel_id: Text,
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
        sort_dedup(&mut self.user_roles);
        sort_dedup(&mut self.hide_phone_numbers_for_user_ids);
    }

    /// The same document, borrowed.
    pub fn view(&self) -> SettingsDocRef<'_> {
        SettingsDocRef {
            user_roles: self.user_roles.iter().collect(),
            hide_phone_numbers_for_user_ids: self
                .hide_phone_numbers_for_user_ids
                .iter()
                .map(String::as_str)
                .collect(),
            push_input_output_message_events_for_managers: self
                .push_input_output_message_events_for_managers,
        }
    }
}

fn sort_dedup<T: Ord>(list: &mut Vec<T>) {
    list.sort();
    list.dedup();
}

/// A settings document that borrows its entries: the same JSON as [`SettingsDoc`], built without
/// copying every role of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SettingsDocRef<'a> {
    pub user_roles: Vec<&'a RoleEntry>,
    pub hide_phone_numbers_for_user_ids: Vec<&'a str>,
    pub push_input_output_message_events_for_managers: bool,
}

impl SettingsDocRef<'_> {
    /// Sorts and dedups both lists, as [`SettingsDoc::canonicalize`] does.
    pub fn canonicalize(&mut self) {
        sort_dedup(&mut self.user_roles);
        sort_dedup(&mut self.hide_phone_numbers_for_user_ids);
    }

    /// The document's JSON: the one writer of the settings document. `sync` hashes and sends
    /// these bytes, `plan` hashes them, and the hashes stored in the state are of them.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a settings document serializes")
    }

    pub fn to_owned_doc(&self) -> SettingsDoc {
        SettingsDoc {
            user_roles: self.user_roles.iter().map(|&r| r.clone()).collect(),
            hide_phone_numbers_for_user_ids: self
                .hide_phone_numbers_for_user_ids
                .iter()
                .map(|&id| id.to_string())
                .collect(),
            push_input_output_message_events_for_managers: self
                .push_input_output_message_events_for_managers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_document_serializes_as_the_owned_one() {
        let roles = [
            RoleEntry {
                user_id: "2".into(),
                channel_id: "c\"1".into(),
                role: Role::Auditor,
                allow_get_new_clients: false,
            },
            RoleEntry {
                user_id: "1".into(),
                channel_id: "c1".into(),
                role: Role::Seller,
                allow_get_new_clients: true,
            },
        ];
        let mut borrowed = SettingsDocRef {
            user_roles: vec![&roles[0], &roles[1], &roles[0]],
            hide_phone_numbers_for_user_ids: vec!["2", "1"],
            push_input_output_message_events_for_managers: true,
        };
        borrowed.canonicalize();
        let mut owned = borrowed.to_owned_doc();
        owned.canonicalize();
        let json = serde_json::to_string(&borrowed).unwrap();
        assert_eq!(json, serde_json::to_string(&owned).unwrap());
        assert_eq!(borrowed.to_json(), json.as_bytes());
        assert!(
            json.starts_with(r#"{"user_roles":[{"user_id":"1","#),
            "{json}"
        );
        assert!(json.ends_with(r#""hide_phone_numbers_for_user_ids":["1","2"],"push_input_output_message_events_for_managers":true}"#), "{json}");
    }

    #[test]
    fn the_written_json_is_serde_json_s_for_any_text() {
        let texts = [
            "",
            "plain",
            "a\"quote",
            "back\\slash",
            "tab\tnew\nline\r",
            "\u{1}\u{1f}\u{7f}",
            "/slash",
            "Jānis Bērziņš",
            "日本語",
            "emoji 🙂",
            "\u{2028}\u{2029}",
        ];
        for (i, t) in texts.iter().enumerate() {
            let roles = [RoleEntry {
                user_id: (*t).into(),
                channel_id: texts[(i + 1) % texts.len()].into(),
                role: [Role::Seller, Role::Manager, Role::Auditor][i % 3],
                allow_get_new_clients: i % 2 == 0,
            }];
            for hidden in [vec![], vec![*t], vec![*t, "x"]] {
                let doc = SettingsDocRef {
                    user_roles: roles.iter().collect(),
                    hide_phone_numbers_for_user_ids: hidden,
                    push_input_output_message_events_for_managers: i % 2 == 1,
                };
                assert_eq!(
                    String::from_utf8(doc.to_json()).unwrap(),
                    serde_json::to_string(&doc).unwrap()
                );
            }
        }
        let empty = SettingsDocRef {
            user_roles: vec![],
            hide_phone_numbers_for_user_ids: vec![],
            push_input_output_message_events_for_managers: false,
        };
        assert_eq!(empty.to_json(), serde_json::to_vec(&empty).unwrap());
    }

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
