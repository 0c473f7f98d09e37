//! The mirrors of the accounts notifications name, kept in memory between their cycles. Each
//! write of a mirror row takes a new number (`mirror_users.written`), so a cycle reads only the
//! rows written since the account was last read, by this process or another replica, and how
//! many rows the account holds, which tells when rows were deleted meanwhile. A thousand users
//! cost PostgreSQL a count and the few rows that changed, not a thousand rows to aggregate.
//! Bounded: the accounts used longest ago go first.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use sqlx::PgConnection;

use super::Result;
use super::mirror::{ALL, fetch_remembered};
use crate::domain::{CrmText, Mirror, Remembered, RememberedUsers};

/// At most this many users' mirror rows are kept: about 20 MB, the mirrors of 100 accounts
/// of 1,000 users.
pub const MIRROR_CACHE_USERS: usize = 100_000;

/// The mirrors kept, per account.
#[derive(Debug)]
pub struct MirrorCache {
    accounts: HashMap<String, Kept>,
    users: usize,
    clock: u64,
    budget: usize,
}

/// One account's mirror as of its latest write, by user id.
#[derive(Debug, Default)]
struct Kept {
    latest: i64,
    users: foldhash::HashMap<CrmText, KeptUser>,
    used: u64,
}

/// One user's mirror row: the acknowledged hash, and what normalization may reuse (the phone
/// reading, and the CRM row as its salted hash, the name and the flag), kept once.
#[derive(Debug)]
struct KeptUser {
    hash: String,
    phone: Option<crate::domain::PhoneReading>,
    row: Option<(i64, CrmText, bool)>,
}

impl KeptUser {
    fn of(hash: String, remembered: Remembered) -> Self {
        Self {
            hash,
            phone: remembered.phone,
            row: remembered
                .row
                .map(|r| (r.source_hash, r.name, r.hide_phone)),
        }
    }

    fn remembered(&self) -> Remembered {
        Remembered {
            phone: self.phone.clone(),
            row: self.row.as_ref().map(|(source_hash, name, hide_phone)| {
                crate::domain::RememberedRow {
                    source_hash: *source_hash,
                    name: name.clone(),
                    hash: self.hash.clone(),
                    hide_phone: *hide_phone,
                }
            }),
        }
    }
}

impl Default for MirrorCache {
    fn default() -> Self {
        Self::new(MIRROR_CACHE_USERS)
    }
}

impl MirrorCache {
    pub fn new(budget: usize) -> Self {
        Self {
            accounts: HashMap::new(),
            users: 0,
            clock: 0,
            budget,
        }
    }

    fn take(&mut self, account_id: &str) -> Option<Kept> {
        let kept = self.accounts.remove(account_id)?;
        self.users -= kept.users.len();
        Some(kept)
    }

    fn put(&mut self, account_id: &str, mut kept: Kept) {
        self.clock += 1;
        kept.used = self.clock;
        self.users += kept.users.len();
        self.accounts.insert(account_id.to_string(), kept);
        while self.users > self.budget {
            let Some(oldest) = self
                .accounts
                .iter()
                .min_by_key(|(_, k)| k.used)
                .map(|(a, _)| a.clone())
            else {
                break;
            };
            if let Some(k) = self.accounts.remove(&oldest) {
                self.users -= k.users.len();
            }
        }
    }

    /// Users kept.
    pub fn len(&self) -> usize {
        self.users
    }

    pub fn is_empty(&self) -> bool {
        self.users == 0
    }
}

/// The account's mirror and what it remembers, as [`super::load_mirror_and_phones`] gives
/// them: from what `cache` keeps, brought up to date with the rows written since, or read whole
/// the first time. Called under the account's lock, so no other process writes its mirror
/// meanwhile.
pub async fn load_mirror_kept(
    db: &mut PgConnection,
    account_id: &str,
    cache: &Mutex<MirrorCache>,
) -> Result<(Mirror, RememberedUsers)> {
    let kept = lock(cache).take(account_id);
    let kept = refresh(db, account_id, kept).await?;
    let mut mirror = Mirror::with_capacity_and_hasher(kept.users.len(), Default::default());
    let mut remembered =
        RememberedUsers::with_capacity_and_hasher(kept.users.len(), Default::default());
    for (id, user) in &kept.users {
        mirror.insert(id.clone(), user.hash.clone());
        remembered.insert(id.clone(), user.remembered());
    }
    lock(cache).put(account_id, kept);
    Ok((mirror, remembered))
}

/// Brings an account's kept mirror up to date: the rows written since its latest write; when
/// the account then holds fewer rows than kept, rows were deleted, and only those it still holds
/// stay.
async fn refresh(db: &mut PgConnection, account_id: &str, kept: Option<Kept>) -> Result<Kept> {
    let since = kept.as_ref().map_or(ALL, |k| k.latest);
    let written = fetch_remembered(&mut *db, account_id, since).await?;
    let mut kept = kept.unwrap_or_default();
    kept.latest = written.latest;
    for (id, hash, remembered) in written.rows {
        kept.users.insert(id, KeptUser::of(hash, remembered));
    }
    if kept.users.len() as i64 != written.count {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT user_id FROM mirror_users WHERE account_id = $1")
                .bind(account_id)
                .fetch_all(&mut *db)
                .await?;
        let held: HashSet<&str> = ids.iter().map(String::as_str).collect();
        kept.users.retain(|id, _| held.contains(id.as_str()));
    }
    Ok(kept)
}

fn lock(cache: &Mutex<MirrorCache>) -> std::sync::MutexGuard<'_, MirrorCache> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(n: usize) -> Kept {
        Kept {
            latest: 1,
            users: (0..n)
                .map(|i| {
                    let user = KeptUser::of(String::new(), Remembered::default());
                    (i.to_string().into(), user)
                })
                .collect(),
            used: 0,
        }
    }

    #[test]
    fn the_accounts_used_longest_ago_go_first_down_to_the_budget() {
        let mut cache = MirrorCache::new(5);
        cache.put("old", kept(2));
        cache.put("mid", kept(2));
        assert_eq!(cache.len(), 4);
        cache.put("new", kept(2));
        assert_eq!(cache.len(), 4, "the oldest account went");
        assert!(cache.take("old").is_none());
        assert!(cache.take("mid").is_some() && cache.take("new").is_some());
        assert!(cache.is_empty());
    }
}
