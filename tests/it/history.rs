//! The history: one row per change Wazzup acknowledged, written with the acknowledgement, and
//! the `history` and `access` commands that read it.

use std::time::Duration;

use crate::helpers::*;
use wazzup_sim::Fault;

/// A history row as the tests look at it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Row {
    cycle_id: Option<i64>,
    account_id: String,
    user_id: Option<String>,
    channel_id: Option<String>,
    action: String,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
    widens_access: bool,
    cause: String,
}

async fn rows(db: &TestDb) -> Vec<Row> {
    sqlx::query_as(
        "SELECT cycle_id, account_id, user_id, channel_id, action, before, after, widens_access, cause
         FROM wazzup_sync.changes ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

fn of<'a>(rows: &'a [Row], action: &str) -> Vec<&'a Row> {
    rows.iter().filter(|r| r.action == action).collect()
}

#[tokio::test]
async fn a_cold_sync_records_one_row_per_user_and_per_role_row_in_its_cycle() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 12).await;
    db.add_role("a1", "u3", "ch-2", "manager", false).await;
    let env = env_for(&db, &sim, &[("WAZZUP_SYNC__INSTANCE", "replica-a")]);
    let out = run_bin(&["sync"], &env).await;
    assert!(out.status.success(), "{}", text(&out));

    let rows = rows(&db).await;
    let created = of(&rows, "user_created");
    assert_eq!(created.len(), sim.users("tok-1").len());
    assert_eq!(created.len(), 12);
    let u1 = created
        .iter()
        .find(|r| r.user_id.as_deref() == Some("u1"))
        .unwrap();
    assert_eq!(
        u1.after,
        Some(serde_json::json!({"name": "User 1", "phone": "371 *** *01"})),
        "names as sent, phones masked"
    );
    assert_eq!(u1.before, None);
    let granted = of(&rows, "role_granted");
    assert_eq!(granted.len(), sim.settings("tok-1").user_roles.len());
    assert_eq!(granted.len(), 13);
    let manager = granted
        .iter()
        .find(|r| r.channel_id.as_deref() == Some("ch-2"))
        .unwrap();
    assert!(manager.widens_access, "a manager granted widens access");
    assert!(
        granted.iter().filter(|r| r.widens_access).count() == 1,
        "sellers granted do not"
    );
    assert!(
        rows.iter()
            .all(|r| r.cause == "crm_change" && r.account_id == "a1")
    );
    let hidden = of(&rows, "phone_hidden");
    assert!(hidden.is_empty(), "add_users hides nobody's phones");

    let cycle: (i64, String, String, i32, i32, String, i64) = sqlx::query_as(
        "SELECT id, trigger, instance, created, settings_pushed, outcome, requests FROM wazzup_sync.cycles",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (
            cycle.1.as_str(),
            cycle.2.as_str(),
            cycle.3,
            cycle.4,
            cycle.5.as_str()
        ),
        ("sync", "replica-a", 12, 1, "completed")
    );
    assert_eq!(cycle.6, sim.request_count() as i64);
    assert!(rows.iter().all(|r| r.cycle_id == Some(cycle.0)));
}

#[tokio::test]
async fn a_rename_a_promotion_and_a_departure_each_leave_their_row() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 12).await;
    sync(&db, &sim, &[]).await;
    db.exec(
        "UPDATE wazzup_users SET name = 'Renamed' WHERE id = 'u1';
         UPDATE wazzup_user_roles SET role = 'manager' WHERE user_id = 'u2';
         UPDATE wazzup_users SET hide_phone = true WHERE id = 'u4';
         DELETE FROM wazzup_users WHERE id = 'u3'; DELETE FROM wazzup_user_roles WHERE user_id = 'u3';",
    )
    .await;
    sync(&db, &sim, &[]).await;

    let rows = rows(&db).await;
    let updated = of(&rows, "user_updated");
    assert_eq!(updated.len(), 1, "{updated:?}");
    assert_eq!(updated[0].user_id.as_deref(), Some("u1"));
    assert_eq!(
        updated[0].before,
        Some(serde_json::json!({"name": "User 1", "phone": "371 *** *01"}))
    );
    assert_eq!(
        updated[0].after,
        Some(serde_json::json!({"name": "Renamed", "phone": "371 *** *01"}))
    );
    let changed = of(&rows, "role_changed");
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].user_id.as_deref(), Some("u2"));
    assert!(changed[0].widens_access, "seller to manager widens access");
    assert_eq!(changed[0].before.as_ref().unwrap()["role"], "seller");
    assert_eq!(changed[0].after.as_ref().unwrap()["role"], "manager");
    let deleted = of(&rows, "user_deleted");
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].user_id.as_deref(), Some("u3"));
    assert_eq!(deleted[0].before.as_ref().unwrap()["name"], "User 3");
    let revoked = of(&rows, "role_revoked");
    assert_eq!(revoked.len(), 1);
    assert!(!revoked[0].widens_access);
    let hidden = of(&rows, "phone_hidden");
    assert_eq!(hidden.len(), 1);
    assert_eq!(hidden[0].user_id.as_deref(), Some("u4"));

    // `plan --detail` names a pending change as the history will.
    db.exec("UPDATE wazzup_user_roles SET role = 'auditor' WHERE user_id = 'u5'")
        .await;
    let out = run_bin(
        &["plan", "--detail", "--format", "json"],
        &env_for(&db, &sim, &[]),
    )
    .await;
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let record = plan["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["user_id"] == "u5")
        .unwrap()
        .clone();
    sync(&db, &sim, &[]).await;
    let rows = self::rows(&db).await;
    let recorded = rows
        .iter()
        .rfind(|r| r.user_id.as_deref() == Some("u5"))
        .unwrap();
    assert_eq!(record["action"], recorded.action.as_str());
    assert_eq!(record["widens_access"], recorded.widens_access);
}

/// The role rows a push changed, as (user, channel, action, role before, role after).
fn role_rows(rows: &[Row], after: usize) -> Vec<(String, String, String, String, String)> {
    let role = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .map(|v| {
                format!(
                    "{}{}",
                    v["role"].as_str().unwrap(),
                    if v["allow_get_new_clients"] == true {
                        "+new"
                    } else {
                        ""
                    }
                )
            })
            .unwrap_or_default()
    };
    let mut found: Vec<_> = rows[after..]
        .iter()
        .filter(|r| r.channel_id.is_some())
        .map(|r| {
            (
                r.user_id.clone().unwrap(),
                r.channel_id.clone().unwrap(),
                r.action.clone(),
                role(&r.before),
                role(&r.after),
            )
        })
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn the_role_rows_a_push_changed_are_found_by_their_hashes_or_by_reading_an_older_document() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 6).await;
    sync(&db, &sim, &[]).await;
    let hashes: Option<Vec<i64>> =
        sqlx::query_scalar("SELECT settings_roles FROM wazzup_sync.accounts")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(hashes.map(|h| h.len()), Some(6), "one hash per role row");

    let edits = "UPDATE wazzup_user_roles SET role = 'auditor' WHERE user_id = 'u2';
         UPDATE wazzup_user_roles SET allow_get_new_clients = true WHERE user_id = 'u3';
         INSERT INTO wazzup_user_roles VALUES ('a1', 'u4', 'ch-2', 'manager', false);
         DELETE FROM wazzup_user_roles WHERE user_id = 'u5';";
    let expected = |ch2: &str| {
        vec![
            (
                "u2".into(),
                "ch-1".into(),
                "role_changed".into(),
                "seller+new".into(),
                "auditor+new".into(),
            ),
            (
                "u3".into(),
                "ch-1".into(),
                "new_clients_on".into(),
                "seller".into(),
                "seller+new".into(),
            ),
            (
                "u4".into(),
                ch2.into(),
                "role_granted".into(),
                String::new(),
                "manager".into(),
            ),
            (
                "u5".into(),
                "ch-1".into(),
                "role_revoked".into(),
                "seller".into(),
                String::new(),
            ),
        ]
    };
    // By the hashes: only the rows that differ are read back.
    let seen = rows(&db).await.len();
    db.exec(edits).await;
    sync(&db, &sim, &[]).await;
    let all = rows(&db).await;
    assert_eq!(role_rows(&all, seen), expected("ch-2"));

    // A document written before the hashes were kept is read whole, once.
    db.exec("UPDATE wazzup_sync.accounts SET settings_roles = NULL")
        .await;
    db.exec(
        "UPDATE wazzup_user_roles SET role = 'seller' WHERE user_id = 'u2';
         UPDATE wazzup_user_roles SET allow_get_new_clients = false WHERE user_id = 'u3';
         UPDATE wazzup_user_roles SET channel_id = 'ch-3' WHERE user_id = 'u4' AND channel_id = 'ch-2';
         INSERT INTO wazzup_user_roles VALUES ('a1', 'u5', 'ch-1', 'seller', false);",
    )
    .await;
    let seen = all.len();
    sync(&db, &sim, &[]).await;
    let all = rows(&db).await;
    assert_eq!(
        role_rows(&all, seen),
        vec![
            (
                "u2".to_string(),
                "ch-1".to_string(),
                "role_changed".to_string(),
                "auditor+new".to_string(),
                "seller+new".to_string()
            ),
            (
                "u3".into(),
                "ch-1".into(),
                "new_clients_off".into(),
                "seller+new".into(),
                "seller".into()
            ),
            (
                "u4".into(),
                "ch-2".into(),
                "role_revoked".into(),
                "manager".into(),
                String::new()
            ),
            (
                "u4".into(),
                "ch-3".into(),
                "role_granted".into(),
                String::new(),
                "manager".into()
            ),
            (
                "u5".into(),
                "ch-1".into(),
                "role_granted".into(),
                String::new(),
                "seller".into()
            ),
        ]
    );
    let hashes: Option<Vec<i64>> =
        sqlx::query_scalar("SELECT settings_roles FROM wazzup_sync.accounts")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        hashes.map(|h| h.len()),
        Some(7),
        "the hashes are kept again"
    );
}

#[tokio::test]
async fn a_reconcile_that_puts_back_a_hand_edit_is_a_drift_repair() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    sync(&db, &sim, &[]).await;
    // Someone edits Wazzup by hand: a name, and a role row removed.
    let mut edited = sim.users("tok-1")["u2"].clone();
    edited.name = "Edited in Wazzup".into();
    sim.insert_users("tok-1", &[edited]);
    let out = run_bin(&["reconcile"], &env_for(&db, &sim, &[])).await;
    assert!(out.status.success(), "{}", text(&out));

    assert_eq!(sim.users("tok-1")["u2"].name, "User 2", "put back");
    let rows = rows(&db).await;
    let repaired: Vec<&Row> = rows.iter().filter(|r| r.cause == "drift_repair").collect();
    assert_eq!(repaired.len(), 1, "{rows:?}");
    assert_eq!(repaired[0].action, "user_updated");
    assert_eq!(repaired[0].user_id.as_deref(), Some("u2"));
    assert_eq!(
        repaired[0].before.as_ref().unwrap()["name"],
        "Edited in Wazzup",
        "what Wazzup held"
    );
    assert_eq!(repaired[0].after.as_ref().unwrap()["name"], "User 2");
    let trigger: String =
        sqlx::query_scalar("SELECT trigger FROM wazzup_sync.cycles WHERE id = $1")
            .bind(repaired[0].cycle_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(trigger, "reconcile");
}

#[tokio::test]
async fn an_answer_cut_after_wazzup_applied_it_is_recorded_once_after_the_retry() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    sync(&db, &sim, &[]).await;
    db.exec("UPDATE wazzup_users SET name = 'Renamed' WHERE id = 'u1'")
        .await;
    sim.clear_requests();
    sim.push_fault(Some("POST"), Some("/v2/users"), Fault::AppliedDrop);
    let out = run_bin(&["sync"], &env_for(&db, &sim, &[])).await;
    assert!(out.status.success(), "{}", text(&out));

    let posts = sim.requests().iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, 2, "the cut answer, then the retry");
    let rows = rows(&db).await;
    let updated = of(&rows, "user_updated");
    assert_eq!(updated.len(), 1, "one row for one change: {updated:?}");
    assert_eq!(updated[0].after.as_ref().unwrap()["name"], "Renamed");
}

#[tokio::test]
async fn two_replicas_write_their_own_cycles_and_never_the_same_change_twice() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    for i in 1..=6 {
        db.add_account(&format!("a{i}"), &format!("tok-{i}")).await;
        sim.add_account(&format!("tok-{i}"));
        db.add_users(&format!("a{i}"), 30).await;
    }
    sim.set_latency(20);
    // Migrated first, so that the two processes start on the same schema.
    assert!(
        run_bin(&["migrate"], &env_for(&db, &sim, &[]))
            .await
            .status
            .success()
    );
    let env_a = env_for(&db, &sim, &[("WAZZUP_SYNC__INSTANCE", "replica-a")]);
    let env_b = env_for(&db, &sim, &[("WAZZUP_SYNC__INSTANCE", "replica-b")]);
    let (a, b) = tokio::join!(run_bin(&["sync"], &env_a), run_bin(&["sync"], &env_b));
    assert!(
        a.status.success() && b.status.success(),
        "{}{}",
        text(&a),
        text(&b)
    );
    // Whatever one of them left (an account it found locked), a third cycle finishes.
    sync(&db, &sim, &[]).await;

    let instances: Vec<String> =
        sqlx::query_scalar("SELECT instance FROM wazzup_sync.cycles ORDER BY id LIMIT 2")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut sorted = instances.clone();
    sorted.sort();
    assert_eq!(sorted, ["replica-a", "replica-b"]);
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT account_id, user_id, action, channel_id FROM wazzup_sync.changes
                               GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) AS d",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(twice, 0, "no change recorded twice");
    let created: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM wazzup_sync.changes WHERE action = 'user_created'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(created, 180, "every user's creation, once");
}

#[tokio::test]
async fn history_reads_as_csv_with_its_header_and_as_json_lines() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_user("a1", "jo", "Doe, \"Jo\"", Some("+371 26 000 901"))
        .await;
    db.add_role("a1", "jo", "ch-1", "manager", true).await;
    db.add_users("a1", 3).await;
    let env = env_for(&db, &sim, &[]);
    assert!(run_bin(&["sync"], &env).await.status.success());

    let out = run_bin(&["history", "--format", "csv", "--account", "a1"], &env).await;
    assert!(out.status.success(), "{}", text(&out));
    let mut reader = csv::Reader::from_reader(&out.stdout[..]);
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        &header[..5],
        [
            "acknowledged_at",
            "account_id",
            "user_id",
            "channel_id",
            "action"
        ]
    );
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(
        records.len(),
        4 + 4,
        "four users created, four roles granted"
    );
    let jo = records
        .iter()
        .find(|r| &r[2] == "jo" && &r[4] == "user_created")
        .unwrap();
    let after: serde_json::Value = serde_json::from_str(&jo[6]).unwrap();
    assert_eq!(
        after["name"], "Doe, \"Jo\"",
        "a name with a comma and quotes survives"
    );

    let out = run_bin(&["history", "--format", "json", "--widens-access"], &env).await;
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one object per line; only the manager granted widens"
    );
    assert_eq!(lines[0]["action"], "role_granted");
    assert_eq!(lines[0]["user_id"], "jo");

    let out = run_bin(
        &[
            "history",
            "u2",
            "--action",
            "user_created,role_granted",
            "--limit",
            "1",
        ],
        &env,
    )
    .await;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(table.lines().count(), 2, "a header and one row:\n{table}");
    assert!(
        table.contains("role_granted") && table.contains(" u2 "),
        "newest first:\n{table}"
    );
}

#[tokio::test]
async fn a_malformed_since_or_an_unknown_action_is_exit_2_with_one_line_naming_it() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    let env = env_for(&db, &sim, &[]);
    for (args, named) in [
        (
            &["history", "--since", "last tuesday"][..],
            "--since \"last tuesday\"",
        ),
        (
            &["history", "--until", "2026-13-40"][..],
            "--until \"2026-13-40\"",
        ),
        (
            &["history", "--action", "role_given"][..],
            "--action \"role_given\"",
        ),
        (
            &["access", "--role", "Supervisor"][..],
            "--role \"Supervisor\"",
        ),
    ] {
        let out = run_bin(args, &env).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(named), "{err}");
    }
}

#[tokio::test]
async fn access_lists_exactly_the_managers_wazzup_holds_and_since_when() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 6).await;
    for (user, channel) in [("u2", "ch-1"), ("u5", "ch-2")] {
        db.exec(&format!(
            "DELETE FROM wazzup_user_roles WHERE user_id = '{user}' AND channel_id = '{channel}'"
        ))
        .await;
        db.add_role("a1", user, channel, "manager", true).await;
    }
    db.exec("UPDATE wazzup_users SET hide_phone = true WHERE id = 'u5'")
        .await;
    let env = env_for(&db, &sim, &[]);
    assert!(run_bin(&["sync"], &env).await.status.success());

    let out = run_bin(&["access", "--role", "manager", "--format", "json"], &env).await;
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut listed_pairs: Vec<(String, String)> = listed
        .iter()
        .map(|r| {
            (
                r["user_id"].as_str().unwrap().into(),
                r["channel_id"].as_str().unwrap().into(),
            )
        })
        .collect();
    listed_pairs.sort();
    let mut held: Vec<(String, String)> = sim
        .settings("tok-1")
        .user_roles
        .iter()
        .filter(|r| r.role.as_str() == "manager")
        .map(|r| (r.user_id.to_string(), r.channel_id.to_string()))
        .collect();
    held.sort();
    assert_eq!(listed_pairs, held);
    assert_eq!(held.len(), 2);
    let u5 = listed.iter().find(|r| r["user_id"] == "u5").unwrap();
    assert_eq!(u5["phones_hidden"], true);
    assert_eq!(u5["receives_new_clients"], true);
    assert!(u5["since"].is_string(), "granted in this history");

    // A role older than the history says so.
    db.exec("DELETE FROM wazzup_sync.changes").await;
    let out = run_bin(&["access", "--role", "manager"], &env).await;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(table.matches("before history began").count(), 2, "{table}");
}

#[tokio::test]
async fn run_prunes_history_older_than_its_retention_and_nothing_newer() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 4).await;
    sync(&db, &sim, &[]).await;
    // Age part of the record: two users' rows and the cycle are 40 days old.
    db.exec(
        "UPDATE wazzup_sync.changes SET acknowledged_at = now() - interval '40 days'
         WHERE user_id IN ('u1', 'u2');
         INSERT INTO wazzup_sync.cycles (run_id, started_at, trigger, instance, outcome)
         VALUES ('old', now() - interval '41 days', 'sync', 'gone', 'completed');",
    )
    .await;
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM wazzup_sync.changes")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let env = env_for(
        &db,
        &sim,
        &[
            ("WAZZUP_SYNC__HISTORY__RETENTION_DAYS", "30"),
            ("WAZZUP_SYNC__SYNC__SCHEDULE", "0 0 0 1 1 *"),
            ("WAZZUP_SYNC__HTTP__ENABLED", "false"),
        ],
    );
    let mut child = spawn_bin(&["run"], &env);
    let stderr = child.stderr.take().unwrap();
    let pruned = tokio::time::timeout(Duration::from_secs(30), async {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Pruned the history") {
                return serde_json::from_str::<serde_json::Value>(&line).ok();
            }
        }
        None
    })
    .await
    .expect("a line saying how many rows went")
    .expect("the log line");
    child.kill().await.unwrap();

    assert_eq!(
        pruned["changes"], 4,
        "two users' rows and two role rows: {pruned}"
    );
    assert_eq!(pruned["cycles"], 1);
    assert_eq!(pruned["retention_days"], 30);
    let left: Vec<Option<String>> =
        sqlx::query_scalar("SELECT DISTINCT user_id FROM wazzup_sync.changes ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, [Some("u3".to_string()), Some("u4".to_string())]);
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM wazzup_sync.changes")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(after, before - 4);
    let cycles: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wazzup_sync.cycles WHERE run_id = 'old'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(cycles, 0);
}
