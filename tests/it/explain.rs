//! `explain USER_ID`: one user on one screen, read-only.

use crate::helpers::*;
use wazzup_sync::domain::UserPayload;

async fn explain_json(env: &[(String, String)], args: &[&str]) -> serde_json::Value {
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--format", "json"]);
    let out = run_bin(&all, env).await;
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

async fn state_rows(db: &TestDb) -> (i64, i64, Vec<(String, String)>) {
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM wazzup_sync.dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM wazzup_sync.pending_users")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mirror: Vec<(String, String)> =
        sqlx::query_as("SELECT user_id, hash FROM wazzup_sync.mirror_users ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    (dead, pending, mirror)
}

#[tokio::test]
async fn explain_tells_one_users_whole_story_and_changes_nothing() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    db.add_user("a1", "blank", "   ", None).await;
    db.add_role("a1", "u1", "ch-2", "Manager", false).await;
    // A second row for a channel that already has a valid one: only this row is refused.
    db.add_role("a1", "u2", "ch-1", "Boss", false).await;
    let env = env_for(&db, &sim, &[]);
    let out = run_bin(&["sync"], &env).await;
    assert!(out.status.success(), "{}", text(&out));
    // Someone renames u3 in Wazzup's interface.
    sim.insert_users(
        "tok-1",
        &[UserPayload {
            id: "u3".into(),
            name: "Edited by hand".into(),
            phone: Some("37120000003".into()), // the phone it was synced with
        }],
    );
    let before = state_rows(&db).await;
    sim.clear_requests();

    // A synced user: what it was sent as and why, the mirror, nothing to send next.
    let e = explain_json(&env, &["u2"]).await;
    assert_eq!(e["account_id"], "a1");
    assert_eq!(e["sent_as"]["name"], "User 2");
    assert_eq!(e["sent_as"]["phone"], "371 *** *02", "the phone is masked");
    assert!(
        e["why"][0].as_str().unwrap().contains("default region LV"),
        "{}",
        e["why"]
    );
    let rows = e["role_rows"].as_array().unwrap();
    let row = |role: &str| {
        rows.iter()
            .find(|r| r["crm_role"] == role)
            .unwrap_or_else(|| panic!("no {role} row in {rows:?}"))
    };
    assert_eq!(row("seller")["became"], "seller");
    assert_eq!(row("seller")["because"], "the exact API value");
    assert_eq!(row("Boss")["became"], "refused");
    assert!(
        row("Boss")["because"]
            .as_str()
            .unwrap()
            .starts_with("unknown_role")
    );
    assert!(e["mirror"]["hash"].is_string() && e["mirror"]["synced_at"].is_string());
    assert_eq!(e["next_cycle"], serde_json::json!([]));
    assert_eq!(e["settings_last_pushed"][0]["role"], "seller");
    assert!(e.get("remote").is_none());

    // A refused user: the reason, its open dead letter, nothing sent.
    let e = explain_json(&env, &["blank"]).await;
    assert!(e["sent_as"].is_null());
    assert_eq!(e["refused"][0]["code"], "invalid_name");
    assert_eq!(e["dead_letters"][0]["error_code"], "invalid_name");
    assert!(e["dead_letters"][0]["resolved_at"].is_null());
    assert!(e["mirror"].is_null());

    // A user with a refused role row: the row, why, and its dead letter.
    let e = explain_json(&env, &["u1"]).await;
    let refused_row = e["role_rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["channel_id"] == "ch-2")
        .expect("the ch-2 row");
    assert_eq!(refused_row["became"], "refused");
    assert!(
        refused_row["because"]
            .as_str()
            .unwrap()
            .starts_with("ambiguous_role")
    );
    assert!(
        e["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["record_id"] == "u1/ch-2" && d["error_code"] == "ambiguous_role")
    );

    // Changed by hand in Wazzup: --remote shows the drift.
    let e = explain_json(&env, &["u3", "--remote"]).await;
    assert_eq!(e["remote"]["user"]["name"], "Edited by hand");
    assert_eq!(e["remote"]["differs"], serde_json::json!(["name"]));
    let table = run_bin(&["explain", "u3", "--remote"], &env).await;
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(
        table.contains("DIFFERS from what was last pushed: name"),
        "{table}"
    );
    assert!(table.contains("Next cycle"), "{table}");
    assert!(!table.contains("37120000003"), "no full phone in\n{table}");

    // Read-only: GETs only, and the state tables as they were.
    assert!(
        sim.requests().iter().all(|r| r.method == "GET"),
        "{:?}",
        sim.requests()
    );
    assert_eq!(state_rows(&db).await, before);
}

#[tokio::test]
async fn explain_asks_for_the_account_when_the_id_is_in_two() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    for (a, t) in [("a1", "tok-1"), ("a2", "tok-2")] {
        db.add_account(a, t).await;
        sim.add_account(t);
        db.add_users(a, 1).await;
    }
    let env = env_for(&db, &sim, &[]);

    let out = run_bin(&["explain", "u1"], &env).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("is in accounts a1, a2: pick one with --account"),
        "{}",
        text(&out)
    );
    let e = explain_json(&env, &["u1", "--account", "a2"]).await;
    assert_eq!(e["account_id"], "a2");
    assert_eq!(
        e["next_cycle"][0]["action"], "user_created",
        "not synced yet"
    );
}
