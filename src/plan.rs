//! Pure decisions: what to push for an account, what its settings document is, how to split a
//! rejected batch. No I/O here.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::domain::{Normalized, SettingsDoc, ValidUser};
use crate::state::OpenDeadLetter;

/// Record id of the account's whole settings document in the dead-letter table.
pub const SETTINGS_RECORD: &str = "(document)";

/// The deletion guard's limits.
#[derive(Debug, Clone, Copy)]
pub struct DeleteGuard {
    pub max_percent: u32,
    pub min: usize,
    pub allowed: bool,
}

/// What one account's cycle will send for its users.
#[derive(Debug, Default)]
pub struct UserPlan<'a> {
    /// Users in the mirror whose payload changed, then users new to Wazzup.
    pub updates: Vec<&'a ValidUser>,
    pub creates: Vec<&'a ValidUser>,
    pub unchanged: usize,
    /// Refused by Wazzup earlier, unchanged, and not yet due again.
    pub waiting: usize,
    pub deletes: Vec<String>,
    /// Deletions held back by the guard: (would delete, users mirrored).
    pub deletes_blocked: Option<(usize, usize)>,
    /// Deletions refused by Wazzup earlier and not yet due again.
    pub deletes_waiting: usize,
}

fn waiting_set<'a>(
    open: &'a [OpenDeadLetter],
    entity: &str,
    now: DateTime<Utc>,
) -> HashMap<&'a str, Option<&'a str>> {
    // Refused and not yet due, or discarded by an operator: skipped while the payload is the same.
    open.iter()
        .filter(|d| d.entity == entity && d.kind == "rejected")
        .filter(|d| !d.is_open() || d.next_attempt_at.is_some_and(|t| t > now))
        .map(|d| (d.record_id.as_str(), d.payload_hash.as_deref()))
        .collect()
}

/// Diffs the valid users against the mirror and the open dead letters.
pub fn plan_users<'a>(
    norm: &'a Normalized,
    mirror: &HashMap<String, String>,
    pending: &HashSet<String>,
    open: &[OpenDeadLetter],
    now: DateTime<Utc>,
    delete_missing: bool,
    guard: DeleteGuard,
) -> UserPlan<'a> {
    let mut plan = UserPlan::default();
    let waiting = waiting_set(open, "user", now);
    for u in &norm.users {
        match mirror.get(&u.payload.id) {
            Some(h) if *h == u.hash => plan.unchanged += 1,
            in_mirror => {
                // Refused earlier with this very payload: wait for its time, unless it changed.
                if waiting.get(u.payload.id.as_str()) == Some(&Some(u.hash.as_str())) {
                    plan.waiting += 1;
                } else if in_mirror.is_some() {
                    plan.updates.push(u);
                } else {
                    plan.creates.push(u);
                }
            }
        }
    }
    if delete_missing {
        let present: HashSet<&str> = norm.users.iter().map(|u| u.payload.id.as_str()).collect();
        let delete_waiting = waiting_set(open, "delete", now);
        // Users sent but never recorded may be in Wazzup too: they are deleted as well.
        let known: HashSet<&String> = mirror.keys().chain(pending.iter()).collect();
        let mut deletes: Vec<String> = known
            .into_iter()
            .filter(|id| !present.contains(id.as_str()) && !norm.rejected_user_ids.contains(*id))
            .cloned()
            .collect();
        deletes.sort();
        let before = deletes.len();
        deletes.retain(|id| !delete_waiting.contains_key(id.as_str()));
        plan.deletes_waiting = before - deletes.len();
        let synced = mirror.len() + pending.iter().filter(|p| !mirror.contains_key(*p)).count();
        let too_many = deletes.len() > guard.min
            && (deletes.len() as u128) * 100 > (synced as u128) * guard.max_percent as u128;
        if too_many && !guard.allowed {
            plan.deletes_blocked = Some((deletes.len(), synced));
        } else {
            plan.deletes = deletes;
        }
    }
    plan
}

/// The account's settings document over the users that are in Wazzup.
///
/// A user refused locally but still in Wazzup keeps the roles it was last synced with,
/// so a broken CRM row never silently strips someone's access.
pub fn settings_doc(
    norm: &Normalized,
    in_wazzup: &HashSet<String>,
    previous: Option<&SettingsDoc>,
    push_events_for_managers: bool,
) -> SettingsDoc {
    let mut doc = SettingsDoc {
        user_roles: norm
            .roles
            .iter()
            .filter(|r| in_wazzup.contains(&r.user_id))
            .cloned()
            .collect(),
        hide_phone_numbers_for_user_ids: norm
            .users
            .iter()
            .filter(|u| u.hide_phone && in_wazzup.contains(&u.payload.id))
            .map(|u| u.payload.id.clone())
            .collect(),
        push_input_output_message_events_for_managers: push_events_for_managers,
    };
    if let Some(prev) = previous {
        let kept = |id: &String| norm.rejected_user_ids.contains(id) && in_wazzup.contains(id);
        doc.user_roles
            .extend(prev.user_roles.iter().filter(|r| kept(&r.user_id)).cloned());
        doc.hide_phone_numbers_for_user_ids.extend(
            prev.hide_phone_numbers_for_user_ids
                .iter()
                .filter(|id| kept(id))
                .cloned(),
        );
    }
    doc.canonicalize();
    doc
}

/// True when the settings document was refused before and is not yet due again.
pub fn settings_waiting(open: &[OpenDeadLetter], hash: &str, now: DateTime<Utc>) -> bool {
    waiting_set(open, "settings", now).get(SETTINGS_RECORD) == Some(&Some(hash))
}

/// What to do with a batch Wazzup refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SplitStep {
    /// The answer named the offending records: dead-letter them, resend the rest.
    Named(Vec<usize>),
    /// A single record: it is the one refused.
    Alone,
    /// Split in two at this index and send each half.
    Halve(usize),
}

/// Decides how to single out the refused records of a batch of `len`.
pub fn split_step(len: usize, indexes: &[usize]) -> SplitStep {
    let named: Vec<usize> = indexes.iter().copied().filter(|i| *i < len).collect();
    if len == 1 {
        SplitStep::Alone
    } else if !named.is_empty() && named.len() == indexes.len() {
        SplitStep::Named(named)
    } else {
        SplitStep::Halve(len / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{NormalizeOptions, Role, SourceRole, SourceUser, normalize_account};

    fn norm(ids: &[&str]) -> Normalized {
        let users: Vec<SourceUser> = ids
            .iter()
            .map(|id| SourceUser {
                id: Some(id.to_string()),
                name: Some(format!("User {id}")),
                hide_phone: Some(*id == "2"),
                ..Default::default()
            })
            .collect();
        let roles: Vec<SourceRole> = ids
            .iter()
            .map(|id| SourceRole {
                user_id: Some(id.to_string()),
                channel_id: Some("ch".into()),
                role: Some("seller".into()),
                allow_get_new_clients: Some(true),
                ..Default::default()
            })
            .collect();
        normalize_account(
            &users,
            &roles,
            &NormalizeOptions::default(),
            &Default::default(),
        )
    }

    const GUARD: DeleteGuard = DeleteGuard {
        max_percent: 20,
        min: 2,
        allowed: false,
    };

    #[test]
    fn new_changed_unchanged_and_gone_users_are_told_apart() {
        let n = norm(&["1", "2", "3"]);
        let mut mirror = HashMap::new();
        mirror.insert("1".to_string(), n.users[0].hash.clone());
        mirror.insert("2".to_string(), "old".to_string());
        mirror.insert("9".to_string(), "x".to_string());
        let p = plan_users(
            &n,
            &mirror,
            &HashSet::new(),
            &[],
            Utc::now(),
            true,
            DeleteGuard { min: 10, ..GUARD },
        );
        assert_eq!(p.unchanged, 1);
        assert_eq!(p.updates[0].payload.id, "2");
        assert_eq!(p.creates[0].payload.id, "3");
        assert_eq!(p.deletes, ["9"]);
        let p = plan_users(&n, &mirror, &HashSet::new(), &[], Utc::now(), false, GUARD);
        assert!(p.deletes.is_empty());
    }

    #[test]
    fn the_guard_holds_back_mass_deletion_unless_allowed() {
        let n = norm(&[]);
        let mirror: HashMap<String, String> =
            (0..10).map(|i| (i.to_string(), "h".to_string())).collect();
        let p = plan_users(&n, &mirror, &HashSet::new(), &[], Utc::now(), true, GUARD);
        assert_eq!(p.deletes_blocked, Some((10, 10)));
        assert!(p.deletes.is_empty());
        let p = plan_users(
            &n,
            &mirror,
            &HashSet::new(),
            &[],
            Utc::now(),
            true,
            DeleteGuard {
                allowed: true,
                ..GUARD
            },
        );
        assert_eq!(p.deletes.len(), 10);
    }

    #[test]
    fn a_user_refused_by_wazzup_waits_unless_its_payload_changed() {
        let n = norm(&["1"]);
        let dl = |hash: &str, due_in: i64| OpenDeadLetter {
            entity: "user".into(),
            record_id: "1".into(),
            kind: "rejected".into(),
            error_code: "X".into(),
            error_message: String::new(),
            payload_hash: Some(hash.into()),
            next_attempt_at: Some(Utc::now() + chrono::Duration::seconds(due_in)),
            resolution: None,
        };
        let p = plan_users(
            &n,
            &HashMap::new(),
            &HashSet::new(),
            &[dl(&n.users[0].hash, 60)],
            Utc::now(),
            true,
            GUARD,
        );
        assert_eq!((p.waiting, p.creates.len()), (1, 0));
        let p = plan_users(
            &n,
            &HashMap::new(),
            &HashSet::new(),
            &[dl("other", 60)],
            Utc::now(),
            true,
            GUARD,
        );
        assert_eq!(p.creates.len(), 1);
        let p = plan_users(
            &n,
            &HashMap::new(),
            &HashSet::new(),
            &[dl(&n.users[0].hash, -1)],
            Utc::now(),
            true,
            GUARD,
        );
        assert_eq!(p.creates.len(), 1);
    }

    #[test]
    fn settings_reference_only_users_in_wazzup_and_keep_refused_users_as_last_synced() {
        let mut n = norm(&["1", "2", "3"]);
        // User 4 is in the CRM but refused; Wazzup still has it with an earlier role.
        n.rejected_user_ids.insert("4".into());
        let previous = SettingsDoc {
            user_roles: vec![crate::domain::RoleEntry {
                user_id: "4".into(),
                channel_id: "ch".into(),
                role: Role::Auditor,
                allow_get_new_clients: false,
            }],
            hide_phone_numbers_for_user_ids: vec!["4".into()],
            push_input_output_message_events_for_managers: false,
        };
        let in_wazzup: HashSet<String> = ["1", "2", "4"].iter().map(|s| s.to_string()).collect();
        let doc = settings_doc(&n, &in_wazzup, Some(&previous), true);
        let users: Vec<_> = doc.user_roles.iter().map(|r| r.user_id.as_str()).collect();
        assert_eq!(users, ["1", "2", "4"]);
        assert_eq!(doc.hide_phone_numbers_for_user_ids, ["2", "4"]);
        assert!(doc.push_input_output_message_events_for_managers);
    }

    #[test]
    fn a_refused_batch_is_split_by_named_indexes_or_in_halves() {
        assert_eq!(split_step(100, &[3, 7]), SplitStep::Named(vec![3, 7]));
        assert_eq!(split_step(100, &[]), SplitStep::Halve(50));
        assert_eq!(split_step(3, &[5]), SplitStep::Halve(1));
        assert_eq!(split_step(1, &[]), SplitStep::Alone);
    }
}
