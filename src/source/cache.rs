//! The role rows last read for the accounts a notification named, with their fingerprint (how
//! many rows, and the sum of their hashes as PostgreSQL computes them). A notified cycle asks
//! PostgreSQL for each account's role fingerprint, and for the rows themselves only where it
//! differs from the one kept. (Users are always sent, with their hashes: a user whose row the
//! mirror remembers is recognised without being normalized again.) Bounded: the accounts used
//! longest ago go first.

use std::collections::HashMap;

use super::columns::Probed;
use crate::domain::SourceRole;

/// At most this many role rows are kept: about 16 MB (more where channel ids are long), the
/// rows of 100 accounts of 1,000 users with two channels each.
pub const ROW_CACHE_ROWS: usize = 200_000;

/// The role rows kept, per account, and the queries' columns as last probed.
#[derive(Debug)]
pub struct RowCache {
    accounts: HashMap<String, Kept>,
    rows: usize,
    clock: u64,
    budget: usize,
    /// Each query's columns as last probed, by the query's text: a notified read does not
    /// plan a probe of every query again. Forgotten when a notified read fails.
    probed: HashMap<String, Probed>,
}

#[derive(Debug)]
struct Kept {
    count: i64,
    sum: String,
    roles: Vec<SourceRole>,
    used: u64,
}

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
            probed: HashMap::new(),
        }
    }

    /// A query's columns as probed before.
    pub(crate) fn probed(&self, query: &str) -> Option<Probed> {
        self.probed.get(query).cloned()
    }

    pub(crate) fn keep_probed(&mut self, query: &str, probed: &Probed) {
        self.probed.insert(query.to_string(), probed.clone());
    }

    /// Forgets every probe: the next read checks the queries' columns again (a query may have
    /// changed under its name).
    pub(crate) fn forget_probes(&mut self) {
        self.probed.clear();
    }

    /// The role rows kept for an account, when they have this fingerprint (count, hash sum).
    pub(crate) fn roles(
        &mut self,
        account: &str,
        print: &(i64, String),
    ) -> Option<Vec<SourceRole>> {
        self.clock += 1;
        let kept = self.accounts.get_mut(account)?;
        if (kept.count, &kept.sum) != (print.0, &print.1) {
            return None;
        }
        kept.used = self.clock;
        Some(kept.roles.clone())
    }

    /// Keeps an account's role rows, read with this fingerprint.
    pub(crate) fn keep(&mut self, account: &str, print: (i64, String), roles: &[SourceRole]) {
        self.clock += 1;
        if let Some(old) = self.accounts.remove(account) {
            self.rows -= old.roles.len();
        }
        self.rows += roles.len();
        let kept = Kept {
            count: print.0,
            sum: print.1,
            roles: roles.to_vec(),
            used: self.clock,
        };
        self.accounts.insert(account.to_string(), kept);
    }

    /// Drops the accounts used longest ago until at most the budget's rows are kept. Called
    /// after a read, never during one.
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
                self.rows -= k.roles.len();
            }
        }
    }

    /// Role rows kept.
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(user: &str, role: &str) -> SourceRole {
        SourceRole {
            user_id: Some(user.into()),
            channel_id: Some("ch".into()),
            role: Some(role.into()),
            allow_get_new_clients: Some(false),
        }
    }

    fn print(n: i64, sum: &str) -> (i64, String) {
        (n, sum.to_string())
    }

    #[test]
    fn rows_kept_come_back_only_while_their_fingerprint_holds() {
        let mut cache = RowCache::new(100);
        assert_eq!(cache.roles("acct", &print(0, "0")), None, "nothing kept");
        let rows = vec![role("a", "seller"), role("b", "manager")];
        cache.keep("acct", print(2, "17"), &rows);
        assert_eq!(cache.roles("acct", &print(2, "17")), Some(rows));
        assert_eq!(cache.roles("acct", &print(2, "18")), None, "another sum");
        assert_eq!(cache.roles("acct", &print(3, "17")), None, "another count");
        cache.keep("acct", print(1, "5"), &[role("a", "auditor")]);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.roles("acct", &print(1, "5")).unwrap().len(), 1);
    }

    #[test]
    fn the_accounts_used_longest_ago_are_dropped_first_down_to_the_budget() {
        let mut cache = RowCache::new(4);
        for account in ["old", "mid", "new"] {
            let rows = vec![role("a", "seller"), role("b", "seller")];
            cache.keep(account, print(2, account), &rows);
        }
        cache.roles("old", &print(2, "old")).unwrap();
        assert_eq!(cache.len(), 6, "nothing is dropped during a read");
        cache.trim();
        assert_eq!(cache.len(), 4);
        assert_eq!(
            cache.roles("mid", &print(2, "mid")),
            None,
            "used longest ago"
        );
        assert!(cache.roles("old", &print(2, "old")).is_some());
    }
}
