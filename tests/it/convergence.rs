//! Convergence under random faults: seeded random CRM changes interleaved with cycles of the
//! real binary against a simulator that fails at random (429, 5xx, HTML pages, dropped
//! connections, timeouts, process kills). After the faults stop, two clean cycles must leave
//! Wazzup equal to what the CRM says, with dead letters exactly for what the CRM makes invalid.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;

use crate::helpers::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wazzup_sim::{Fault, Simulator};
use wazzup_sync::domain::{NormalizeOptions, SourceRole, SourceUser, normalize_account};

const SEEDS: [u64; 3] = [7, 1009, 424242];
const STEPS: usize = 8;

async fn random_changes(db: &TestDb, rng: &mut StdRng) {
    for _ in 0..rng.random_range(1..=6) {
        let id = format!("u{}", rng.random_range(1..=40));
        let phone = format!("+371 2{:07}", rng.random_range(0..30));
        let sql = match rng.random_range(0..10) {
            0..=2 => format!(
                "DELETE FROM wazzup_users WHERE id = '{id}';
                 INSERT INTO wazzup_users VALUES ('a1', '{id}', 'Name {}', '{phone}', {})",
                rng.random_range(0..1000),
                rng.random_bool(0.2)
            ),
            3 => format!(
                "UPDATE wazzup_users SET name = 'Renamed {}' WHERE id = '{id}'",
                rng.random_range(0..1000)
            ),
            4 => format!("UPDATE wazzup_users SET phone = '{phone}' WHERE id = '{id}'"),
            5 => format!("DELETE FROM wazzup_users WHERE id = '{id}'"),
            6 | 7 => {
                let role = ["seller", "manager", "auditor", "Director"][rng.random_range(0..4)];
                let ch = rng.random_range(1..=2);
                format!(
                    "DELETE FROM wazzup_user_roles WHERE user_id = '{id}' AND channel_id = 'ch-{ch}';
                     INSERT INTO wazzup_user_roles VALUES ('a1', '{id}', 'ch-{ch}', '{role}', {})",
                    rng.random_bool(0.5)
                )
            }
            8 => format!("UPDATE wazzup_users SET name = '' WHERE id = '{id}'"),
            _ => format!("DELETE FROM wazzup_user_roles WHERE user_id = '{id}'"),
        };
        db.exec(&sql).await;
    }
}

fn random_faults(sim: &Simulator, rng: &mut StdRng) {
    for _ in 0..rng.random_range(0..=3) {
        let fault = match rng.random_range(0..6) {
            0 => Fault::Status {
                status: 429,
                body: String::new(),
                retry_after: Some("0".into()),
            },
            1 => Fault::Status {
                status: 500,
                body: String::new(),
                retry_after: None,
            },
            2 => Fault::Status {
                status: 502,
                body: "<html><body>Bad gateway</body></html>".into(),
                retry_after: None,
            },
            3 => Fault::Drop,
            4 => Fault::Delay { ms: 1_300 },
            _ => Fault::Status {
                status: 503,
                body: "{}".into(),
                retry_after: Some("0".into()),
            },
        };
        sim.push_fault(None, None, fault);
    }
}

async fn cycle(env: &[(String, String)], sim: &Simulator, kill_at: Option<usize>) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wazzup-sync"));
    cmd.arg("sync")
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    if let Some(n) = kill_at {
        sim.signal_at_request(n, child.id().unwrap(), "KILL");
    }
    child.wait().await.unwrap();
    sim.clear_faults();
}

async fn source_rows(db: &TestDb) -> (Vec<SourceUser>, Vec<SourceRole>) {
    let users: Vec<(String, String, Option<String>, Option<bool>)> =
        sqlx::query_as("SELECT id, name, phone, hide_phone FROM wazzup_users")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let roles: Vec<(String, String, String, Option<bool>)> = sqlx::query_as(
        "SELECT user_id, channel_id, role, allow_get_new_clients FROM wazzup_user_roles",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    (
        users
            .into_iter()
            .map(|(id, name, phone, hide)| SourceUser {
                id: Some(id.into()),
                name: Some(name.into()),
                phone: phone.map(Into::into),
                hide_phone: hide,
                row_hash: None,
            })
            .collect(),
        roles
            .into_iter()
            .map(|(u, c, r, a)| SourceRole {
                user_id: Some(u.into()),
                channel_id: Some(c.into()),
                role: Some(r.into()),
                allow_get_new_clients: a,
            })
            .collect(),
    )
}

#[tokio::test]
async fn random_changes_and_faults_converge_once_the_faults_stop() {
    for seed in SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let db = TestDb::with_crm().await;
        let sim = simulator().await;
        db.add_account("a1", "tok-1").await;
        sim.add_account("tok-1");
        db.add_users("a1", 20).await;
        let env = env_for(
            &db,
            &sim,
            &[
                ("WAZZUP_SYNC__WAZZUP__REQUEST_TIMEOUT_SECS", "1"),
                ("WAZZUP_SYNC__WAZZUP__RETRY_MAX_ATTEMPTS", "3"),
            ],
        );
        for _ in 0..STEPS {
            random_changes(&db, &mut rng).await;
            random_faults(&sim, &mut rng);
            let kill_at = rng.random_bool(0.3).then(|| rng.random_range(1..=4));
            cycle(&env, &sim, kill_at).await;
        }
        // The faults stop and time passes: whatever Wazzup refused is due again.
        db.exec("UPDATE wazzup_sync.dead_letters SET next_attempt_at = now() - interval '1 second' WHERE resolved_at IS NULL").await;
        cycle(&env, &sim, None).await;
        cycle(&env, &sim, None).await;

        // What the CRM says, by the daemon's own rules.
        let (users, roles) = source_rows(&db).await;
        let opts = NormalizeOptions {
            region: Some(phonenumber::country::Id::LV),
            role_map: Default::default(),
            row_salt: 0,
        };
        let norm = normalize_account(&users, &roles, &opts, &mut Default::default());
        let held = sim.users("tok-1");
        let dead = db.open_dead_letters().await;
        let dead_keys: HashMap<(String, String), &DeadLetter> = dead
            .iter()
            .map(|d| ((d.entity.clone(), d.record_id.clone()), d))
            .collect();
        let synced: HashSet<String> = norm
            .users
            .iter()
            .filter(|u| held.get(u.payload.id.as_str()) == Some(&u.payload))
            .map(|u| u.payload.id.to_string())
            .collect();
        for u in &norm.users {
            let id = &u.payload.id;
            let dl = dead_keys.get(&("user".into(), id.to_string()));
            if synced.contains(id.as_str()) {
                assert!(
                    dl.is_none(),
                    "seed {seed}: {id} is synced but has an open dead letter"
                );
                continue;
            }
            // Only one refusal may remain: the phone is still held in Wazzup by another user
            // whose own record cannot move (frozen as last synced, or itself refused).
            let blocked_by_stale_holder = u.payload.phone.as_ref().is_some_and(|p| {
                held.values().any(|h| {
                    h.id != *id && h.phone.as_ref() == Some(p) && !synced.contains(h.id.as_str())
                })
            });
            assert!(
                blocked_by_stale_holder
                    && dl.is_some_and(|d| d.error_code == "USER_ALREADY_EXISTS"),
                "seed {seed}: {:?} is valid but Wazzup holds {:?}; dead letter: {dl:?}",
                u.payload,
                held.get(id.as_str())
            );
        }
        for id in held.keys() {
            assert!(
                norm.users.iter().any(|u| u.payload.id == *id)
                    || norm.rejected_user_ids.contains(id.as_str()),
                "seed {seed}: Wazzup holds {id}, which the CRM does not have"
            );
        }
        for r in &norm.rejected {
            let d = dead_keys.get(&(r.entity.as_str().to_string(), r.record_id.clone()));
            assert!(
                d.is_some_and(|d| d.kind == "invalid" && d.error_code == r.code),
                "seed {seed}: {} {} refused ({}) without its dead letter",
                r.entity.as_str(),
                r.record_id,
                r.code
            );
        }
        let want_roles: Vec<_> = norm
            .roles
            .iter()
            .filter(|r| held.contains_key(r.user_id.as_str()))
            .cloned()
            .collect();
        let got_roles: Vec<_> = sim
            .settings("tok-1")
            .user_roles
            .into_iter()
            .filter(|r| !norm.rejected_user_ids.contains(&r.user_id))
            .collect();
        assert_eq!(got_roles, want_roles, "seed {seed}: settings");
        assert!(
            dead.iter()
                .all(|d| d.kind == "invalid" || d.error_code == "USER_ALREADY_EXISTS"),
            "seed {seed}: nothing else stays refused by Wazzup: {dead:?}"
        );
        let counts: BTreeMap<&str, usize> = dead.iter().fold(BTreeMap::new(), |mut m, d| {
            *m.entry(d.kind.as_str()).or_default() += 1;
            m
        });
        eprintln!(
            "seed {seed}: {} users in Wazzup, dead letters {counts:?}",
            held.len()
        );
    }
}
