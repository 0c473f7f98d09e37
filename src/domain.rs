//! The records the daemon pushes, and the rules that turn CRM rows into them.
//!
//! Everything here is pure: rows in, valid payloads and rejections out.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};

use phonenumber::country::Id as Region;
use serde::{Deserialize, Serialize};

/// Longest user id Wazzup accepts, in characters.
pub const MAX_ID_CHARS: usize = 64;
/// Longest user name Wazzup accepts, in characters.
pub const MAX_NAME_CHARS: usize = 150;
/// Longest string kept in a dead letter's payload.
const MAX_STORED_CHARS: usize = 256;

/// A Wazzup role, as the API spells it. The UI's "Manager" is `seller`, "Supervisor" is `manager`.
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
    pub fn parse_api(s: &str) -> Option<Role> {
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

    /// How much of the account's chats the role opens: seller < auditor < manager.
    pub fn reach(self) -> u8 {
        match self {
            Role::Seller => 0,
            Role::Auditor => 1,
            Role::Manager => 2,
        }
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
    if let Some(role) = map.get(&trimmed.to_lowercase()) {
        return Ok(*role);
    }
    if let Some(role) = Role::parse_api(trimmed) {
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

/// What kind of record a dead letter is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    User,
    Role,
    Settings,
    Delete,
}

impl Entity {
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::User => "user",
            Entity::Role => "settings",
            Entity::Settings => "settings",
            Entity::Delete => "delete",
        }
    }
}

/// A user exactly as it is sent to `POST /v2/users`; its JSON is its canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPayload {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub phone: Option<String>,
}

impl UserPayload {
    /// Content hash of the canonical JSON form.
    pub fn hash(&self) -> String {
        json_hash(self)
    }
}

/// One role assignment in the settings document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoleEntry {
    pub user_id: String,
    pub channel_id: String,
    pub role: Role,
    pub allow_get_new_clients: bool,
}

/// The account's whole settings document, as sent to `PATCH /v2/settings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SettingsDoc {
    pub user_roles: Vec<RoleEntry>,
    #[serde(default)]
    pub hide_phone_numbers_for_user_ids: Vec<String>,
    pub push_input_output_message_events_for_managers: bool,
}

impl SettingsDoc {
    /// Sorts both lists so that equal documents hash equally.
    pub fn canonicalize(&mut self) {
        self.user_roles.sort();
        self.user_roles.dedup();
        self.hide_phone_numbers_for_user_ids.sort();
        self.hide_phone_numbers_for_user_ids.dedup();
    }

    pub fn hash(&self) -> String {
        json_hash(self)
    }
}

/// [`content_hash`] of a value's JSON, written straight into the hasher (no buffer).
fn json_hash(value: &impl Serialize) -> String {
    let mut hasher = blake3::Hasher::new();
    serde_json::to_writer(&mut hasher, value).expect("serializes");
    hasher.finalize().to_hex()[..32].to_string()
}

/// 128 bits of BLAKE3 in hex: plenty to tell payloads apart, small in the mirror.
pub fn content_hash(bytes: &[u8]) -> String {
    let h = blake3::hash(bytes);
    h.to_hex()[..32].to_string()
}

/// A users-query row as read from the CRM; every field may be missing or NULL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceUser {
    pub account_id: Option<String>,
    pub id: Option<String>,
    pub name: Option<String>,
    pub phone: Option<String>,
    pub hide_phone: Option<bool>,
}

/// A roles-query row as read from the CRM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceRole {
    pub account_id: Option<String>,
    pub user_id: Option<String>,
    pub channel_id: Option<String>,
    pub role: Option<String>,
    pub allow_get_new_clients: Option<bool>,
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

/// A user that passed every local check.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidUser {
    pub payload: UserPayload,
    pub hash: String,
    pub hide_phone: bool,
    /// The region and CRM text the phone was read from (the phone cache's key).
    pub phone_source: Option<String>,
    /// Whether libphonenumber knows the phone's range.
    pub phone_valid: bool,
    /// The CRM's phone, masked, when it could not be read and the user is sent without one.
    pub unreadable_phone: Option<String>,
}

/// Phones read in earlier cycles, by user id: (phone source, international digits or None
/// when unreadable, valid). A phone whose source is unchanged is not parsed again.
pub type PhoneCache = HashMap<String, (String, Option<String>, bool)>;

/// The key under which a phone's reading is cached: the region matters to the result.
pub fn phone_source(raw: &str, region: Option<Region>) -> String {
    format!(
        "{}|{raw}",
        region.map(|r| r.as_ref().to_string()).unwrap_or_default()
    )
}

/// One account's CRM rows after normalization.
#[derive(Debug, Default)]
pub struct Normalized {
    /// Valid users, sorted by id.
    pub users: Vec<ValidUser>,
    /// Valid role rows of valid users, sorted.
    pub roles: Vec<RoleEntry>,
    pub rejected: Vec<Rejection>,
    /// Ids present in the CRM whose rows were refused: never deleted from Wazzup for that.
    pub rejected_user_ids: HashSet<String>,
    /// Phones that could not be read and were left out of the payload.
    pub phone_warnings: usize,
    /// Phones sent although libphonenumber does not consider them valid numbers.
    pub phone_not_valid: usize,
}

/// What normalization needs from the settings.
#[derive(Debug, Clone, Default)]
pub struct NormalizeOptions {
    pub region: Option<Region>,
    /// CRM role names (lower case) to API roles.
    pub role_map: BTreeMap<String, Role>,
}

/// The result of reading one phone number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phone {
    Missing,
    /// International digits without `+`; `valid` says whether libphonenumber knows the range.
    Parsed {
        digits: String,
        valid: bool,
    },
    Unreadable,
}

/// Reads a phone number into international digits (`37192612345`).
///
/// National numbers are read with the default region; digits without `+` that do not form a
/// valid national number are read as international. A number that parses but is outside
/// libphonenumber's known ranges is still sent (Wazzup only checks the format).
pub fn normalize_phone(raw: &str, region: Option<Region>) -> Phone {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Phone::Missing;
    }
    if trimmed.chars().any(|c| c.is_control()) || trimmed.len() > 64 {
        return Phone::Unreadable;
    }
    let parse = |region: Option<Region>, s: &str| -> Option<(String, bool)> {
        let n = phonenumber::parse(region, s).ok()?;
        let e164 = n.format().mode(phonenumber::Mode::E164).to_string();
        let digits = e164.trim_start_matches('+').to_string();
        if !(8..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((digits, n.is_valid()))
    };
    let international = trimmed.starts_with('+');
    let as_national = if international || region.is_none() {
        None
    } else {
        parse(region, trimmed)
    };
    let as_international = if international {
        parse(None, trimmed)
    } else if let Some(rest) = trimmed.strip_prefix("00") {
        parse(None, &format!("+{rest}"))
    } else {
        parse(None, &format!("+{trimmed}"))
    };
    let best = match (as_national, as_international) {
        (Some(n), _) if n.1 => Some(n),
        (_, Some(i)) if i.1 => Some(i),
        (_, Some(i)) => Some(i),
        (n, None) => n,
    };
    match best {
        Some((digits, valid)) => Phone::Parsed { digits, valid },
        None => Phone::Unreadable,
    }
}

/// Masks a phone for logs, showing only its first and last digits: `371 *** *34`.
pub fn mask_phone(digits: &str) -> String {
    let n = digits.chars().count();
    if n <= 5 {
        return "*".repeat(n);
    }
    let head: String = digits.chars().take(3).collect();
    let tail: String = digits.chars().skip(n - 2).collect();
    format!("{head} *** *{tail}")
}

/// Masks a phone as the CRM wrote it (it may not be a phone at all), for logs and `plan`:
/// separators stay, digits are hidden except the last two (and the first three of a long one).
pub fn mask_raw_phone(raw: &str) -> String {
    let raw: String = raw
        .trim()
        .chars()
        .take(40)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let digits = raw.chars().filter(char::is_ascii_digit).count();
    if digits <= 4 {
        return raw;
    }
    let head = if digits >= 7 { 3 } else { 0 };
    let mut seen = 0;
    raw.chars()
        .map(|c| {
            if !c.is_ascii_digit() {
                return c;
            }
            seen += 1;
            if seen <= head || seen > digits - 2 {
                c
            } else {
                '*'
            }
        })
        .collect()
}

/// Masks every run of seven or more digits (a phone, most likely) in a text meant for logs.
pub fn mask_digits(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 7 {
            out.push_str(&mask_phone(run));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Orders ids numerically when both are integers, otherwise as strings.
pub fn compare_ids(a: &str, b: &str) -> Ordering {
    match (a.parse::<u128>(), b.parse::<u128>()) {
        (Ok(x), Ok(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        _ => a.cmp(b),
    }
}

/// Cuts long strings so a hostile row cannot bloat the dead-letter table.
pub fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_STORED_CHARS {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(MAX_STORED_CHARS).collect();
        out.push('…');
        out
    }
}

fn clip_opt(s: &Option<String>) -> serde_json::Value {
    match s {
        Some(s) => serde_json::Value::String(clip(s)),
        None => serde_json::Value::Null,
    }
}

fn user_row_payload(u: &SourceUser) -> serde_json::Value {
    serde_json::json!({
        "id": clip_opt(&u.id),
        "name": clip_opt(&u.name),
        "phone": clip_opt(&u.phone),
        "hide_phone": u.hide_phone,
    })
}

fn role_row_payload(r: &SourceRole) -> serde_json::Value {
    serde_json::json!({
        "user_id": clip_opt(&r.user_id),
        "channel_id": clip_opt(&r.channel_id),
        "role": clip_opt(&r.role),
        "allow_get_new_clients": r.allow_get_new_clients,
    })
}

fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control())
}

fn record_id_of(id: &Option<String>, payload: &serde_json::Value) -> String {
    match id {
        Some(id) if !id.is_empty() => clip(id),
        _ => format!(
            "(no id {})",
            &content_hash(payload.to_string().as_bytes())[..8]
        ),
    }
}

fn check_user(u: &SourceUser) -> Result<(String, String), (&'static str, String)> {
    let id = match &u.id {
        None => return Err(("invalid_id", "The user id is NULL".into())),
        Some(id) => id,
    };
    let id_chars = id.chars().count();
    if id.trim().is_empty() {
        return Err(("invalid_id", "The user id is empty".into()));
    }
    if id_chars > MAX_ID_CHARS {
        return Err((
            "invalid_id",
            format!("The user id has {id_chars} characters; Wazzup allows at most {MAX_ID_CHARS}"),
        ));
    }
    if has_control(id) {
        return Err((
            "invalid_id",
            "The user id contains control characters".into(),
        ));
    }
    let name = match &u.name {
        None => return Err(("invalid_name", "The user name is NULL".into())),
        Some(n) => n.trim(),
    };
    let name_chars = name.chars().count();
    if name_chars == 0 {
        return Err(("invalid_name", "The user name is empty".into()));
    }
    if name_chars > MAX_NAME_CHARS {
        return Err((
            "invalid_name",
            format!(
                "The user name has {name_chars} characters after trimming; Wazzup allows at most {MAX_NAME_CHARS}"
            ),
        ));
    }
    if has_control(name) {
        return Err((
            "invalid_name",
            "The user name contains control characters (line breaks, tabs, NUL...)".into(),
        ));
    }
    Ok((id.clone(), name.to_string()))
}

/// Validates and normalizes one account's rows.
pub fn normalize_account(
    users: &[SourceUser],
    roles: &[SourceRole],
    opts: &NormalizeOptions,
    cache: &PhoneCache,
) -> Normalized {
    let mut out = Normalized::default();

    // Every id that appears on more than one row is refused on all of them.
    let mut id_rows: HashMap<&str, usize> = HashMap::new();
    for u in users {
        if let Some(id) = &u.id {
            *id_rows.entry(id.as_str()).or_default() += 1;
        }
    }

    let mut reported_dups: HashSet<&str> = HashSet::new();
    let mut candidates: Vec<ValidUser> = Vec::with_capacity(users.len());
    for u in users {
        let payload = user_row_payload(u);
        let record_id = record_id_of(&u.id, &payload);
        let mut reject = |code: &'static str, message: String| {
            if let Some(id) = &u.id {
                out.rejected_user_ids.insert(id.clone());
            }
            out.rejected.push(Rejection {
                entity: Entity::User,
                record_id: record_id.clone(),
                code,
                message,
                payload: payload.clone(),
            });
        };
        if let Some(id) = &u.id
            && id_rows.get(id.as_str()).copied().unwrap_or(0) > 1
        {
            // One dead letter for all the rows of the id, holding every row.
            if reported_dups.insert(id.as_str()) {
                let rows: Vec<serde_json::Value> = users
                    .iter()
                    .filter(|other| other.id.as_deref() == Some(id.as_str()))
                    .map(user_row_payload)
                    .collect();
                out.rejected_user_ids.insert(id.clone());
                out.rejected.push(Rejection {
                    entity: Entity::User,
                    record_id: record_id.clone(),
                    code: "duplicate_id",
                    message: format!(
                        "The user id appears on {} rows of this account; none of them is sent until the view returns it once",
                        rows.len()
                    ),
                    payload: serde_json::Value::Array(rows),
                });
            }
            continue;
        }
        let (id, name) = match check_user(u) {
            Ok(v) => v,
            Err((code, message)) => {
                reject(code, message);
                continue;
            }
        };
        let source = u.phone.as_deref().map(|p| phone_source(p, opts.region));
        let reading = match (&u.phone, &source) {
            (Some(raw), Some(key)) => match cache.get(&id) {
                Some((cached_key, digits, valid)) if cached_key == key => match digits {
                    Some(d) => Phone::Parsed {
                        digits: d.clone(),
                        valid: *valid,
                    },
                    None => Phone::Unreadable,
                },
                _ => normalize_phone(raw, opts.region),
            },
            _ => Phone::Missing,
        };
        let mut unreadable_phone = None;
        let (phone, phone_valid) = match reading {
            Phone::Missing => (None, false),
            Phone::Unreadable => {
                out.phone_warnings += 1;
                unreadable_phone = u.phone.as_deref().map(mask_raw_phone);
                (None, false)
            }
            Phone::Parsed { digits, valid } => {
                if !valid {
                    out.phone_not_valid += 1;
                }
                (Some(digits), valid)
            }
        };
        let payload = UserPayload { id, name, phone };
        candidates.push(ValidUser {
            hash: payload.hash(),
            payload,
            hide_phone: u.hide_phone.unwrap_or(false),
            phone_source: source,
            phone_valid,
            unreadable_phone,
        });
    }

    // Two users with one phone: the smaller id keeps it, the greater is refused.
    candidates.sort_by(|a, b| compare_ids(&a.payload.id, &b.payload.id));
    let mut phone_owner: HashMap<String, String> = HashMap::new();
    for c in candidates {
        if let Some(phone) = &c.payload.phone {
            if let Some(owner) = phone_owner.get(phone) {
                out.rejected_user_ids.insert(c.payload.id.clone());
                out.rejected.push(Rejection {
                    entity: Entity::User,
                    record_id: c.payload.id.clone(),
                    code: "duplicate_phone",
                    message: format!(
                        "The phone {} is also the phone of user {owner:?}; Wazzup needs phones unique within an account",
                        mask_phone(phone)
                    ),
                    payload: serde_json::to_value(&c.payload).unwrap_or_default(),
                });
                continue;
            }
            phone_owner.insert(phone.clone(), c.payload.id.clone());
        }
        out.users.push(c);
    }
    out.users.sort_by(|a, b| a.payload.id.cmp(&b.payload.id));

    let valid_ids: HashSet<&str> = out.users.iter().map(|u| u.payload.id.as_str()).collect();
    let known_ids: HashSet<&str> = users.iter().filter_map(|u| u.id.as_deref()).collect();

    // Role rows: first validate each, then refuse (user, channel) pairs given conflicting values.
    let mut by_key: BTreeMap<(String, String), Vec<(RoleEntry, serde_json::Value)>> =
        BTreeMap::new();
    for r in roles {
        let payload = role_row_payload(r);
        let record_id = format!(
            "{}/{}",
            clip(r.user_id.as_deref().unwrap_or("")),
            clip(r.channel_id.as_deref().unwrap_or(""))
        );
        let mut reject = |code: &'static str, message: String| {
            out.rejected.push(Rejection {
                entity: Entity::Role,
                record_id: record_id.clone(),
                code,
                message,
                payload: payload.clone(),
            });
        };
        let user_id = match &r.user_id {
            Some(u) if !u.is_empty() => u.clone(),
            _ => {
                reject("unknown_user", "The role row has no user_id".into());
                continue;
            }
        };
        let channel_id = match &r.channel_id {
            Some(c) if !c.trim().is_empty() && !has_control(c) => c.trim().to_string(),
            Some(c) if has_control(c) => {
                reject(
                    "invalid_channel_id",
                    "The channel id contains control characters".into(),
                );
                continue;
            }
            _ => {
                reject(
                    "empty_channel_id",
                    "The role row has an empty channel_id".into(),
                );
                continue;
            }
        };
        let role = match read_role(r.role.as_deref().unwrap_or(""), &opts.role_map) {
            Ok(role) => role,
            Err(refusal) => {
                reject(refusal.code, refusal.message);
                continue;
            }
        };
        if !valid_ids.contains(user_id.as_str()) {
            if known_ids.contains(user_id.as_str()) {
                reject(
                    "user_rejected",
                    "The role belongs to a user that was refused; fix the user first".into(),
                );
            } else {
                reject(
                    "unknown_user",
                    "The role belongs to a user id that the users query does not return".into(),
                );
            }
            continue;
        }
        let entry = RoleEntry {
            user_id: user_id.clone(),
            channel_id: channel_id.clone(),
            role,
            allow_get_new_clients: r.allow_get_new_clients.unwrap_or(false),
        };
        by_key
            .entry((user_id, channel_id))
            .or_default()
            .push((entry, payload));
    }
    for ((user_id, channel_id), mut entries) in by_key {
        let first = entries[0].0.clone();
        if entries.iter().all(|(e, _)| *e == first) {
            out.roles.push(first);
            continue;
        }
        let n = entries.len();
        out.rejected.push(Rejection {
            entity: Entity::Role,
            record_id: format!("{}/{}", clip(&user_id), clip(&channel_id)),
            code: "duplicate_role",
            message: format!("The user has {n} conflicting role rows for this channel; keep one"),
            payload: serde_json::Value::Array(entries.drain(..).map(|(_, p)| p).collect()),
        });
    }
    out.roles.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, name: &str, phone: Option<&str>) -> SourceUser {
        SourceUser {
            account_id: None,
            id: Some(id.into()),
            name: Some(name.into()),
            phone: phone.map(Into::into),
            hide_phone: None,
        }
    }

    fn role(user_id: &str, channel: &str, role: &str) -> SourceRole {
        SourceRole {
            account_id: None,
            user_id: Some(user_id.into()),
            channel_id: Some(channel.into()),
            role: Some(role.into()),
            allow_get_new_clients: Some(true),
        }
    }

    fn ru() -> NormalizeOptions {
        NormalizeOptions {
            region: Some(Region::RU),
            role_map: BTreeMap::new(),
        }
    }

    #[test]
    fn phones_become_international_digits() {
        assert_eq!(
            normalize_phone("+371 26 123 456", None),
            Phone::Parsed {
                digits: "37126123456".into(),
                valid: true
            }
        );
        assert_eq!(
            normalize_phone("8 (912) 345-67-89", Some(Region::RU)),
            Phone::Parsed {
                digits: "79123456789".into(),
                valid: true
            }
        );
        // The seed's own example is outside libphonenumber's ranges but is sent as written.
        assert!(matches!(
            normalize_phone("37192612345", Some(Region::RU)),
            Phone::Parsed { ref digits, valid: false } if digits == "37192612345"
        ));
        assert_eq!(normalize_phone("  ", None), Phone::Missing);
        assert_eq!(normalize_phone("call me maybe", None), Phone::Unreadable);
        assert_eq!(normalize_phone("12\u{0}34", None), Phone::Unreadable);
    }

    #[test]
    fn a_masked_phone_shows_only_the_ends() {
        assert_eq!(mask_phone("37155123434"), "371 *** *34");
        assert_eq!(
            mask_digits("User with phone number 37155123434 already exists, code 400"),
            "User with phone number 371 *** *34 already exists, code 400"
        );
    }

    #[test]
    fn names_are_trimmed_and_limits_are_counted_in_characters() {
        let long_ok = "я".repeat(150);
        let n = normalize_account(
            &[
                user("1", "  Anna  ", None),
                user("2", &long_ok, None),
                user("3", &"я".repeat(151), None),
                user(&"x".repeat(65), "Too long id", None),
                user("5", "   ", None),
            ],
            &[],
            &ru(),
            &PhoneCache::new(),
        );
        let ids: Vec<_> = n.users.iter().map(|u| u.payload.id.as_str()).collect();
        assert_eq!(ids, ["1", "2"]);
        assert_eq!(n.users[0].payload.name, "Anna");
        let codes: Vec<_> = n.rejected.iter().map(|r| r.code).collect();
        assert_eq!(codes, ["invalid_name", "invalid_id", "invalid_name"]);
    }

    #[test]
    fn an_unchanged_phone_is_taken_from_the_cache_and_a_changed_one_is_read_again() {
        let mut cache = PhoneCache::new();
        let key = phone_source("+371 26 123 456", Some(Region::RU));
        // A cached reading that parsing would never give, to prove the cache was used.
        cache.insert("1".into(), (key, Some("37100000000".into()), true));
        let n = normalize_account(
            &[user("1", "A", Some("+371 26 123 456"))],
            &[],
            &ru(),
            &cache,
        );
        assert_eq!(n.users[0].payload.phone.as_deref(), Some("37100000000"));
        let n = normalize_account(
            &[user("1", "A", Some("+371 26 123 457"))],
            &[],
            &ru(),
            &cache,
        );
        assert_eq!(n.users[0].payload.phone.as_deref(), Some("37126123457"));
        let lv = NormalizeOptions {
            region: Some(Region::LV),
            role_map: BTreeMap::new(),
        };
        let n = normalize_account(&[user("1", "A", Some("+371 26 123 456"))], &[], &lv, &cache);
        assert_eq!(
            n.users[0].payload.phone.as_deref(),
            Some("37126123456"),
            "another region, another key"
        );
    }

    #[test]
    fn an_unreadable_phone_is_left_out_and_counted() {
        let n = normalize_account(
            &[user("1", "A", Some("n/a"))],
            &[],
            &ru(),
            &PhoneCache::new(),
        );
        assert_eq!(n.users[0].payload.phone, None);
        assert_eq!(n.users[0].unreadable_phone.as_deref(), Some("n/a"));
        assert_eq!(n.phone_warnings, 1);
        assert!(n.rejected.is_empty());
    }

    #[test]
    fn of_two_users_with_one_phone_the_greater_id_is_refused() {
        let n = normalize_account(
            &[
                user("10", "B", Some("+7 912 345-67-89")),
                user("9", "A", Some("89123456789")),
            ],
            &[],
            &ru(),
            &PhoneCache::new(),
        );
        assert_eq!(n.users.len(), 1);
        assert_eq!(n.users[0].payload.id, "9");
        assert_eq!(n.rejected[0].record_id, "10");
        assert_eq!(n.rejected[0].code, "duplicate_phone");
        assert!(!n.rejected[0].message.contains("79123456789"));
    }

    #[test]
    fn every_row_of_a_duplicated_id_is_refused() {
        let n = normalize_account(
            &[
                user("1", "A", None),
                user("1", "B", None),
                user("2", "C", None),
            ],
            &[role("1", "ch", "seller")],
            &ru(),
            &PhoneCache::new(),
        );
        assert_eq!(n.users.len(), 1);
        let dups: Vec<_> = n
            .rejected
            .iter()
            .filter(|r| r.code == "duplicate_id")
            .collect();
        assert_eq!(dups.len(), 1, "one dead letter for the id");
        assert_eq!(
            dups[0].payload.as_array().unwrap().len(),
            2,
            "holding both rows"
        );
        assert!(n.rejected_user_ids.contains("1"));
        assert_eq!(n.rejected.last().unwrap().code, "user_rejected");
    }

    #[test]
    fn roles_accept_api_values_and_mapped_names_only() {
        let mut opts = ru();
        opts.role_map.insert("supervisor".into(), Role::Manager);
        let n = normalize_account(
            &[user("1", "A", None)],
            &[
                role("1", "c1", "seller"),
                role("1", "c2", "Supervisor"),
                role("1", "c3", "admin"),
                role("1", " ", "seller"),
                role("7", "c1", "seller"),
            ],
            &opts,
            &PhoneCache::new(),
        );
        assert_eq!(n.roles.len(), 2);
        assert_eq!(n.roles[1].role, Role::Manager);
        let codes: Vec<_> = n.rejected.iter().map(|r| r.code).collect();
        assert_eq!(codes, ["unknown_role", "empty_channel_id", "unknown_user"]);
    }

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
    fn a_raw_phone_is_masked_but_keeps_its_shape() {
        assert_eq!(mask_raw_phone("12"), "12");
        assert_eq!(mask_raw_phone("+7 912 345-67-89"), "+7 91* ***-**-89");
        assert_eq!(mask_raw_phone("12345"), "***45");
        assert_eq!(mask_raw_phone("call me"), "call me");
    }

    #[test]
    fn conflicting_role_rows_for_one_channel_are_refused_and_identical_ones_merged() {
        let mut r2 = role("1", "c1", "seller");
        r2.allow_get_new_clients = Some(false);
        let n = normalize_account(
            &[user("1", "A", None)],
            &[
                role("1", "c1", "seller"),
                r2,
                role("1", "c2", "auditor"),
                role("1", "c2", "auditor"),
            ],
            &ru(),
            &PhoneCache::new(),
        );
        assert_eq!(n.roles.len(), 1);
        assert_eq!(n.roles[0].channel_id, "c2");
        assert_eq!(n.rejected.len(), 1);
        assert_eq!(n.rejected[0].code, "duplicate_role");
    }

    #[test]
    fn hostile_strings_are_refused_with_a_reason_and_clipped() {
        let huge = "x".repeat(1_000_000);
        let n = normalize_account(
            &[
                user("1", &huge, None),
                user("2", "Bob\u{0}", None),
                SourceUser::default(),
                user("4", "Robert'); DROP TABLE users;--", None),
                user("5", "\u{202e}evil\u{200b}", None),
            ],
            &[],
            &ru(),
            &PhoneCache::new(),
        );
        assert_eq!(n.users.len(), 2, "SQL-looking and bidi names are data");
        assert_eq!(n.rejected.len(), 3);
        let stored = n.rejected[0].payload.to_string();
        assert!(stored.len() < 1_000);
    }

    #[test]
    fn the_hash_changes_with_the_payload_and_only_with_it() {
        let a = UserPayload {
            id: "1".into(),
            name: "A".into(),
            phone: None,
        };
        let mut b = a.clone();
        assert_eq!(a.hash(), b.hash());
        b.phone = Some("37126123456".into());
        assert_ne!(a.hash(), b.hash());
    }

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
        assert_eq!(d1.hash(), d2.hash());
    }

    #[test]
    fn numeric_ids_compare_as_numbers() {
        assert_eq!(compare_ids("9", "10"), Ordering::Less);
        assert_eq!(compare_ids("b", "a"), Ordering::Greater);
    }
}
