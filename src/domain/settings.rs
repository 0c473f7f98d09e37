//! The account's settings document: who has which role on which channel, and whose contacts'
//! phones are hidden. The document is built in [`crate::plan::settings_doc`]; here, its hash.

pub use wazzup_api::{SettingsDoc, SettingsDocRef};

use super::hash::content_hash;

/// The hash of a canonical document (see [`SettingsDoc::canonicalize`]): of the bytes
/// [`SettingsDocRef::to_json`] writes, which `sync` sends.
pub fn settings_hash(doc: &SettingsDocRef<'_>) -> String {
    content_hash(&doc.to_json())
}

/// A settings value as the history keeps it: a role row's (role, new clients), or (None, flag)
/// for a phone's hidden flag or the account's push flag.
pub type RowValues = (Option<&'static str>, bool);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Role, RoleEntry};

    #[test]
    fn settings_hash_ignores_row_order() {
        let e1 = RoleEntry {
            user_id: "1".into(),
            channel_id: "a".into(),
            role: Role::Seller,
            allow_get_new_clients: true,
        };
        let e2 = RoleEntry {
            user_id: "2".into(),
            channel_id: "a".into(),
            role: Role::Auditor,
            allow_get_new_clients: false,
        };
        let mut d1 = SettingsDoc {
            user_roles: vec![e1.clone(), e2.clone()],
            hide_phone_numbers_for_user_ids: vec!["2".into(), "1".into()],
            push_input_output_message_events_for_managers: false,
        };
        let mut d2 = SettingsDoc {
            user_roles: vec![e2, e1],
            hide_phone_numbers_for_user_ids: vec!["1".into(), "2".into()],
            push_input_output_message_events_for_managers: false,
        };
        d1.canonicalize();
        d2.canonicalize();
        assert_eq!(settings_hash(&d1.view()), settings_hash(&d2.view()));
    }
}
