//! Pure decisions for one account: which users to create, update and delete (behind the
//! deletion guard, with the leavers' grace), what its settings document is, what changes
//! between two documents (for `plan --detail`, the history and the widening holds), and which
//! changes widen access. No I/O here; batches are split in `sync::batch`.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};

use serde::Serialize;

use crate::domain::{
    CrmText, Entity, LastPushed, Mirror, Normalized, Role, RoleEntry, RowValues, SettingsDoc,
    SettingsDocRef, ValidUser, mask_phone, reach,
};

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
    /// The users whose deletion the guard holds back.
    pub held_deletes: Vec<String>,
    /// Deletions refused by Wazzup earlier and not yet due again.
    pub deletes_waiting: usize,
    /// Users who left the CRM and stay in Wazzup, without access, until their grace ends:
    /// (user, when it is deleted). Those who left this cycle are in `new_leavers` too.
    pub leaving: Vec<(String, DateTime<Utc>)>,
    pub new_leavers: Vec<String>,
    /// Users the CRM returns again within their grace.
    pub returned: Vec<String>,
    /// Leavers held back by the guard (too many at once): (would leave, users mirrored), and
    /// who they are. Nothing of theirs changes.
    pub leave_blocked: Option<(usize, usize)>,
    pub held_leavers: Vec<String>,
    /// Deletions or leavings over the guard that its allow flag let through.
    pub released: bool,
}

/// Users who left the CRM: when each left, and how long they stay in Wazzup after (zero:
/// deleted at once).
#[derive(Debug, Clone, Copy)]
pub struct Departures<'a> {
    pub left: &'a HashMap<String, DateTime<Utc>>,
    pub grace: chrono::Duration,
    pub now: DateTime<Utc>,
}

/// Records Wazzup refused earlier that are not due again (or that an operator discarded):
/// (entity, record id) → the refused payload's hash. They are skipped while their payload is
/// the same; a changed payload is sent at once.
pub type Waiting = HashMap<(Entity, String), Option<String>>;

/// True when the record was refused with this very payload and is not due again.
pub fn is_waiting(waiting: &Waiting, entity: Entity, id: &str, hash: &str) -> bool {
    waiting
        .get(&(entity, id.to_string()))
        .is_some_and(|h| h.as_deref() == Some(hash))
}

/// Diffs the valid users against the mirror and the open dead letters. Users the CRM no
/// longer returns leave (`departures`): deleted at once without a grace, else kept until it
/// ends.
pub fn plan_users<'a>(
    norm: &'a Normalized,
    mirror: &Mirror,
    (pending, waiting): (&HashSet<String>, &Waiting),
    delete_missing: bool,
    guard: DeleteGuard,
    departures: Departures<'_>,
) -> UserPlan<'a> {
    let mut plan = UserPlan::default();
    for u in &norm.users {
        match mirror.get(&u.payload.id) {
            Some(h) if *h == u.hash => plan.unchanged += 1,
            in_mirror => {
                // Refused earlier with this very payload: wait for its time, unless it changed.
                if is_waiting(waiting, Entity::User, &u.payload.id, &u.hash) {
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
        let present: foldhash::HashSet<&str> =
            norm.users.iter().map(|u| u.payload.id.as_str()).collect();
        // Users sent but never recorded may be in Wazzup too: they are deleted as well.
        let known: foldhash::HashSet<&str> = mirror
            .keys()
            .map(CrmText::as_str)
            .chain(pending.iter().map(String::as_str))
            .collect();
        let mut deletes: Vec<String> = known
            .into_iter()
            .filter(|id| !present.contains(id) && !norm.rejected_user_ids.contains(*id))
            .map(str::to_string)
            .collect();
        deletes.sort();
        let before = deletes.len();
        deletes.retain(|id| !waiting.contains_key(&(Entity::Delete, id.clone())));
        plan.deletes_waiting = before - deletes.len();
        let synced = mirror.len()
            + pending
                .iter()
                .filter(|p| !mirror.contains_key(p.as_str()))
                .count();
        if departures.grace > chrono::Duration::zero() {
            plan_departures(&mut plan, deletes, mirror, synced, guard, departures);
        } else if guard.over(deletes.len(), synced) && guard.allowed {
            plan.released = true;
            plan.deletes = deletes;
        } else if guard.too_many(deletes.len(), synced) {
            plan.deletes_blocked = Some((deletes.len(), synced));
            plan.held_deletes = deletes;
        } else {
            plan.deletes = deletes;
        }
        plan.returned = norm
            .users
            .iter()
            .filter(|u| departures.left.contains_key(u.payload.id.as_str()))
            .map(|u| u.payload.id.to_string())
            .collect();
    }
    plan
}

impl DeleteGuard {
    /// More of the account's `synced` users than the guard lets go at once, and not allowed.
    pub fn too_many(&self, going: usize, synced: usize) -> bool {
        !self.allowed && self.over(going, synced)
    }

    /// More than the guard's share, allowed or not.
    pub fn over(&self, going: usize, synced: usize) -> bool {
        going > self.min && (going as u128) * 100 > (synced as u128) * self.max_percent as u128
    }
}

/// With a grace: users the CRM no longer returns stay in Wazzup until it ends, then go; users
/// never acknowledged go at once. Too many leaving at once are held, all of them.
fn plan_departures(
    plan: &mut UserPlan<'_>,
    gone: Vec<String>,
    mirror: &Mirror,
    synced: usize,
    guard: DeleteGuard,
    d: Departures<'_>,
) {
    let mut fresh = Vec::new();
    for id in gone {
        match d.left.get(&id) {
            _ if !mirror.contains_key(id.as_str()) => plan.deletes.push(id),
            Some(left) if *left + d.grace <= d.now => plan.deletes.push(id),
            Some(left) => plan.leaving.push((id, *left + d.grace)),
            None => fresh.push(id),
        }
    }
    if guard.too_many(fresh.len(), synced) {
        plan.leave_blocked = Some((fresh.len(), synced));
        plan.held_leavers = fresh;
    } else {
        plan.released = guard.over(fresh.len(), synced);
        plan.leaving
            .extend(fresh.iter().map(|id| (id.clone(), d.now + d.grace)));
        plan.new_leavers = fresh;
    }
    plan.leaving.sort();
}

/// The account's settings document over the users that are in Wazzup.
///
/// A user refused locally but still in Wazzup keeps the roles it was last synced with,
/// so a broken CRM row never silently strips someone's access; so does a user whose leaving
/// the guard holds back (`held`).
pub fn settings_doc<'a>(
    norm: &'a Normalized,
    in_wazzup: &foldhash::HashSet<&str>,
    (previous, held): (Option<&'a SettingsDoc>, &[String]),
    push_events_for_managers: bool,
) -> SettingsDocRef<'a> {
    let mut doc = SettingsDocRef {
        user_roles: norm
            .roles
            .iter()
            .filter(|r| in_wazzup.contains(r.user_id.as_str()))
            .collect(),
        hide_phone_numbers_for_user_ids: norm
            .users
            .iter()
            .filter(|u| u.hide_phone && in_wazzup.contains(u.payload.id.as_str()))
            .map(|u| u.payload.id.as_str())
            .collect(),
        push_input_output_message_events_for_managers: push_events_for_managers,
    };
    if let Some(prev) = previous {
        let held: HashSet<&str> = held.iter().map(String::as_str).collect();
        let kept = |id: &str| {
            (norm.rejected_user_ids.contains(id) || held.contains(id)) && in_wazzup.contains(id)
        };
        doc.user_roles
            .extend(prev.user_roles.iter().filter(|r| kept(&r.user_id)));
        doc.hide_phone_numbers_for_user_ids.extend(
            prev.hide_phone_numbers_for_user_ids
                .iter()
                .map(String::as_str)
                .filter(|id| kept(id)),
        );
    }
    doc.canonicalize();
    doc
}

/// True when the settings document was refused before and is not yet due again.
pub fn settings_waiting(waiting: &Waiting, hash: &str) -> bool {
    is_waiting(waiting, Entity::Settings, SETTINGS_RECORD, hash)
}

/// One record of `plan --detail`: what a cycle would do to one user or one of its role rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanRecord {
    pub account_id: String,
    /// None for a change of the whole account (its push flag).
    pub user_id: Option<String>,
    #[serde(flatten)]
    pub change: Change,
    /// Set only on changes that give a user more access than before.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub widens_access: bool,
}

/// A role row's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Access {
    pub role: Role,
    pub allow_get_new_clients: bool,
}

impl Access {
    fn of(r: &RoleEntry) -> Self {
        Self {
            role: r.role,
            allow_get_new_clients: r.allow_get_new_clients,
        }
    }
}

/// A field's value before and after; phones masked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// What changes, by kind of record. The names (the `action` of `plan --detail`) are those of
/// the history's rows (`changes.action`); `delete_held`, `leaving`, `leave_held` and
/// `unreadable_phone` only plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Change {
    UserCreated {
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        phone: Option<String>,
    },
    UserUpdated {
        changes: BTreeMap<&'static str, FieldChange>,
    },
    UserDeleted,
    /// A deletion the mass-deletion guard holds back.
    DeleteHeld,
    /// Left the CRM: its access is revoked, and its user deleted from Wazzup at `delete_at`.
    Leaving {
        delete_at: DateTime<Utc>,
    },
    /// A leaving the guard holds back (too many at once): nothing of the user changes.
    LeaveHeld,
    RoleGranted {
        channel_id: String,
        #[serde(flatten)]
        access: Access,
    },
    /// The role on a channel changes (and perhaps whether new clients come).
    RoleChanged {
        channel_id: String,
        from: Access,
        to: Access,
    },
    /// Only "receives new clients" turns on, or off, on a channel.
    NewClientsOn {
        channel_id: String,
        from: Access,
        to: Access,
    },
    NewClientsOff {
        channel_id: String,
        from: Access,
        to: Access,
    },
    RoleRevoked {
        channel_id: String,
        #[serde(flatten)]
        access: Access,
    },
    /// The user's contacts' phone numbers become hidden, or shown.
    PhoneHidden,
    PhoneShown,
    /// The account's supervisors start, or stop, receiving notifications from every chat.
    PushForManagersOn,
    PushForManagersOff,
    /// The CRM's phone could not be read: the user is sent without one.
    UnreadablePhone {
        phone: String,
    },
    /// Refused before reaching Wazzup; a dead letter says why.
    Refused {
        entity: &'static str,
        record_id: String,
        code: &'static str,
        reason: String,
    },
}

impl Change {
    /// The record's action, as `plan --detail` and the history name it.
    pub fn action(&self) -> &'static str {
        match self {
            Change::UserCreated { .. } => "user_created",
            Change::UserUpdated { .. } => "user_updated",
            Change::UserDeleted => "user_deleted",
            Change::DeleteHeld => "delete_held",
            Change::Leaving { .. } => "leaving",
            Change::LeaveHeld => "leave_held",
            Change::RoleGranted { .. } => "role_granted",
            Change::RoleChanged { .. } => "role_changed",
            Change::NewClientsOn { .. } => "new_clients_on",
            Change::NewClientsOff { .. } => "new_clients_off",
            Change::RoleRevoked { .. } => "role_revoked",
            Change::PhoneHidden => "phone_hidden",
            Change::PhoneShown => "phone_shown",
            Change::PushForManagersOn => "push_for_managers_on",
            Change::PushForManagersOff => "push_for_managers_off",
            Change::UnreadablePhone { .. } => "unreadable_phone",
            Change::Refused { .. } => "refused",
        }
    }
}

/// True when a role row going from `before` to `after` (None: no row) gives more access: a
/// manager or auditor row added, a wider role, or new clients turned on. The rule of
/// `plan --detail` (through [`doc_diff`]) and of `changes.widens_access`.
pub fn widens(before: Option<Access>, after: Option<Access>) -> bool {
    match (before, after) {
        (None, Some(a)) => reach(a.role) > reach(Role::Seller),
        (Some(b), Some(a)) => {
            reach(a.role) > reach(b.role) || (a.allow_get_new_clients && !b.allow_get_new_clients)
        }
        _ => false,
    }
}

/// The settings document and users a dry run compares against.
pub struct DetailInput<'a> {
    pub account_id: &'a str,
    pub norm: &'a Normalized,
    pub plan: &'a UserPlan<'a>,
    pub mirrored: &'a HashMap<String, LastPushed>,
    pub previous_doc: Option<&'a SettingsDoc>,
    pub next_doc: &'a SettingsDoc,
}

/// Every record a cycle would change, one per user or role row, in a stable order.
pub fn detail(input: &DetailInput<'_>) -> Vec<PlanRecord> {
    let record = |user_id: &str, change: Change, widens_access: bool| PlanRecord {
        account_id: input.account_id.to_string(),
        user_id: Some(user_id.to_string()),
        change,
        widens_access,
    };
    let mut out = Vec::new();
    for u in &input.plan.creates {
        let change = Change::UserCreated {
            name: u.payload.name.to_string(),
            phone: u.payload.phone.as_deref().map(mask_phone),
        };
        out.push(record(&u.payload.id, change, false));
    }
    for u in &input.plan.updates {
        let before = input
            .mirrored
            .get(u.payload.id.as_str())
            .cloned()
            .unwrap_or_default();
        let changes = field_changes(&before, &u.payload.name, u.payload.phone.as_deref());
        out.push(record(
            &u.payload.id,
            Change::UserUpdated { changes },
            false,
        ));
    }
    for id in &input.plan.deletes {
        out.push(record(id, Change::UserDeleted, false));
    }
    for id in &input.plan.held_deletes {
        out.push(record(id, Change::DeleteHeld, false));
    }
    for (id, delete_at) in &input.plan.leaving {
        let change = Change::Leaving {
            delete_at: *delete_at,
        };
        out.push(record(id, change, false));
    }
    for id in &input.plan.held_leavers {
        out.push(record(id, Change::LeaveHeld, false));
    }
    let (previous, next) = (
        input.previous_doc.map(SettingsDoc::view),
        input.next_doc.view(),
    );
    out.extend(
        doc_diff(previous.as_ref(), &next)
            .into_iter()
            .map(|d| PlanRecord {
                account_id: input.account_id.to_string(),
                user_id: d.user_id().map(str::to_string),
                change: d.change(),
                widens_access: d.widens(),
            }),
    );
    for u in &input.norm.users {
        if let Some(phone) = &u.unreadable_phone {
            let change = Change::UnreadablePhone {
                phone: phone.clone(),
            };
            out.push(record(&u.payload.id, change, false));
        }
    }
    for r in &input.norm.rejected {
        let user_id = r.record_id.split('/').next().unwrap_or_default();
        let change = Change::Refused {
            entity: r.entity.as_str(),
            record_id: r.record_id.clone(),
            code: r.code,
            reason: r.message.clone(),
        };
        out.push(record(user_id, change, false));
    }
    out
}

/// A user's name and phone that change from what Wazzup acknowledged (phones masked).
fn field_changes(
    before: &LastPushed,
    name: &str,
    phone: Option<&str>,
) -> BTreeMap<&'static str, FieldChange> {
    let mut changes = BTreeMap::new();
    if before.name.as_deref() != Some(name) {
        changes.insert(
            "name",
            FieldChange {
                from: before.name.clone(),
                to: Some(name.to_string()),
            },
        );
    }
    if before.phone.as_deref() != phone {
        changes.insert(
            "phone",
            FieldChange {
                from: before.phone.as_deref().map(mask_phone),
                to: phone.map(mask_phone),
            },
        );
    }
    changes
}

/// One difference between two settings documents: a role row granted (`from` None) or changed,
/// a role row revoked, a user's contacts' phones hidden or shown, or the account's push flag.
/// Borrowed from the documents: an account's cold sync has thousands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocDiff<'a> {
    Role {
        user_id: &'a str,
        channel_id: &'a str,
        from: Option<Access>,
        to: Access,
    },
    Revoked {
        user_id: &'a str,
        channel_id: &'a str,
        access: Access,
    },
    Hidden {
        user_id: &'a str,
        hidden: bool,
    },
    Push {
        on: bool,
    },
}

impl DocDiff<'_> {
    /// The change as `plan --detail` and the history name it.
    pub fn change(&self) -> Change {
        match *self {
            DocDiff::Role {
                channel_id,
                from,
                to,
                ..
            } => {
                let channel_id = channel_id.to_string();
                match from {
                    None => Change::RoleGranted {
                        channel_id,
                        access: to,
                    },
                    Some(from) if from.role != to.role => Change::RoleChanged {
                        channel_id,
                        from,
                        to,
                    },
                    Some(from) if to.allow_get_new_clients => Change::NewClientsOn {
                        channel_id,
                        from,
                        to,
                    },
                    Some(from) => Change::NewClientsOff {
                        channel_id,
                        from,
                        to,
                    },
                }
            }
            DocDiff::Revoked {
                channel_id, access, ..
            } => Change::RoleRevoked {
                channel_id: channel_id.to_string(),
                access,
            },
            DocDiff::Hidden { hidden: true, .. } => Change::PhoneHidden,
            DocDiff::Hidden { hidden: false, .. } => Change::PhoneShown,
            DocDiff::Push { on: true } => Change::PushForManagersOn,
            DocDiff::Push { on: false } => Change::PushForManagersOff,
        }
    }

    /// The action's name, without building the change.
    pub fn action(&self) -> &'static str {
        match *self {
            DocDiff::Role { from: None, .. } => "role_granted",
            DocDiff::Role {
                from: Some(f), to, ..
            } if f.role != to.role => "role_changed",
            DocDiff::Role { to, .. } if to.allow_get_new_clients => "new_clients_on",
            DocDiff::Role { .. } => "new_clients_off",
            DocDiff::Revoked { .. } => "role_revoked",
            DocDiff::Hidden { hidden: true, .. } => "phone_hidden",
            DocDiff::Hidden { hidden: false, .. } => "phone_shown",
            DocDiff::Push { on: true } => "push_for_managers_on",
            DocDiff::Push { on: false } => "push_for_managers_off",
        }
    }

    /// Whether it gives the user more access ([`widens`]).
    pub fn widens(&self) -> bool {
        match *self {
            DocDiff::Role { from, to, .. } => widens(from, Some(to)),
            _ => false,
        }
    }

    /// Its channel, and its values before and after as the history keeps them: a role row's
    /// (role, new clients), or (None, flag) for a phone's hidden flag or the push flag.
    pub fn values(&self) -> (Option<&str>, Option<RowValues>, Option<RowValues>) {
        let role = |a: Access| (Some(a.role.as_str()), a.allow_get_new_clients);
        match *self {
            DocDiff::Role {
                channel_id,
                from,
                to,
                ..
            } => (Some(channel_id), from.map(role), Some(role(to))),
            DocDiff::Revoked {
                channel_id, access, ..
            } => (Some(channel_id), Some(role(access)), None),
            DocDiff::Hidden { hidden, .. } => (None, Some((None, !hidden)), Some((None, hidden))),
            DocDiff::Push { on } => (None, Some((None, !on)), Some((None, on))),
        }
    }

    /// The user it concerns; None for the account's push flag.
    pub fn user_id(&self) -> Option<&str> {
        match *self {
            DocDiff::Role { user_id, .. }
            | DocDiff::Revoked { user_id, .. }
            | DocDiff::Hidden { user_id, .. } => Some(user_id),
            DocDiff::Push { .. } => None,
        }
    }
}

/// A 64-bit hash of one role row: its user, channel, role and new-clients flag. Kept per row
/// of the last acknowledged document (`accounts.settings_roles`), so that a push finds the
/// rows that changed by their hashes, without reading the document back. Fixed within a build
/// (every process and replica agrees); should a later build hash otherwise, its first push of
/// each account reads every row back once, and records the same rows.
pub fn role_hash(r: &RoleEntry) -> i64 {
    use std::hash::BuildHasher;
    const STATE: foldhash::quality::FixedState = foldhash::quality::FixedState::with_seed(0x5e771);
    STATE.hash_one((
        r.user_id.as_str(),
        r.channel_id.as_str(),
        r.role.as_str(),
        r.allow_get_new_clients,
    )) as i64
}

/// Between two documents' role-row hashes: the positions of `old`'s rows that `new` lacks,
/// and of `new`'s rows that `old` lacks. Every other row is in both, unchanged.
pub fn changed_rows(old: &[i64], new: &[i64]) -> (Vec<usize>, Vec<usize>) {
    let missing = |from: &[i64], other: &[i64]| -> Vec<usize> {
        let other: foldhash::HashSet<i64> = other.iter().copied().collect();
        (0..from.len())
            .filter(|&i| !other.contains(&from[i]))
            .collect()
    };
    (missing(old, new), missing(new, old))
}

/// What changes from one settings document to the next, by user, then channel. Both are
/// sorted by those keys first (a canonical document already is, and costs one pass), so one
/// pass over each finds every difference. Of two rows with the same user and channel, the
/// last counts.
pub fn doc_diff<'a>(
    before: Option<&'a SettingsDocRef<'_>>,
    after: &'a SettingsDocRef<'_>,
) -> Vec<DocDiff<'a>> {
    type Row<'r> = (&'r str, &'r str, Access);
    fn rows<'r>(roles: &[&'r RoleEntry]) -> Vec<Row<'r>> {
        let mut rows: Vec<Row<'r>> = roles
            .iter()
            .map(|r| (r.user_id.as_str(), r.channel_id.as_str(), Access::of(r)))
            .collect();
        // Stable: of equal keys, the last stays last.
        rows.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let mut kept: Vec<Row<'r>> = Vec::with_capacity(rows.len());
        for row in rows {
            match kept.last_mut() {
                Some(last) if (last.0, last.1) == (row.0, row.1) => *last = row,
                _ => kept.push(row),
            }
        }
        kept
    }
    let (old, new) = (
        rows(before.map_or(&[], |d| &d.user_roles)),
        rows(&after.user_roles),
    );
    let mut out: Vec<DocDiff<'a>> = pair_sorted(&old, &new, |r| (r.0, r.1))
        .into_iter()
        .filter_map(|pair| match pair {
            (Some(o), Some(n)) if o.2 == n.2 => None,
            (Some((user_id, channel_id, access)), None) => Some(DocDiff::Revoked {
                user_id,
                channel_id,
                access,
            }),
            (from, Some((user_id, channel_id, to))) => Some(DocDiff::Role {
                user_id,
                channel_id,
                from: from.map(|f| f.2),
                to,
            }),
            (None, None) => None,
        })
        .collect();
    let ids = |list: &[&'a str]| {
        let mut list = list.to_vec();
        list.sort_unstable();
        list.dedup();
        list
    };
    let was = ids(before.map_or(&[], |d| &d.hide_phone_numbers_for_user_ids));
    let now = ids(&after.hide_phone_numbers_for_user_ids);
    out.extend(
        pair_sorted(&was, &now, |id| *id)
            .into_iter()
            .filter_map(|pair| match pair {
                (Some(user_id), None) => Some(DocDiff::Hidden {
                    user_id,
                    hidden: false,
                }),
                (None, Some(user_id)) => Some(DocDiff::Hidden {
                    user_id,
                    hidden: true,
                }),
                _ => None,
            }),
    );
    let push = after.push_input_output_message_events_for_managers;
    if before.is_some_and(|d| d.push_input_output_message_events_for_managers != push) {
        out.push(DocDiff::Push { on: push });
    }
    out
}

/// Pairs the items of two lists sorted by `key`, and without repeated keys: (old, new), None
/// on the side that lacks the key.
fn pair_sorted<T: Copy, K: Ord>(
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> K,
) -> Vec<(Option<T>, Option<T>)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < old.len() || j < new.len() {
        let order = match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) => key(o).cmp(&key(n)),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        let pair = match order {
            std::cmp::Ordering::Less => (Some(old[i]), None),
            std::cmp::Ordering::Greater => (None, Some(new[j])),
            std::cmp::Ordering::Equal => (Some(old[i]), Some(new[j])),
        };
        i += usize::from(pair.0.is_some());
        j += usize::from(pair.1.is_some());
        out.push(pair);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{NormalizeOptions, Role, SourceRole, SourceUser, normalize_account};

    fn norm(ids: &[&str]) -> Normalized {
        let users: Vec<SourceUser> = ids
            .iter()
            .map(|id| SourceUser {
                id: Some((*id).into()),
                name: Some(format!("User {id}").into()),
                hide_phone: Some(*id == "2"),
                ..Default::default()
            })
            .collect();
        let roles: Vec<SourceRole> = ids
            .iter()
            .map(|id| SourceRole {
                user_id: Some((*id).into()),
                channel_id: Some("ch".into()),
                role: Some("seller".into()),
                allow_get_new_clients: Some(true),
            })
            .collect();
        normalize_account(
            &users,
            &roles,
            &NormalizeOptions::default(),
            &mut Default::default(),
        )
    }

    const GUARD: DeleteGuard = DeleteGuard {
        max_percent: 20,
        min: 2,
        allowed: false,
    };

    /// `plan_users` with no grace: users who leave are deleted at once.
    fn plan_users_now<'a>(
        n: &'a Normalized,
        mirror: &Mirror,
        pending: &HashSet<String>,
        waiting: &Waiting,
        delete_missing: bool,
        guard: DeleteGuard,
    ) -> UserPlan<'a> {
        let left = HashMap::new();
        let now = Departures {
            left: &left,
            grace: chrono::Duration::zero(),
            now: Utc::now(),
        };
        plan_users(n, mirror, (pending, waiting), delete_missing, guard, now)
    }

    #[test]
    fn with_a_grace_leavers_stay_until_it_ends_and_too_many_at_once_are_held() {
        let n = norm(&["1"]);
        let now = Utc::now();
        let hour = chrono::Duration::hours(1);
        let mut mirror = Mirror::default();
        for id in ["1", "fresh", "in-grace", "expired"] {
            mirror.insert(id.into(), "h".to_string());
        }
        let left: HashMap<String, DateTime<Utc>> = [
            ("in-grace".to_string(), now - hour / 2),
            ("expired".to_string(), now - hour * 2),
            ("1".to_string(), now - hour / 4),
        ]
        .into();
        let pending: HashSet<String> = ["sent-only".to_string()].into();
        let d = Departures {
            left: &left,
            grace: hour,
            now,
        };
        let guard = DeleteGuard { min: 10, ..GUARD };
        let p = plan_users(&n, &mirror, (&pending, &Waiting::new()), true, guard, d);
        assert_eq!(
            p.deletes,
            ["expired", "sent-only"],
            "the grace passed, or never acknowledged"
        );
        assert_eq!(p.new_leavers, ["fresh"]);
        let leaving: Vec<(&str, DateTime<Utc>)> = p
            .leaving
            .iter()
            .map(|(id, at)| (id.as_str(), *at))
            .collect();
        assert_eq!(
            leaving,
            [("fresh", now + hour), ("in-grace", now + hour / 2)]
        );
        assert_eq!(p.returned, ["1"], "back within its grace");
        assert!(p.leave_blocked.is_none());

        // Too many at once: every new leaver is held, nothing of theirs changes.
        let strict = DeleteGuard {
            min: 0,
            max_percent: 10,
            allowed: false,
        };
        let p = plan_users(&n, &mirror, (&pending, &Waiting::new()), true, strict, d);
        assert_eq!(p.leave_blocked, Some((1, 5)));
        assert_eq!(p.held_leavers, ["fresh"]);
        assert!(p.new_leavers.is_empty());
        let released = DeleteGuard {
            allowed: true,
            ..strict
        };
        let p = plan_users(&n, &mirror, (&pending, &Waiting::new()), true, released, d);
        assert!(p.released && p.new_leavers == ["fresh"]);
    }

    #[test]
    fn new_changed_unchanged_and_gone_users_are_told_apart() {
        let n = norm(&["1", "2", "3"]);
        let mut mirror = Mirror::default();
        mirror.insert("1".into(), n.users[0].hash.clone());
        mirror.insert("2".into(), "old".to_string());
        mirror.insert("9".into(), "x".to_string());
        let p = plan_users_now(
            &n,
            &mirror,
            &HashSet::new(),
            &Waiting::new(),
            true,
            DeleteGuard { min: 10, ..GUARD },
        );
        assert_eq!(p.unchanged, 1);
        assert_eq!(p.updates[0].payload.id, "2");
        assert_eq!(p.creates[0].payload.id, "3");
        assert_eq!(p.deletes, ["9"]);
        let p = plan_users_now(&n, &mirror, &HashSet::new(), &Waiting::new(), false, GUARD);
        assert!(p.deletes.is_empty());
    }

    #[test]
    fn the_guard_holds_back_mass_deletion_unless_allowed() {
        let n = norm(&[]);
        let mirror: Mirror = (0..10)
            .map(|i| (i.to_string().into(), "h".to_string()))
            .collect();
        let p = plan_users_now(&n, &mirror, &HashSet::new(), &Waiting::new(), true, GUARD);
        assert_eq!(p.deletes_blocked, Some((10, 10)));
        assert!(p.deletes.is_empty());
        let p = plan_users_now(
            &n,
            &mirror,
            &HashSet::new(),
            &Waiting::new(),
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
        let waiting = |hash: &str| -> Waiting {
            [((Entity::User, "1".to_string()), Some(hash.to_string()))].into()
        };
        let p = plan_users_now(
            &n,
            &Mirror::default(),
            &HashSet::new(),
            &waiting(&n.users[0].hash),
            true,
            GUARD,
        );
        assert_eq!((p.waiting, p.creates.len()), (1, 0));
        let p = plan_users_now(
            &n,
            &Mirror::default(),
            &HashSet::new(),
            &waiting("other"),
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
        let in_wazzup: foldhash::HashSet<&str> = ["1", "2", "4"].into_iter().collect();
        let doc = settings_doc(&n, &in_wazzup, (Some(&previous), &[]), true);
        let users: Vec<_> = doc.user_roles.iter().map(|r| r.user_id.as_str()).collect();
        assert_eq!(users, ["1", "2", "4"]);
        assert_eq!(doc.hide_phone_numbers_for_user_ids, ["2", "4"]);
        assert!(doc.push_input_output_message_events_for_managers);
    }

    fn entry(user: &str, channel: &str, role: Role, new_clients: bool) -> RoleEntry {
        RoleEntry {
            user_id: user.into(),
            channel_id: channel.into(),
            role,
            allow_get_new_clients: new_clients,
        }
    }

    fn doc(roles: Vec<RoleEntry>) -> SettingsDoc {
        SettingsDoc {
            user_roles: roles,
            ..Default::default()
        }
    }

    #[test]
    fn only_changes_that_give_more_access_are_marked_as_widening() {
        use Role::*;
        let before = doc(vec![
            entry("s2m", "c", Seller, false),
            entry("s2a", "c", Seller, false),
            entry("a2m", "c", Auditor, false),
            entry("m2s", "c", Manager, true),
            entry("on", "c", Seller, false),
            entry("off", "c", Seller, true),
            entry("gone", "c", Manager, false),
            entry("same", "c", Manager, true),
        ]);
        let after = doc(vec![
            entry("s2m", "c", Manager, false),
            entry("s2a", "c", Auditor, false),
            entry("a2m", "c", Manager, false),
            entry("m2s", "c", Seller, true),
            entry("on", "c", Seller, true),
            entry("off", "c", Seller, false),
            entry("same", "c", Manager, true),
            entry("new-m", "c", Manager, false),
            entry("new-a", "c", Auditor, false),
            entry("new-s", "c", Seller, false),
        ]);
        let (before, after) = (before.view(), after.view());
        let diff = doc_diff(Some(&before), &after);
        let widening: Vec<&str> = diff
            .iter()
            .filter(|d| d.widens())
            .filter_map(|d| d.user_id())
            .collect();
        assert_eq!(widening, ["a2m", "new-a", "new-m", "on", "s2a", "s2m"]);
        let all: Vec<(&str, &str)> = diff
            .iter()
            .map(|d| (d.user_id().unwrap(), d.action()))
            .collect();
        assert_eq!(
            all,
            [
                ("a2m", "role_changed"),
                ("gone", "role_revoked"),
                ("m2s", "role_changed"),
                ("new-a", "role_granted"),
                ("new-m", "role_granted"),
                ("new-s", "role_granted"),
                ("off", "new_clients_off"),
                ("on", "new_clients_on"),
                ("s2a", "role_changed"),
                ("s2m", "role_changed"),
            ]
        );
        for d in &diff {
            assert_eq!(d.action(), d.change().action(), "{d:?}");
        }
    }

    #[test]
    fn the_detail_names_every_record_with_masked_phones_and_the_fields_that_change() {
        let mut n = norm(&["1", "2", "3"]);
        n.users[2].payload.phone = Some("37126123456".into());
        n.users[2].hash = "new".into();
        n.users[1].unreadable_phone = Some("12".into());
        let mut mirror = Mirror::default();
        mirror.insert("1".into(), n.users[0].hash.clone());
        mirror.insert("3".into(), "old".to_string());
        mirror.insert("9".into(), "old".to_string());
        let p = plan_users_now(
            &n,
            &mirror,
            &HashSet::new(),
            &Waiting::new(),
            true,
            DeleteGuard { min: 10, ..GUARD },
        );
        let mirrored: HashMap<String, LastPushed> = [(
            "3".to_string(),
            LastPushed {
                name: Some("User 3".into()),
                phone: Some("37126000000".into()),
            },
        )]
        .into();
        let next = doc(vec![]);
        let records = detail(&DetailInput {
            account_id: "a1",
            norm: &n,
            plan: &p,
            mirrored: &mirrored,
            previous_doc: None,
            next_doc: &next,
        });
        let json = serde_json::to_value(&records).unwrap();
        let actions: Vec<(&str, &str)> = json
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["user_id"].as_str().unwrap(),
                    r["action"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            actions,
            [
                ("2", "user_created"),
                ("3", "user_updated"),
                ("9", "user_deleted"),
                ("2", "unreadable_phone")
            ]
        );
        assert_eq!(
            json[1]["changes"],
            serde_json::json!({"phone": {"from": "371 *** *00", "to": "371 *** *56"}})
        );
        assert!(
            json.as_array()
                .unwrap()
                .iter()
                .all(|r| r["account_id"] == "a1" && r.get("widens_access").is_none())
        );
    }
}
