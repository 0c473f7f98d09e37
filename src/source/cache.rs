//! The CRM rows last read for the accounts a notification named, kept by the hash PostgreSQL
//! computes of each row. A notified cycle tells PostgreSQL which rows the daemon holds already:
//! PostgreSQL still hashes every row of the account (its fingerprint), but sends only the rows
//! whose hash is new. The rows are kept by their content's hash, so a kept row is never stale:
//! a changed row has another hash. Bounded: the accounts used longest ago go first.

use std::collections::HashMap;

use super::columns::Delta;
use crate::domain::{SourceRole, SourceUser};

/// At most this many rows (users and role rows) are kept: about 35 MB, the rows of 100
/// accounts of 1,000 users with two channels each.
pub const ROW_CACHE_ROWS: usize = 300_000;

/// The rows kept, per account.
#[derive(Debug)]
pub struct RowCache {
    accounts: HashMap<String, Kept>,
    rows: usize,
    clock: u64,
    budget: usize,
}

#[derive(Debug, Default)]
struct Kept {
    users: HashMap<i64, SourceUser>,
    roles: HashMap<i64, SourceRole>,
    used: u64,
}

/// A row PostgreSQL left out as known is not kept here (two rows of different accounts with
/// one 64-bit hash): the account must be read whole.
#[derive(Debug, PartialEq, Eq)]
pub struct NotKept;

impl Default for RowCache {
    fn default() -> Self {
        Self::new(ROW_CACHE_ROWS)
    }
}

impl RowCache {
    pub fn new(budget: usize) -> Self {
        Self {
            accounts: HashMap::new(),
            rows: 0,
            clock: 0,
            budget,
        }
    }

    /// The hashes of the users and of the role rows kept for these accounts: what PostgreSQL
    /// need not send.
    pub(crate) fn known<'a>(
        &self,
        accounts: impl IntoIterator<Item = &'a str>,
    ) -> (Vec<i64>, Vec<i64>) {
        let (mut users, mut roles) = (Vec::new(), Vec::new());
        for kept in accounts.into_iter().filter_map(|a| self.accounts.get(a)) {
            users.extend(kept.users.keys());
            roles.extend(kept.roles.keys());
        }
        (users, roles)
    }

    /// An account's rows: those PostgreSQL sent, and those it left out as known, from here.
    /// The account's entry then holds exactly these rows. When a row left out is not here, the
    /// entry is dropped, so that the next read sends the account whole.
    pub(crate) fn resolve(
        &mut self,
        account: &str,
        users: Delta<SourceUser>,
        roles: Delta<SourceRole>,
    ) -> Result<(Vec<SourceUser>, Vec<SourceRole>), NotKept> {
        let old = self.accounts.remove(account).unwrap_or_default();
        self.rows -= old.users.len() + old.roles.len();
        let (users, kept_users) = rebuild(users, old.users).ok_or(NotKept)?;
        let (roles, kept_roles) = rebuild(roles, old.roles).ok_or(NotKept)?;
        self.clock += 1;
        self.rows += kept_users.len() + kept_roles.len();
        self.accounts.insert(
            account.to_string(),
            Kept {
                users: kept_users,
                roles: kept_roles,
                used: self.clock,
            },
        );
        Ok((users, roles))
    }

    /// Drops the accounts used longest ago until at most the budget's rows are kept. Called
    /// after a read, never during one: every row a read left out stays until it is resolved.
    pub fn trim(&mut self) {
        while self.rows > self.budget {
            let Some(oldest) = self
                .accounts
                .iter()
                .min_by_key(|(_, k)| k.used)
                .map(|(a, _)| a.clone())
            else {
                break;
            };
            if let Some(k) = self.accounts.remove(&oldest) {
                self.rows -= k.users.len() + k.roles.len();
            }
        }
    }

    /// Rows kept.
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
}

/// The rows of one delta: those sent, then those left out, taken from `old`; with the map of
/// all of them by hash. None when a row left out is not in `old`.
fn rebuild<T: Clone>(
    delta: Delta<T>,
    mut old: HashMap<i64, T>,
) -> Option<(Vec<T>, HashMap<i64, T>)> {
    let Delta { all, sent } = delta;
    let sent_hashes: std::collections::HashSet<i64> = sent.iter().map(|(h, _)| *h).collect();
    let mut rows = Vec::with_capacity(all.len());
    let mut kept = HashMap::with_capacity(all.len());
    for (h, row) in sent {
        rows.push(row.clone());
        kept.insert(h, row);
    }
    for h in all.into_iter().filter(|h| !sent_hashes.contains(h)) {
        // A row the CRM returns twice has one hash: the second is a copy of the first.
        let row = match old.remove(&h) {
            Some(row) => row,
            None => kept.get(&h)?.clone(),
        };
        rows.push(row.clone());
        kept.insert(h, row);
    }
    Some((rows, kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, name: &str, h: i64) -> (i64, SourceUser) {
        let u = SourceUser {
            id: Some(id.into()),
            name: Some(name.into()),
            row_hash: Some(h),
            ..Default::default()
        };
        (h, u)
    }

    fn names(users: &[SourceUser]) -> Vec<String> {
        let mut n: Vec<String> = users
            .iter()
            .map(|u| u.name.as_deref().unwrap_or_default().to_string())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn rows_left_out_as_known_come_back_from_the_cache_and_gone_rows_are_forgotten() {
        let mut cache = RowCache::new(100);
        let first = Delta {
            all: vec![1, 2, 3],
            sent: vec![user("a", "Ann", 1), user("b", "Bob", 2), user("c", "Cy", 3)],
        };
        let (users, _) = cache.resolve("acct", first, Delta::default()).unwrap();
        assert_eq!(names(&users), ["Ann", "Bob", "Cy"]);
        assert_eq!(cache.known(["acct"]).0.len(), 3);
        // Bob renamed (a new hash, sent), Cy gone, Ann left out as known.
        let second = Delta {
            all: vec![1, 4],
            sent: vec![user("b", "Robert", 4)],
        };
        let (users, _) = cache.resolve("acct", second, Delta::default()).unwrap();
        assert_eq!(names(&users), ["Ann", "Robert"]);
        let mut known = cache.known(["acct"]).0;
        known.sort();
        assert_eq!(known, [1, 4], "Cy's row is no longer kept");
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_row_left_out_but_not_kept_drops_the_account_so_it_is_read_whole_next_time() {
        let mut cache = RowCache::new(100);
        let first = Delta {
            all: vec![1],
            sent: vec![user("a", "Ann", 1)],
        };
        cache.resolve("acct", first, Delta::default()).unwrap();
        let strange = Delta {
            all: vec![1, 99],
            sent: vec![],
        };
        assert_eq!(
            cache.resolve("acct", strange, Delta::default()),
            Err(NotKept)
        );
        assert!(cache.known(["acct"]).0.is_empty());
        assert!(cache.is_empty());
    }

    #[test]
    fn the_accounts_used_longest_ago_are_dropped_first_down_to_the_budget() {
        let mut cache = RowCache::new(4);
        for (account, base) in [("old", 10), ("mid", 20), ("new", 30)] {
            let rows = Delta {
                all: vec![base, base + 1],
                sent: vec![user("a", "A", base), user("b", "B", base + 1)],
            };
            cache.resolve(account, rows, Delta::default()).unwrap();
        }
        assert_eq!(cache.len(), 6, "nothing is dropped during a read");
        cache.trim();
        assert_eq!(cache.len(), 4);
        assert!(cache.known(["old"]).0.is_empty());
        assert_eq!(cache.known(["mid", "new"]).0.len(), 4);
    }

    #[test]
    fn a_row_the_crm_returns_twice_comes_back_twice() {
        let mut cache = RowCache::new(100);
        let first = Delta {
            all: vec![7, 7],
            sent: vec![user("a", "Ann", 7), user("a", "Ann", 7)],
        };
        cache.resolve("acct", first, Delta::default()).unwrap();
        let again = Delta {
            all: vec![7, 7],
            sent: vec![],
        };
        let (users, _) = cache.resolve("acct", again, Delta::default()).unwrap();
        assert_eq!(names(&users), ["Ann", "Ann"]);
    }
}
