//! Notified cycles cost the CRM in proportion to the change: only the notified accounts are
//! read, an unchanged one is skipped, and rows the daemon read before are not sent again.

use std::collections::HashSet;
use std::time::Duration;

use crate::helpers::*;
use wazzup_sync::sync::{CycleOptions, Trigger};

/// One notified cycle for these accounts, through the library.
async fn notified(
    db: &TestDb,
    sim: &wazzup_sim::Simulator,
    accounts: &[&str],
    extra: &[(&str, &str)],
) -> Result<wazzup_sync::sync::CycleReport, String> {
    let opts = CycleOptions {
        only_accounts: Some(
            accounts
                .iter()
                .map(ToString::to_string)
                .collect::<HashSet<_>>(),
        ),
        trigger: Trigger::Notify,
        ..Default::default()
    };
    wazzup_sync::commands::sync_once(settings(db, sim, extra), opts)
        .await
        .map_err(|e| format!("{e:#}"))
}

#[tokio::test]
async fn a_notified_cycle_never_computes_the_rows_of_other_accounts() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    for (a, t) in [("a1", "tok-1"), ("a2", "tok-2")] {
        db.add_account(a, t).await;
        sim.add_account(t);
        db.add_users(a, 3).await;
    }
    // A view whose rows of account a2 fail when computed (a division by zero per row).
    db.exec(
        "CREATE VIEW users_v AS SELECT account_id, id,
            CASE WHEN account_id = 'a2' THEN (1 / (length(id) - length(id)))::text ELSE name END AS name,
            phone, hide_phone FROM wazzup_users",
    )
    .await;
    let extra = [("WAZZUP_SYNC__SOURCE__USERS_QUERY", "SELECT * FROM users_v")];

    let report = notified(&db, &sim, &["a1"], &extra)
        .await
        .expect("a1 alone is read");
    assert_eq!(report.accounts.len(), 1);
    assert_eq!(sim.users("tok-1").len(), 3);
    assert!(sim.users("tok-2").is_empty());

    let all = notified(&db, &sim, &["a1", "a2"], &extra).await;
    let err = all.expect_err("a2's rows are computed once it is notified");
    assert!(err.contains("division by zero"), "{err}");
}

#[tokio::test]
async fn a_notified_account_whose_rows_did_not_change_is_skipped() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 5).await;
    sync(&db, &sim, &[]).await;
    sim.clear_requests();

    let report = notified(&db, &sim, &["a1"], &[]).await.unwrap();
    assert!(report.accounts[0].source_unchanged, "{report:?}");
    assert_eq!(sim.request_count(), 0);

    db.exec("UPDATE wazzup_users SET name = 'Renamed' WHERE id = 'u2'")
        .await;
    let report = notified(&db, &sim, &["a1"], &[]).await.unwrap();
    assert!(!report.accounts[0].source_unchanged);
    assert_eq!(report.accounts[0].updated, 1);
    assert_eq!(sim.users("tok-1")["u2"].name, "Renamed");
    let report = notified(&db, &sim, &["a1"], &[]).await.unwrap();
    assert!(report.accounts[0].source_unchanged, "clean again");
}

#[tokio::test]
async fn integer_account_ids_are_matched_in_their_own_type_and_odd_ids_match_nothing() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE companies (id bigint PRIMARY KEY, token text);
         CREATE TABLE staff (company_id int, id int, name text);
         CREATE INDEX ON staff (company_id);
         INSERT INTO companies VALUES (1, 'tok-1'), (2, 'tok-2');
         INSERT INTO staff VALUES (1, 10, 'Ten'), (2, 20, 'Twenty');",
    )
    .await;
    let sim = simulator().await;
    sim.add_account("tok-1");
    sim.add_account("tok-2");
    let extra = [
        (
            "WAZZUP_SYNC__SOURCE__ACCOUNTS_QUERY",
            "SELECT id AS account_id, token FROM companies",
        ),
        (
            "WAZZUP_SYNC__SOURCE__USERS_QUERY",
            "SELECT company_id AS account_id, id, name FROM staff",
        ),
        (
            "WAZZUP_SYNC__SOURCE__ROLES_QUERY",
            "SELECT company_id AS account_id, id AS user_id, 'ch' AS channel_id, 'seller' AS role FROM staff",
        ),
    ];
    // "02" and "x" are no integer's text: they match no account, and break nothing.
    let report = notified(&db, &sim, &["2", "02", "x"], &extra)
        .await
        .unwrap();
    assert!(report.all_ok(), "{report:?}");
    assert_eq!(report.accounts.len(), 1);
    assert_eq!(sim.users("tok-2")["20"].name, "Twenty");
    assert!(sim.users("tok-1").is_empty());
    assert_eq!(sim.settings("tok-2").user_roles.len(), 1);
}

#[tokio::test]
async fn the_daemon_keeps_following_notified_changes_through_the_rows_it_read_before() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    for (a, t) in [("a1", "tok-1"), ("a2", "tok-2")] {
        db.add_account(a, t).await;
        sim.add_account(t);
        db.add_users(a, 4).await;
    }
    let env = env_for(
        &db,
        &sim,
        &[
            ("WAZZUP_SYNC__SYNC__SCHEDULE", "0 0 0 1 1 *"),
            ("WAZZUP_SYNC__SYNC__LISTEN_CHANNEL", "wazzup_sync"),
            ("WAZZUP_SYNC__HTTP__ENABLED", "false"),
        ],
    );
    let mut child = spawn_bin(&["run"], &env);
    let until = |what: &'static str, done: Box<dyn Fn() -> bool>| async move {
        for _ in 0..250 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting until {what}");
    };
    let s = sim.clone();
    until(
        "the start-up cycle ran",
        Box::new(move || s.users("tok-1").len() == 4),
    )
    .await;

    // Each change is notified; the second and later reads of a1 come through the rows kept.
    let steps: [(&str, &str); 4] = [
        (
            "UPDATE wazzup_users SET name = 'First' WHERE id = 'u1'",
            "a renamed user",
        ),
        (
            "UPDATE wazzup_users SET name = 'Second' WHERE id = 'u1'",
            "a second rename",
        ),
        (
            "DELETE FROM wazzup_users WHERE id = 'u4'; DELETE FROM wazzup_user_roles WHERE user_id = 'u4'",
            "a departure",
        ),
        (
            "UPDATE wazzup_user_roles SET role = 'auditor' WHERE user_id = 'u2'",
            "a role change",
        ),
    ];
    for (sql, what) in steps {
        db.exec(&format!(
            "{sql}; UPDATE wazzup_users SET name = name || '' WHERE account_id = 'a2' AND id = 'u1'"
        ))
        .await;
        db.exec("SELECT pg_notify('wazzup_sync', 'a1')").await;
        let s = sim.clone();
        let crm = crm_users(&db, "a1").await;
        let roles: usize = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM wazzup_user_roles WHERE account_id = 'a1' AND role = 'auditor'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap() as usize;
        until(
            what,
            Box::new(move || {
                sim_users(&s, "tok-1") == crm
                    && s.settings("tok-1")
                        .user_roles
                        .iter()
                        .filter(|r| r.role.as_str() == "auditor")
                        .count()
                        == roles
            }),
        )
        .await;
    }
    assert_eq!(sim.users("tok-1")["u1"].name, "Second");
    assert!(!sim.users("tok-1").contains_key("u4"));
    child.kill().await.unwrap();
}
