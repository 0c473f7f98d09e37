//! One account's CRM rows turned into what is sent: valid users (phones read, unique within
//! the account), valid role rows, and a rejection with a reason for everything else.

use std::collections::{BTreeMap, HashSet};

use foldhash::{HashMap as FastMap, HashSet as FastSet};

use phonenumber::country::Id as Region;

use super::phone::{
    Phone, Remembered, RememberedUsers, mask_phone, mask_raw_phone, phone_source, read_phone,
};
use super::role::{Role, RoleEntry, read_role_rows};
use super::user::{
    ValidUser, check_user, compare_parsed, id_number, refuse, row_payload, user_hash,
};
use super::{CrmText, Entity, Rejection, SourceRole, SourceUser, UserPayload};

/// One account's CRM rows after normalization.
#[derive(Debug, Default)]
pub struct Normalized {
    /// Valid users, sorted by id.
    pub users: Vec<ValidUser>,
    /// Valid role rows of valid users, sorted.
    pub roles: Vec<RoleEntry>,
    pub rejected: Vec<Rejection>,
    /// Ids present in the CRM whose rows were refused: never deleted from Wazzup for that.
    pub rejected_user_ids: HashSet<CrmText>,
    /// Phones that could not be read and were left out of the payload.
    pub phone_warnings: usize,
    /// Phones sent although libphonenumber does not consider them valid numbers.
    pub phone_not_valid: usize,
}

/// What normalization needs from the settings.
#[derive(Debug, Clone, Default)]
pub struct NormalizeOptions {
    pub region: Option<Region>,
    /// CRM role values (lower case) to API roles.
    pub role_map: BTreeMap<String, Role>,
    /// Mixed into CRM row hashes before they are compared with the mirror's: the settings and
    /// code that change what a row means (see `salt_key`).
    pub row_salt: i64,
}

/// Validates and normalizes one account's rows. What `cache` remembers of a user recognised
/// by its unchanged row is moved out of it into the user.
pub fn normalize_account(
    users: &[SourceUser],
    roles: &[SourceRole],
    opts: &NormalizeOptions,
    cache: &mut RememberedUsers,
) -> Normalized {
    let mut out = Normalized::default();
    let candidates = read_users(users, opts, cache, &mut out);
    keep_unique_phones(candidates, &mut out);
    let valid_ids: FastSet<&str> = out.users.iter().map(|u| u.payload.id.as_str()).collect();
    let known_ids: FastSet<&str> = users.iter().filter_map(|u| u.id.as_deref()).collect();
    let mut rejected = Vec::new();
    out.roles = read_role_rows(roles, &opts.role_map, &valid_ids, &known_ids, &mut rejected);
    out.rejected.extend(rejected);
    out
}

/// Checks every users-query row; an id on more than one row is refused on all of them.
fn read_users(
    users: &[SourceUser],
    opts: &NormalizeOptions,
    cache: &mut RememberedUsers,
    out: &mut Normalized,
) -> Vec<ValidUser> {
    let mut rows_of: FastMap<&str, usize> = FastMap::default();
    for id in users.iter().filter_map(|u| u.id.as_deref()) {
        *rows_of.entry(id).or_default() += 1;
    }
    let mut reported: FastSet<&str> = FastSet::default();
    let mut candidates = Vec::with_capacity(users.len());
    for u in users {
        if let Some(id) = u.id.as_deref()
            && rows_of.get(id).copied().unwrap_or(0) > 1
        {
            if reported.insert(id) {
                out.rejected_user_ids.insert(id.into());
                out.rejected.push(refuse_duplicate_id(users, u, id));
            }
            continue;
        }
        if let Some(user) = unchanged_user(u, opts, cache, out) {
            candidates.push(user);
            continue;
        }
        match check_user(u) {
            Ok((id, name)) => candidates.push(read_user(id, name, u, opts, cache, out)),
            Err((code, message)) => {
                if let Some(id) = &u.id {
                    out.rejected_user_ids.insert(id.clone());
                }
                out.rejected.push(refuse(u, code, message));
            }
        }
    }
    candidates
}

/// One dead letter for all the rows of a repeated id, holding every row.
fn refuse_duplicate_id(users: &[SourceUser], first: &SourceUser, id: &str) -> Rejection {
    let rows: Vec<serde_json::Value> = users
        .iter()
        .filter(|other| other.id.as_deref() == Some(id))
        .map(row_payload)
        .collect();
    let mut r = refuse(
        first,
        "duplicate_id",
        format!(
            "The user id appears on {} rows of this account; none of them is sent until the view returns it once",
            rows.len()
        ),
    );
    r.payload = serde_json::Value::Array(rows);
    r
}

/// A row identical to the one Wazzup last acknowledged for its user, under the same salt,
/// becomes that user again without being checked, read or hashed. A user whose phone was
/// unreadable is read again, so that its warning is given every cycle.
fn unchanged_user(
    u: &SourceUser,
    opts: &NormalizeOptions,
    cache: &mut RememberedUsers,
    out: &mut Normalized,
) -> Option<ValidUser> {
    let id = u.id.as_deref()?;
    let salted = u.row_hash? ^ opts.row_salt;
    let remembered = cache.get(id)?;
    let same_row = remembered
        .row
        .as_ref()
        .is_some_and(|r| r.source_hash == salted);
    let phone_read = !matches!(remembered.phone, Some((_, None, _)));
    if !(same_row && phone_read) {
        return None;
    }
    // Recognised: what the mirror remembers becomes the user, moved rather than copied.
    let Remembered { phone, row } = cache.remove(id)?;
    let row = row?;
    let (phone_source, phone, phone_valid) = match phone {
        Some((source, Some(digits), valid)) => (Some(source), Some(digits), valid),
        _ => (None, None, false),
    };
    out.phone_not_valid += usize::from(phone.is_some() && !phone_valid);
    Some(ValidUser {
        payload: UserPayload {
            id: id.into(),
            name: row.name,
            phone,
        },
        hash: row.hash,
        hide_phone: row.hide_phone,
        phone_source,
        phone_valid,
        unreadable_phone: None,
        source_hash: Some(salted),
        row_remembered: true,
    })
}

/// A checked row as it will be sent: its phone read (or left out when unreadable).
fn read_user(
    id: CrmText,
    name: CrmText,
    u: &SourceUser,
    opts: &NormalizeOptions,
    cache: &RememberedUsers,
    out: &mut Normalized,
) -> ValidUser {
    let source = u.phone.as_deref().map(|p| phone_source(p, opts.region));
    let reading = read_phone(
        &id,
        u.phone.as_deref(),
        source.as_deref(),
        opts.region,
        cache,
    );
    let mut unreadable_phone = None;
    let (phone, phone_valid) = match reading {
        Phone::Missing => (None, false),
        Phone::Unreadable => {
            out.phone_warnings += 1;
            unreadable_phone = u.phone.as_deref().map(mask_raw_phone);
            (None, false)
        }
        Phone::Parsed { digits, valid } => {
            out.phone_not_valid += usize::from(!valid);
            (Some(digits), valid)
        }
    };
    let payload = UserPayload { id, name, phone };
    ValidUser {
        hash: user_hash(&payload),
        payload,
        hide_phone: u.hide_phone.unwrap_or(false),
        phone_source: source,
        phone_valid,
        unreadable_phone,
        source_hash: u.row_hash.map(|h| h ^ opts.row_salt),
        row_remembered: false,
    }
}

/// Two users with one phone: the smaller id keeps it, the greater is refused.
fn keep_unique_phones(candidates: Vec<ValidUser>, out: &mut Normalized) {
    // compare_ids's order, with each id parsed once rather than at every comparison.
    let mut order: Vec<(Option<u128>, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (id_number(&c.payload.id), i))
        .collect();
    let id = |i: usize| candidates[i].payload.id.as_str();
    order.sort_by(|&(na, a), &(nb, b)| compare_parsed((na, id(a)), (nb, id(b))));
    let mut owner_of: FastMap<&str, usize> = FastMap::default();
    let mut refused: Vec<(usize, usize)> = Vec::new();
    for &(_, i) in &order {
        if let Some(phone) = candidates[i].payload.phone.as_deref() {
            match owner_of.get(phone) {
                Some(&owner) => refused.push((i, owner)),
                None => {
                    owner_of.insert(phone, i);
                }
            }
        }
    }
    let mut keep = vec![true; candidates.len()];
    for &(i, owner) in &refused {
        keep[i] = false;
        let c = &candidates[i];
        let phone = c.payload.phone.as_deref().unwrap_or_default();
        out.rejected_user_ids.insert(c.payload.id.clone());
        out.rejected.push(Rejection {
            entity: Entity::User,
            record_id: c.payload.id.to_string(),
            code: "duplicate_phone",
            message: format!(
                "The phone {} is also the phone of user {:?}; Wazzup needs phones unique within an account",
                mask_phone(phone),
                candidates[owner].payload.id
            ),
            payload: serde_json::to_value(&c.payload).unwrap_or_default(),
        });
    }
    drop(owner_of);
    // Reserved at once: a user is large, and growing the list step by step copies it over.
    out.users.reserve(candidates.len() - refused.len());
    out.users.extend(
        candidates
            .into_iter()
            .zip(keep)
            .filter_map(|(c, keep)| keep.then_some(c)),
    );
    out.users.sort_by(|a, b| a.payload.id.cmp(&b.payload.id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::phone::{Remembered, RememberedRow};

    fn user(id: &str, name: &str, phone: Option<&str>) -> SourceUser {
        SourceUser {
            id: Some(id.into()),
            name: Some(name.into()),
            phone: phone.map(Into::into),
            hide_phone: None,
            row_hash: None,
        }
    }

    fn role(user_id: &str, channel: &str, role: &str) -> SourceRole {
        SourceRole {
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
            row_salt: 7,
        }
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
            &mut RememberedUsers::default(),
        );
        let ids: Vec<_> = n.users.iter().map(|u| u.payload.id.as_str()).collect();
        assert_eq!(ids, ["1", "2"]);
        assert_eq!(n.users[0].payload.name, "Anna");
        let codes: Vec<_> = n.rejected.iter().map(|r| r.code).collect();
        assert_eq!(codes, ["invalid_name", "invalid_id", "invalid_name"]);
    }

    #[test]
    fn an_unchanged_phone_is_taken_from_the_cache_and_a_changed_one_is_read_again() {
        let mut cache = RememberedUsers::default();
        let key = phone_source("+371 26 123 456", Some(Region::RU));
        // A cached reading that parsing would never give, to prove the cache was used.
        cache.insert(
            "1".into(),
            Remembered {
                phone: Some((key, Some("37100000000".into()), true)),
                row: None,
            },
        );
        let n = normalize_account(
            &[user("1", "A", Some("+371 26 123 456"))],
            &[],
            &ru(),
            &mut cache,
        );
        assert_eq!(n.users[0].payload.phone.as_deref(), Some("37100000000"));
        let n = normalize_account(
            &[user("1", "A", Some("+371 26 123 457"))],
            &[],
            &ru(),
            &mut cache,
        );
        assert_eq!(n.users[0].payload.phone.as_deref(), Some("37126123457"));
        let lv = NormalizeOptions {
            region: Some(Region::LV),
            role_map: BTreeMap::new(),
            row_salt: 7,
        };
        let n = normalize_account(
            &[user("1", "A", Some("+371 26 123 456"))],
            &[],
            &lv,
            &mut cache,
        );
        assert_eq!(
            n.users[0].payload.phone.as_deref(),
            Some("37126123456"),
            "another region, another key"
        );
    }

    /// A cache entry for user "1" remembering a row hashed `42` under `ru()`'s salt, with a
    /// name and phone that normalization of the row would never give.
    fn remembered_row() -> RememberedUsers {
        let mut cache = RememberedUsers::default();
        cache.insert(
            "1".into(),
            Remembered {
                phone: Some(("RU|x".into(), Some("37100000000".into()), false)),
                row: Some(RememberedRow {
                    source_hash: 42 ^ 7,
                    name: "Remembered".into(),
                    hash: "remembered-hash".into(),
                    hide_phone: true,
                }),
            },
        );
        cache
    }

    #[test]
    fn an_unchanged_row_becomes_the_remembered_user_without_being_read() {
        let mut row = user("1", "A", Some("+371 26 123 456"));
        row.row_hash = Some(42);
        let n = normalize_account(&[row.clone()], &[], &ru(), &mut remembered_row());
        let u = &n.users[0];
        assert_eq!(u.payload.name, "Remembered");
        assert_eq!(u.payload.phone.as_deref(), Some("37100000000"));
        assert_eq!((u.hash.as_str(), u.hide_phone), ("remembered-hash", true));
        assert_eq!(
            u.source_hash,
            Some(42 ^ 7),
            "remembered again when acknowledged"
        );
        assert_eq!(
            n.phone_not_valid, 1,
            "the remembered phone's validity still counts"
        );

        // Another row hash, or another salt: the row is read as it is.
        row.row_hash = Some(43);
        let n = normalize_account(&[row.clone()], &[], &ru(), &mut remembered_row());
        assert_eq!(n.users[0].payload.name, "A");
        assert_eq!(n.users[0].source_hash, Some(43 ^ 7));
        row.row_hash = Some(42);
        let other_salt = NormalizeOptions {
            row_salt: 8,
            ..ru()
        };
        let n = normalize_account(&[row], &[], &other_salt, &mut remembered_row());
        assert_eq!(n.users[0].payload.name, "A");
    }

    #[test]
    fn an_unchanged_row_of_a_repeated_id_is_still_refused() {
        let mut row = user("1", "A", None);
        row.row_hash = Some(42);
        let n = normalize_account(&[row.clone(), row], &[], &ru(), &mut remembered_row());
        assert!(n.users.is_empty());
        assert_eq!(n.rejected[0].code, "duplicate_id");
    }

    #[test]
    fn an_unchanged_row_whose_phone_was_unreadable_is_read_again_and_warned_about() {
        let mut cache = remembered_row();
        cache.get_mut("1").unwrap().phone = Some(("RU|n/a".into(), None, false));
        let mut row = user("1", "A", Some("n/a"));
        row.row_hash = Some(42);
        let n = normalize_account(&[row], &[], &ru(), &mut cache);
        assert_eq!(n.users[0].payload.name, "A");
        assert_eq!(n.phone_warnings, 1);
    }

    #[test]
    fn an_unreadable_phone_is_left_out_and_counted() {
        let n = normalize_account(
            &[user("1", "A", Some("n/a"))],
            &[],
            &ru(),
            &mut RememberedUsers::default(),
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
            &mut RememberedUsers::default(),
        );
        assert_eq!(n.users.len(), 1);
        assert_eq!(n.users[0].payload.id, "9");
        assert_eq!(n.rejected[0].record_id, "10");
        assert_eq!(n.rejected[0].code, "duplicate_phone");
        assert!(!n.rejected[0].message.contains("79123456789"));
    }

    #[test]
    fn a_phone_shared_by_three_stays_with_the_numerically_smallest_id() {
        let n = normalize_account(
            &[
                user("abc", "C", Some("+7 912 345-67-89")),
                user("10", "B", Some("+7 912 345-67-89")),
                user("9", "A", Some("89123456789")),
                user("11", "D", Some("+7 912 345-67-80")),
            ],
            &[],
            &ru(),
            &mut RememberedUsers::default(),
        );
        let kept: Vec<_> = n.users.iter().map(|u| u.payload.id.as_str()).collect();
        assert_eq!(kept, ["11", "9"], "sorted by id as text");
        let refused: Vec<_> = n.rejected.iter().map(|r| r.record_id.as_str()).collect();
        assert_eq!(refused, ["10", "abc"]);
        assert!(n.rejected.iter().all(|r| r.message.contains("user \"9\"")));
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
            &mut RememberedUsers::default(),
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
            &mut RememberedUsers::default(),
        );
        assert_eq!(n.roles.len(), 2);
        assert_eq!(n.roles[1].role, Role::Manager);
        let codes: Vec<_> = n.rejected.iter().map(|r| r.code).collect();
        assert_eq!(codes, ["unknown_role", "empty_channel_id", "unknown_user"]);
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
            &mut RememberedUsers::default(),
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
            &mut RememberedUsers::default(),
        );
        assert_eq!(n.users.len(), 2, "SQL-looking and bidi names are data");
        assert_eq!(n.rejected.len(), 3);
        let stored = n.rejected[0].payload.to_string();
        assert!(stored.len() < 1_000);
    }
}
