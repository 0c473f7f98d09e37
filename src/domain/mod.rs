//! The records the daemon pushes, and the rules that turn CRM rows into them.
//!
//! Pure: rows in, valid payloads and rejections out. One file per concept: [`user`],
//! [`phone`], [`role`], [`settings`]; [`normalize`] puts them together for one account.

pub mod hash;
pub mod normalize;
pub mod phone;
pub mod role;
pub mod settings;
pub mod user;

pub use hash::{content_hash, json_hash, salt_key, token_fingerprint};
pub use normalize::{NormalizeOptions, Normalized, normalize_account};
pub use phone::{
    PHONE_RULES, PHONENUMBER_VERSION, Phone, PhoneReading, Remembered, RememberedRow,
    RememberedUsers, mask_digits, mask_phone, mask_raw_phone, normalize_phone, phone_source,
};
pub use role::{Role, RoleEntry, RoleRefusal, reach, read_role};
pub use settings::{RowValues, SettingsDoc, SettingsDocRef, settings_hash};
pub use user::{
    LastPushed, MAX_ID_CHARS, MAX_NAME_CHARS, UserPayload, ValidUser, clip, compare_ids, user_hash,
};

/// The mirror of one account: user id → hash of the payload Wazzup acknowledged.
pub type Mirror = foldhash::HashMap<CrmText, String>;

/// A CRM value as read: kept inline when it is short (up to 24 bytes), as most are. The same
/// representation as the API's strings ([`wazzup_api::Text`]), so a value read is sent without
/// a copy; a test holds the two equal.
pub type CrmText = compact_str::CompactString;

/// A users-query row as read from the CRM (its account is the one it was handed over with);
/// every field may be missing or NULL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceUser {
    pub id: Option<CrmText>,
    pub name: Option<CrmText>,
    pub phone: Option<CrmText>,
    pub hide_phone: Option<bool>,
    /// PostgreSQL's hash of the whole row (`hashtextextended(row::text, 0)`), when read with it.
    pub row_hash: Option<i64>,
}

/// A roles-query row as read from the CRM (its account is the one it was handed over with).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceRole {
    pub user_id: Option<CrmText>,
    pub channel_id: Option<CrmText>,
    pub role: Option<CrmText>,
    pub allow_get_new_clients: Option<bool>,
}

/// What a dead letter is about: a user, the account's settings (the whole document, record id
/// `(document)`, or one role row, record id `user/channel`), or a deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    User,
    Settings,
    Delete,
}

impl Entity {
    /// The entity its text names.
    pub fn parse(s: &str) -> Option<Self> {
        [Entity::User, Entity::Settings, Entity::Delete]
            .into_iter()
            .find(|e| e.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Entity::User => "user",
            Entity::Settings => "settings",
            Entity::Delete => "delete",
        }
    }
}

/// A record refused before it reached the API, with a reason an operator can act on.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub entity: Entity,
    pub record_id: String,
    pub code: &'static str,
    pub message: String,
    pub payload: serde_json::Value,
}
