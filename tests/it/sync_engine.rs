//! The sync engine end to end: a real PostgreSQL per test, the simulator over loopback HTTP.

use crate::helpers::*;
use wazzup_sim::Fault;
use wazzup_sync::domain::{Role, UserPayload};
use wazzup_sync::sync::AccountOutcome;

#[tokio::test]
async fn first_sync_of_several_accounts_lands_every_user_and_its_settings() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    for (acct, token) in [("a1", "tok-1"), ("a2", "tok-2"), ("a3", "tok-3")] {
        db.add_account(acct, token).await;
        sim.add_account(token);
    }
    db.exec("UPDATE wazzup_accounts SET push_input_output_message_events_for_managers = true WHERE account_id = 'a2'")
        .await;
    db.add_users("a1", 150).await;
    db.add_users("a2", 3).await;
    db.add_user("a3", "boss", "  Anna Boss ", Some("+371 26 123 456"))
        .await;
    db.add_role("a3", "boss", "ch-9", "manager", true).await;
    db.exec("UPDATE wazzup_users SET hide_phone = true WHERE id = 'u2'")
        .await;

    let out = run_bin(&["sync"], &env_for(&db, &sim, &[])).await;
    assert!(out.status.success(), "{}", text(&out));

    assert_eq!(sim.users("tok-1").len(), 150);
    assert_eq!(sim.users("tok-2").len(), 3);
    let boss = &sim.users("tok-3")["boss"];
    assert_eq!(
        boss,
        &UserPayload {
            id: "boss".into(),
            name: "Anna Boss".into(),
            phone: Some("37126123456".into())
        }
    );
    let s1 = sim.settings("tok-1");
    assert_eq!(s1.user_roles.len(), 150);
    assert_eq!(s1.hide_phone_numbers_for_user_ids, ["u2"]);
    assert!(!s1.push_input_output_message_events_for_managers);
    assert!(
        sim.settings("tok-2")
            .push_input_output_message_events_for_managers
    );
    let s3 = sim.settings("tok-3");
    assert_eq!(s3.user_roles[0].role, Role::Manager);
    assert!(s3.user_roles[0].allow_get_new_clients);
    // 150 users → 2 POSTs, 1 PATCH; 3 users → 1 + 1; 1 user → 1 + 1.
    assert_eq!(sim.request_count(), 7);
    // Every request carried its account's token.
    assert!(sim.requests().iter().all(|r| r.token.starts_with("tok-")));
    // One summary line per account and one for the cycle.
    let log = text(&out);
    assert_eq!(log.matches("\"Account synced\"").count(), 3, "{log}");
    assert_eq!(log.matches("\"Cycle finished\"").count(), 1);
}

#[tokio::test]
async fn a_second_cycle_without_changes_sends_no_request() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 120).await;
    sync(&db, &sim, &[]).await;
    sim.clear_requests();

    let report = sync(&db, &sim, &[]).await;

    assert_eq!(sim.request_count(), 0);
    assert_eq!(report.accounts[0].unchanged, 120);
    assert!(report.all_ok());
}

#[tokio::test]
async fn an_update_a_delete_and_a_role_change_send_only_what_changed() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 30).await;
    sync(&db, &sim, &[]).await;
    sim.clear_requests();

    db.exec("UPDATE wazzup_users SET name = 'Renamed' WHERE id = 'u5'")
        .await;
    db.exec("DELETE FROM wazzup_users WHERE id = 'u7'").await;
    db.exec("UPDATE wazzup_user_roles SET role = 'auditor' WHERE user_id = 'u9'")
        .await;
    let report = sync(&db, &sim, &[]).await;

    let reqs = sim.requests();
    let summary: Vec<(String, Vec<String>)> = reqs
        .iter()
        .map(|r| (r.method.clone(), r.ids.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("POST".to_string(), vec!["u5".to_string()]),
            ("PATCH".to_string(), vec![]),
            ("DELETE".to_string(), vec!["u7".to_string()]),
        ]
    );
    let users = sim.users("tok-1");
    assert_eq!(users["u5"].name, "Renamed");
    assert!(!users.contains_key("u7"));
    let settings = sim.settings("tok-1");
    assert!(settings.user_roles.iter().all(|r| r.user_id != "u7"));
    assert_eq!(
        settings
            .user_roles
            .iter()
            .find(|r| r.user_id == "u9")
            .unwrap()
            .role,
        Role::Auditor
    );
    let a = &report.accounts[0];
    assert_eq!((a.updated, a.deleted, a.settings_pushed), (1, 1, true));
}

#[tokio::test]
async fn numbers_the_phone_library_cannot_read_whole_reach_wazzup_with_every_digit_written() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_user("a1", "spb", "St Petersburg", Some("+7 (812) 123-45-67"))
        .await;
    db.add_user("a1", "free", "Toll Free", Some("+7 800 555 35 36"))
        .await;
    db.add_user("a1", "mobile", "Mobile", Some("8 912 345-67-89"))
        .await;
    let region = ("WAZZUP_SYNC__SOURCE__DEFAULT_PHONE_REGION", "RU");
    sync(&db, &sim, &[region]).await;
    let phones: Vec<(String, Option<String>)> = sim
        .users("tok-1")
        .into_iter()
        .map(|(id, u)| (id, u.phone.map(|p| p.to_string())))
        .collect();
    assert_eq!(
        phones,
        [
            ("free".to_string(), Some("78005553536".to_string())),
            ("mobile".to_string(), Some("79123456789".to_string())),
            ("spb".to_string(), Some("78121234567".to_string())),
        ]
    );
}

#[tokio::test]
async fn every_kind_of_local_rejection_is_a_dead_letter_and_never_reaches_wazzup() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_user("a1", "ok", "Fine User", Some("+371 26 000 001"))
        .await;
    db.add_user("a1", &"x".repeat(65), "Long Id", None).await;
    db.add_user("a1", "noname", "   ", None).await;
    db.add_user("a1", "longname", &"n".repeat(151), None).await;
    db.add_user("a1", "dup", "First", None).await;
    db.add_user("a1", "dup", "Second", None).await;
    db.add_user("a1", "phone2", "Same Phone", Some("0037126000001"))
        .await;
    db.add_user("a1", "badphone", "Bad Phone", Some("not a phone"))
        .await;
    db.add_role("a1", "ok", "ch", "Director", false).await;
    db.add_role("a1", "ok", "", "seller", false).await;
    db.add_role("a1", "ghost", "ch", "seller", false).await;
    db.add_role("a1", "noname", "ch", "seller", false).await;
    db.add_role("a1", "badphone", "ch", "seller", true).await;

    let report = sync(&db, &sim, &[]).await;

    let users = sim.users("tok-1");
    let ids: Vec<&str> = users.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        ["badphone", "ok"],
        "only valid users reach Wazzup: {report:?} {:?}",
        sim.requests()
    );
    assert_eq!(
        users["badphone"].phone, None,
        "an unreadable phone is left out"
    );
    assert_eq!(report.accounts[0].phone_warnings, 1);
    let roles = sim.settings("tok-1").user_roles;
    assert_eq!(roles.len(), 1);
    assert_eq!(roles[0].user_id, "badphone");

    let dead = db.open_dead_letters().await;
    let got: Vec<(&str, &str, &str)> = dead
        .iter()
        .map(|d| {
            (
                d.entity.as_str(),
                d.record_id.as_str(),
                d.error_code.as_str(),
            )
        })
        .collect();
    let long_id = "x".repeat(65);
    let mut want = vec![
        ("settings", "ghost/ch", "unknown_user"),
        ("settings", "noname/ch", "user_rejected"),
        ("settings", "ok/", "empty_channel_id"),
        ("settings", "ok/ch", "unknown_role"),
        ("user", "dup", "duplicate_id"),
        ("user", "longname", "invalid_name"),
        ("user", "noname", "invalid_name"),
        ("user", "phone2", "duplicate_phone"),
        ("user", long_id.as_str(), "invalid_id"),
    ];
    want.sort();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert_eq!(got_sorted, want);
    assert!(
        dead.iter()
            .all(|d| d.kind == "invalid" && d.http_status.is_none() && !d.error_message.is_empty())
    );
    // Both rows of the duplicated id share one open dead letter, not one per cycle either.
    sync(&db, &sim, &[]).await;
    assert_eq!(db.open_dead_letters().await.len(), dead.len());
    // Nothing refused locally was ever in a request.
    assert!(
        sim.requests()
            .iter()
            .all(|r| r.ids.iter().all(|id| id == "ok" || id == "badphone"))
    );
}

#[tokio::test]
async fn a_duplicate_phone_refused_by_wazzup_inside_a_batch_of_100_holds_back_only_that_record() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    // Someone added a user in the Wazzup UI with the phone the CRM gives u42.
    sim.insert_users(
        "tok-1",
        &[UserPayload {
            id: "outsider".into(),
            name: "Outsider".into(),
            phone: Some("37120000042".into()),
        }],
    );
    db.add_users("a1", 100).await;

    let report = sync(&db, &sim, &[]).await;

    let users = sim.users("tok-1");
    assert_eq!(users.len(), 100, "99 land beside the outsider");
    assert!(!users.contains_key("u42"));
    let dead = db.open_dead_letters().await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        (d.entity.as_str(), d.record_id.as_str(), d.kind.as_str()),
        ("user", "u42", "rejected")
    );
    assert_eq!(d.error_code, "USER_ALREADY_EXISTS");
    assert_eq!(d.http_status, Some(400));
    assert!(d.payload.as_deref().unwrap().contains("37120000042"));
    assert_eq!(report.accounts[0].rejected_remotely, 1);
    assert_eq!(db.mirror_count("a1").await, 99);
    // The settings reference only users Wazzup holds.
    assert!(
        sim.settings("tok-1")
            .user_roles
            .iter()
            .all(|r| r.user_id != "u42")
    );
    assert_eq!(sim.settings("tok-1").user_roles.len(), 99);
    assert!(
        report.all_ok(),
        "a refused record does not make the account fail"
    );
}

#[tokio::test]
async fn records_named_in_an_error_body_are_singled_out_without_splitting() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 10).await;
    sim.push_fault(
        Some("POST"),
        Some("/v2/users"),
        Fault::Status {
            status: 400,
            body: r#"{"error":"invalidUserData","description":"bad name","data":[{"index":3,"fields":["name"]}]}"#.into(),
            retry_after: None,
        },
    );

    sync(&db, &sim, &[]).await;

    // The refused batch, then the nine others in one request, then the settings.
    let posts = sim.requests().iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, 2);
    let dead = db.open_dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].record_id, "u3",
        "sent sorted by id: u1, u10, u2, u3"
    );
    assert_eq!(dead[0].error_code, "invalidUserData");
    assert_eq!(sim.users("tok-1").len(), 9);
}

#[tokio::test]
async fn a_refused_user_is_not_resent_until_its_content_changes() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.insert_users(
        "tok-1",
        &[UserPayload {
            id: "outsider".into(),
            name: "Outsider".into(),
            phone: Some("37120000001".into()),
        }],
    );
    db.add_users("a1", 1).await;
    sync(&db, &sim, &[]).await;
    assert_eq!(db.open_dead_letters().await.len(), 1);
    sim.clear_requests();

    // Unchanged: waits for its time (1 minute after the first failure) and costs nothing.
    let report = sync(&db, &sim, &[]).await;
    assert_eq!(sim.request_count(), 0);
    assert_eq!(report.accounts[0].waiting, 1);

    // Fixed in the CRM: sent at once, lands, and the dead letter is resolved.
    db.exec("UPDATE wazzup_users SET phone = '+371 26 999 999' WHERE id = 'u1'")
        .await;
    sync(&db, &sim, &[]).await;
    assert_eq!(
        sim.users("tok-1")["u1"].phone.as_deref(),
        Some("37126999999")
    );
    assert!(db.open_dead_letters().await.is_empty());
    let resolved: (String, Option<String>) = sqlx::query_as(
        "SELECT record_id, resolution FROM wazzup_sync.dead_letters WHERE resolved_at IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(resolved, ("u1".to_string(), Some("synced".to_string())));
}

#[tokio::test]
async fn a_refused_settings_document_and_a_refused_deletion_close_once_they_land() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    sync(&db, &sim, &[]).await;

    db.exec("DELETE FROM wazzup_users WHERE id = 'u3'").await;
    db.exec("DELETE FROM wazzup_user_roles WHERE user_id = 'u3'")
        .await;
    db.exec("UPDATE wazzup_user_roles SET role = 'auditor' WHERE user_id = 'u1'")
        .await;
    for (method, path) in [("PATCH", "/v2/settings"), ("DELETE", "/v2/users")] {
        sim.push_fault(
            Some(method),
            Some(path),
            Fault::Status {
                status: 400,
                body: r#"{"error":"validationError","description":"refused: phone 79123456789"}"#
                    .into(),
                retry_after: None,
            },
        );
    }
    sync(&db, &sim, &[]).await;
    // The history's rows mask phones, also in Wazzup's own words.
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT after->>'reason' FROM wazzup_sync.changes WHERE action = 'refused' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(reasons, ["refused: phone 791 *** *89"; 2]);
    let open: Vec<(String, String)> = db
        .open_dead_letters()
        .await
        .into_iter()
        .map(|d| (d.entity, d.record_id))
        .collect();
    assert_eq!(
        open,
        [
            ("delete".to_string(), "u3".to_string()),
            ("settings".to_string(), "(document)".to_string())
        ]
    );
    assert!(sim.users("tok-1").contains_key("u3"));

    // Due again, both are sent, land, and their dead letters close as synced.
    db.exec("UPDATE wazzup_sync.dead_letters SET next_attempt_at = now() - interval '1 second'")
        .await;
    sync(&db, &sim, &[]).await;
    assert!(db.open_dead_letters().await.is_empty());
    assert!(!sim.users("tok-1").contains_key("u3"));
    let u1 = sim.settings("tok-1").user_roles;
    assert!(
        u1.iter()
            .filter(|r| r.user_id == "u1")
            .all(|r| r.role == Role::Auditor)
    );
    let resolved: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT record_id, resolution FROM wazzup_sync.dead_letters ORDER BY record_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        resolved,
        [
            ("(document)".to_string(), Some("synced".to_string())),
            ("u3".to_string(), Some("synced".to_string()))
        ]
    );
}

#[tokio::test]
async fn the_user_limit_holds_creates_until_the_cycles_deletes_make_room_and_updates_still_go() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.set_user_limit("tok-1", 10);
    db.add_users("a1", 8).await;
    sync(&db, &sim, &[]).await;
    assert_eq!(sim.users("tok-1").len(), 8);

    // Five new users (room for two), one rename, one departure.
    db.exec(
        "INSERT INTO wazzup_users SELECT 'a1', 'n' || g, 'New ' || g, NULL, false FROM generate_series(1, 5) g;
         INSERT INTO wazzup_user_roles SELECT 'a1', 'n' || g, 'ch-1', 'auditor', false FROM generate_series(1, 5) g;
         UPDATE wazzup_users SET name = 'Renamed' WHERE id = 'u1';
         DELETE FROM wazzup_users WHERE id = 'u8';
         DELETE FROM wazzup_user_roles WHERE user_id = 'u8';",
    )
    .await;
    let report = sync(&db, &sim, &[]).await;

    let users = sim.users("tok-1");
    assert_eq!(users["u1"].name, "Renamed", "the update went through");
    assert!(!users.contains_key("u8"), "the delete went through");
    let created: Vec<&String> = users.keys().filter(|k| k.starts_with('n')).collect();
    assert_eq!(
        created.len(),
        3,
        "the room left was filled, and the departure's room after the deletes"
    );
    let dead = db.open_dead_letters().await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead.iter()
            .all(|d| d.error_code == "USER_LIMIT_EXCEEDED" && d.entity == "user")
    );
    let settings = sim.settings("tok-1");
    assert_eq!(
        settings
            .user_roles
            .iter()
            .filter(|r| r.user_id.starts_with('n'))
            .count(),
        3
    );
    assert_eq!(report.accounts[0].rejected_remotely, 2);
    assert_eq!(report.accounts[0].created, 3);
}

#[tokio::test]
async fn plan_sends_nothing_and_writes_nothing() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 5).await;
    db.add_user("a1", "bad", "", None).await;

    let out = run_bin(&["plan"], &env_for(&db, &sim, &[])).await;

    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("a1")).expect(&stdout);
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols, ["a1", "5", "0", "0", "change", "1", "0"]);
    assert_eq!(sim.request_count(), 0);
    let schema: Option<String> = sqlx::query_scalar("SELECT to_regnamespace('wazzup_sync')::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(schema, None, "the dry run created nothing");

    // After a real sync and a change, plan shows exactly that change.
    sync(&db, &sim, &[]).await;
    db.exec("UPDATE wazzup_users SET name = 'X' WHERE id = 'u1'; DELETE FROM wazzup_users WHERE id = 'u2'").await;
    sim.clear_requests();
    let out = run_bin(&["plan", "--format", "json"], &env_for(&db, &sim, &[])).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json plan");
    let a = &json["accounts"][0];
    assert_eq!(
        (
            a["would_create"].as_u64(),
            a["would_update"].as_u64(),
            a["would_delete"].as_u64()
        ),
        (Some(0), Some(1), Some(1))
    );
    assert_eq!(sim.request_count(), 0);
    assert_eq!(db.mirror_count("a1").await, 5);
}

#[tokio::test]
async fn plan_hashes_the_settings_as_sync_sent_them_whatever_the_ids_hold() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    let ids = ["q\"uote", "back\\slash", "Bērziņš", "smile😀"];
    for (i, id) in ids.iter().enumerate() {
        db.add_user("a1", id, &format!("User {i}"), None).await;
        db.add_role("a1", id, "kanāls \"1\" \\ 😀", "manager", i % 2 == 0)
            .await;
    }
    db.exec("UPDATE wazzup_users SET hide_phone = true").await;
    sync(&db, &sim, &[]).await;
    let held = sim.settings("tok-1");
    assert_eq!(held.user_roles.len(), ids.len(), "{held:?}");
    assert_eq!(held.hide_phone_numbers_for_user_ids.len(), ids.len());

    let out = run_bin(&["plan", "--format", "json"], &env_for(&db, &sim, &[])).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json plan");
    assert_eq!(json["accounts"][0]["settings_changed"], false, "{json}");
    // And a real change is seen as one.
    db.exec("UPDATE wazzup_user_roles SET role = 'auditor' WHERE user_id = 'Bērziņš'")
        .await;
    let out = run_bin(&["plan", "--format", "json"], &env_for(&db, &sim, &[])).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json plan");
    assert_eq!(json["accounts"][0]["settings_changed"], true, "{json}");
}

#[tokio::test]
async fn single_account_mode_needs_no_accounts_query_nor_account_columns() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE staff (id int, full_name text, phone text);
         INSERT INTO staff VALUES (1, 'One', '26 123 456'), (2, 'Two', NULL);",
    )
    .await;
    let sim = simulator().await;
    sim.add_account("single-token");

    let out = run_bin(
        &["sync"],
        &env_for(
            &db,
            &sim,
            &[
                ("WAZZUP_SYNC__WAZZUP__TOKEN", "single-token"),
                ("WAZZUP_SYNC__SOURCE__USERS_QUERY", "SELECT id, full_name AS name, phone FROM staff"),
                (
                    "WAZZUP_SYNC__SOURCE__ROLES_QUERY",
                    "SELECT id AS user_id, 'ch-1' AS channel_id, 'seller' AS role, true AS allow_get_new_clients FROM staff",
                ),
            ],
        ),
    )
    .await;

    assert!(out.status.success(), "{}", text(&out));
    let users = sim.users("single-token");
    assert_eq!(
        users["1"].phone.as_deref(),
        Some("37126123456"),
        "national number read with region LV"
    );
    assert_eq!(users.len(), 2);
    assert_eq!(sim.settings("single-token").user_roles.len(), 2);
    assert!(
        !text(&out).contains("single-token"),
        "the token never reaches the output"
    );
}

#[tokio::test]
async fn a_refused_token_fails_only_its_account_and_sync_exits_1() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("good", "tok-good").await;
    db.add_account("bad", "tok-secret-bad").await;
    sim.add_account("tok-good");
    db.add_users("good", 3).await;
    db.add_users("bad", 3).await;

    let out = run_bin(&["sync"], &env_for(&db, &sim, &[])).await;

    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(sim.users("tok-good").len(), 3);
    let status: String =
        sqlx::query_scalar("SELECT status FROM wazzup_sync.accounts WHERE account_id = 'bad'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "auth_failed");
    let log = text(&out);
    assert!(log.contains("account not synced: bad"), "{log}");
    assert!(!log.contains("tok-secret-bad") && !log.contains("tok-good"));

    // The unchanged token is not tried again; a rotated one is.
    sim.clear_requests();
    let report = sync(&db, &sim, &[]).await;
    assert!(sim.requests().iter().all(|r| r.token != "tok-secret-bad"));
    let bad = report
        .accounts
        .iter()
        .find(|a| a.account_id == "bad")
        .unwrap();
    assert!(matches!(bad.outcome, AccountOutcome::Skipped(_)));
    db.exec("UPDATE wazzup_accounts SET token = 'tok-new' WHERE account_id = 'bad'")
        .await;
    sim.add_account("tok-new");
    let report = sync(&db, &sim, &[]).await;
    assert!(report.all_ok());
    assert_eq!(sim.users("tok-new").len(), 3);
}

#[tokio::test]
async fn a_user_refused_locally_after_syncing_stays_in_wazzup_with_its_roles() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    sync(&db, &sim, &[]).await;
    let before = sim.settings("tok-1");

    db.exec("UPDATE wazzup_users SET name = '' WHERE id = 'u2'")
        .await;
    let report = sync(&db, &sim, &[]).await;

    assert!(sim.users("tok-1").contains_key("u2"), "not deleted");
    assert_eq!(
        sim.users("tok-1")["u2"].name,
        "User 2",
        "left as last synced"
    );
    assert_eq!(sim.settings("tok-1"), before, "its roles are kept");
    assert_eq!(report.accounts[0].deleted, 0);
    let dead = db.open_dead_letters().await;
    let user_dl = dead.iter().find(|d| d.entity == "user").unwrap();
    assert_eq!(
        (user_dl.record_id.as_str(), user_dl.error_code.as_str()),
        ("u2", "invalid_name")
    );
    assert!(
        dead.iter()
            .any(|d| d.record_id == "u2/ch-1" && d.error_code == "user_rejected")
    );

    // Fixed: the dead letter closes.
    db.exec("UPDATE wazzup_users SET name = 'User Two' WHERE id = 'u2'")
        .await;
    sync(&db, &sim, &[]).await;
    assert!(db.open_dead_letters().await.is_empty());
    assert_eq!(sim.users("tok-1")["u2"].name, "User Two");
}

#[tokio::test]
async fn a_short_processed_count_marks_only_the_users_that_landed() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 10).await;
    sim.push_fault(
        Some("POST"),
        Some("/v2/users"),
        Fault::ShortProcessed { processed: 6 },
    );

    let report = sync(&db, &sim, &[]).await;

    assert_eq!(sim.users("tok-1").len(), 6);
    assert_eq!(
        db.mirror_count("a1").await,
        6,
        "the mirror claims only what landed"
    );
    assert_eq!(report.accounts[0].deferred, 4);
    assert!(
        db.open_dead_letters().await.is_empty(),
        "not refused: just not yet there"
    );
    // The settings only reference users Wazzup holds; the next cycle completes it.
    assert_eq!(sim.settings("tok-1").user_roles.len(), 6);
    sync(&db, &sim, &[]).await;
    assert_eq!(sim.users("tok-1").len(), 10);
    assert_eq!(sim.settings("tok-1").user_roles.len(), 10);
}

#[tokio::test]
async fn transient_faults_are_retried_and_a_batch_that_keeps_failing_waits_for_the_next_cycle() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 5).await;
    sim.push_fault(
        None,
        None,
        Fault::Status {
            status: 429,
            body: String::new(),
            retry_after: Some("0".into()),
        },
    );
    sim.push_fault(
        None,
        None,
        Fault::Status {
            status: 502,
            body: "<html>Bad gateway</html>".into(),
            retry_after: None,
        },
    );

    let report = sync(&db, &sim, &[]).await;

    assert!(report.all_ok());
    assert_eq!(report.accounts[0].retries, 2);
    assert_eq!(sim.users("tok-1").len(), 5);

    db.exec("UPDATE wazzup_users SET name = 'Changed' WHERE id = 'u1'")
        .await;
    for _ in 0..3 {
        sim.push_fault(
            Some("POST"),
            None,
            Fault::Status {
                status: 500,
                body: String::new(),
                retry_after: None,
            },
        );
    }
    let out = run_bin(
        &["sync"],
        &env_for(
            &db,
            &sim,
            &[("WAZZUP_SYNC__WAZZUP__RETRY_MAX_ATTEMPTS", "3")],
        ),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("partly synced"), "{}", text(&out));
    assert!(
        db.open_dead_letters().await.is_empty(),
        "a transient failure is never a dead letter"
    );
    assert_eq!(sim.users("tok-1")["u1"].name, "User 1");
    sync(&db, &sim, &[]).await;
    assert_eq!(sim.users("tok-1")["u1"].name, "Changed");
}

#[tokio::test]
async fn rows_of_accounts_without_an_account_row_are_skipped_and_counted() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 2).await;
    db.add_users("nobody", 4).await;

    let report = sync(&db, &sim, &[]).await;

    assert_eq!(report.orphan_users, 4);
    assert_eq!(report.orphan_roles, 4);
    assert_eq!(report.accounts.len(), 1);
    assert_eq!(sim.users("tok-1").len(), 2);
}

#[tokio::test]
async fn deletion_can_be_turned_off() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    sync(&db, &sim, &[]).await;
    db.exec("DELETE FROM wazzup_users WHERE id = 'u3'").await;

    sync(&db, &sim, &[("WAZZUP_SYNC__SYNC__DELETE_MISSING", "false")]).await;

    assert!(sim.users("tok-1").contains_key("u3"));
    assert!(sim.requests().iter().all(|r| r.method != "DELETE"));
}

#[tokio::test]
async fn a_mass_deletion_is_held_back_until_let_through() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 50).await;
    sync(&db, &sim, &[]).await;
    db.exec("DELETE FROM wazzup_users").await;

    let out = run_bin(&["sync"], &env_for(&db, &sim, &[])).await;
    assert!(
        text(&out).contains("Held back a mass deletion"),
        "{}",
        text(&out)
    );
    assert_eq!(sim.users("tok-1").len(), 50);

    let out = run_bin(
        &["sync", "--allow-mass-delete", "a1"],
        &env_for(&db, &sim, &[]),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(sim.users("tok-1").is_empty());
    assert!(sim.settings("tok-1").user_roles.is_empty());
}

#[tokio::test]
async fn a_bad_setting_stops_start_up_with_one_line_naming_it() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;

    let out = run_bin(
        &["sync"],
        &env_for(&db, &sim, &[("WAZZUP_SYNC__SYNC__BATCH_SIZE", "500")]),
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("WAZZUP_SYNC__SYNC__BATCH_SIZE"), "{err}");

    let out = run_bin(&["sync"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("WAZZUP_SYNC__SOURCE__URL"));
}

#[tokio::test]
async fn a_view_with_a_column_of_the_wrong_type_fails_the_cycle_with_a_clear_line() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 1).await;

    let out = run_bin(
        &["sync"],
        &env_for(
            &db,
            &sim,
            &[(
                "WAZZUP_SYNC__SOURCE__USERS_QUERY",
                "SELECT account_id, id, name, phone, 42 AS hide_phone FROM wazzup_users",
            )],
        ),
    )
    .await;

    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("column `hide_phone` has type INT4; expected boolean"),
        "{}",
        text(&out)
    );
    assert_eq!(sim.request_count(), 0);
}

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_again_to_one_holding_data() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 2).await;
    let out = run_bin(&["migrate"], &env_for(&db, &sim, &[])).await;
    assert!(out.status.success(), "{}", text(&out));
    sync(&db, &sim, &[]).await;

    let out = run_bin(&["migrate"], &env_for(&db, &sim, &[])).await;

    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(db.mirror_count("a1").await, 2);
}

#[tokio::test]
async fn the_state_can_live_in_another_database_and_schema() {
    let crm = TestDb::with_crm().await;
    let state = TestDb::new().await;
    let sim = simulator().await;
    crm.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    crm.add_users("a1", 2).await;

    sync(
        &crm,
        &sim,
        &[
            ("WAZZUP_SYNC__STATE__URL", &state.url),
            ("WAZZUP_SYNC__STATE__SCHEMA", "sync_state"),
        ],
    )
    .await;

    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_state.mirror_users")
        .fetch_one(&state.pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let in_crm: Option<String> = sqlx::query_scalar("SELECT to_regnamespace('sync_state')::text")
        .fetch_one(&crm.pool)
        .await
        .unwrap();
    assert_eq!(in_crm, None, "nothing was written to the CRM database");
}

#[tokio::test]
async fn integer_and_uuid_columns_are_read_as_text_in_multi_account_mode() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE companies (id int, token text);
         CREATE TABLE staff (company_id int, id int, name text, channel uuid);
         INSERT INTO companies VALUES (1, 'tok-1'), (2, 'tok-2');
         INSERT INTO staff VALUES (1, 10, 'Ten', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'),
                                  (2, 20, 'Twenty', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12');",
    )
    .await;
    let sim = simulator().await;
    sim.add_account("tok-1");
    sim.add_account("tok-2");

    let report = sync(
        &db,
        &sim,
        &[
            ("WAZZUP_SYNC__SOURCE__ACCOUNTS_QUERY", "SELECT id AS account_id, token FROM companies"),
            ("WAZZUP_SYNC__SOURCE__USERS_QUERY", "SELECT company_id AS account_id, id, name FROM staff"),
            (
                "WAZZUP_SYNC__SOURCE__ROLES_QUERY",
                "SELECT company_id AS account_id, id AS user_id, channel AS channel_id, 'seller' AS role, true AS allow_get_new_clients FROM staff",
            ),
        ],
    )
    .await;

    assert!(report.all_ok(), "{report:?}");
    assert_eq!(sim.users("tok-2")["20"].name, "Twenty");
    assert_eq!(
        sim.settings("tok-1").user_roles[0].channel_id,
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    );
}

#[tokio::test]
async fn columns_of_any_case_and_text_like_type_are_read_per_account() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE companies (id int8, token text);
         CREATE TABLE staff (company_id int8, id int8, full_name varchar(40), mobile char(16),
                             hidden boolean);
         INSERT INTO companies VALUES (1, 'tok-1'), (2, 'tok-2'), (3, 'tok-3');
         INSERT INTO staff VALUES (2, 21, 'Twenty-one', '+37126123456', true),
                                  (1, 11, 'Eleven', NULL, NULL),
                                  (2, 22, 'Twenty-two', '+37126123457', false),
                                  (1, 12, 'Twelve', '+37126123458', NULL);",
    )
    .await;
    let sim = simulator().await;
    for t in ["tok-1", "tok-2", "tok-3"] {
        sim.add_account(t);
    }
    let env = [
        (
            "WAZZUP_SYNC__SOURCE__ACCOUNTS_QUERY",
            "SELECT id AS account_id, token FROM companies",
        ),
        (
            "WAZZUP_SYNC__SOURCE__USERS_QUERY",
            "SELECT company_id AS account_id, id AS \"ID\", full_name AS \"Name\", mobile AS \"Phone\", hidden AS \"Hide_Phone\" FROM staff",
        ),
        (
            "WAZZUP_SYNC__SOURCE__ROLES_QUERY",
            "SELECT company_id AS account_id, id AS \"User_Id\", 'ch-' || company_id AS channel_id, 'seller'::varchar AS \"ROLE\", NULL::boolean AS allow_get_new_clients FROM staff",
        ),
    ];

    let report = sync(&db, &sim, &env).await;

    assert!(report.all_ok(), "{report:?}");
    let one = sim.users("tok-1");
    let two = sim.users("tok-2");
    assert_eq!(one.len(), 2);
    assert_eq!(one["11"].name, "Eleven");
    assert_eq!(one["11"].phone, None);
    assert_eq!(
        one["12"].phone.as_deref(),
        Some("37126123458"),
        "char(16)'s padding is not part of the phone"
    );
    assert_eq!(two["21"].name, "Twenty-one");
    assert!(sim.users("tok-3").is_empty());
    assert_eq!(
        sim.settings("tok-2").hide_phone_numbers_for_user_ids,
        ["21"]
    );
    let roles: Vec<(String, String)> = sim
        .settings("tok-2")
        .user_roles
        .iter()
        .map(|r| (r.user_id.to_string(), r.channel_id.to_string()))
        .collect();
    assert_eq!(
        roles,
        [
            ("21".to_string(), "ch-2".to_string()),
            ("22".into(), "ch-2".into())
        ]
    );
    // Read again with nothing changed: every row is recognised.
    let again = sync(&db, &sim, &env).await;
    assert!(
        again.accounts.iter().all(|a| a.source_unchanged),
        "{again:?}"
    );
}

#[tokio::test]
async fn an_account_whose_rows_did_not_change_is_not_read_again_until_something_changes() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    db.add_account("a2", "tok-2").await;
    sim.add_account("tok-1");
    sim.add_account("tok-2");
    db.add_users("a1", 5).await;
    db.add_users("a2", 5).await;
    let first = sync(&db, &sim, &[]).await;
    assert!(first.accounts.iter().all(|a| !a.source_unchanged));

    let second = sync(&db, &sim, &[]).await;
    assert!(
        second
            .accounts
            .iter()
            .all(|a| a.source_unchanged && a.unchanged == 5),
        "{second:?}"
    );

    // A change in one account's rows, or in a setting that changes what rows mean, is seen.
    db.exec(
        "UPDATE wazzup_user_roles SET role = 'auditor' WHERE account_id = 'a2' AND user_id = 'u1'",
    )
    .await;
    let third = sync(&db, &sim, &[]).await;
    let by_id = |r: &wazzup_sync::sync::CycleReport, id: &str| {
        r.accounts
            .iter()
            .find(|a| a.account_id == id)
            .unwrap()
            .clone()
    };
    assert!(by_id(&third, "a1").source_unchanged);
    assert!(!by_id(&third, "a2").source_unchanged);
    assert!(by_id(&third, "a2").settings_pushed);
    let with_region = sync(
        &db,
        &sim,
        &[("WAZZUP_SYNC__SOURCE__DEFAULT_PHONE_REGION", "RU")],
    )
    .await;
    assert!(with_region.accounts.iter().all(|a| !a.source_unchanged));
    // A rotated token is a change too.
    db.exec("UPDATE wazzup_accounts SET token = 'tok-1b' WHERE account_id = 'a1'")
        .await;
    sim.add_account("tok-1b");
    let rotated = sync(
        &db,
        &sim,
        &[("WAZZUP_SYNC__SOURCE__DEFAULT_PHONE_REGION", "RU")],
    )
    .await;
    assert!(!by_id(&rotated, "a1").source_unchanged);
    assert!(by_id(&rotated, "a2").source_unchanged);
}

#[tokio::test]
async fn padded_char_account_ids_are_matched_and_their_changes_seen() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE wazzup_accounts (account_id char(6), token text);
         CREATE TABLE wazzup_users (account_id char(6), id text, name text);
         CREATE TABLE wazzup_user_roles (account_id char(6), user_id text, channel_id text, role text,
                                         allow_get_new_clients boolean);
         INSERT INTO wazzup_accounts VALUES ('ab', 'tok-1');
         INSERT INTO wazzup_users VALUES ('ab', 'u1', 'One'), (NULL, 'stray', 'Stray');",
    )
    .await;
    let sim = simulator().await;
    sim.add_account("tok-1");
    let first = sync(&db, &sim, &[]).await;
    assert_eq!(first.accounts[0].account_id, "ab");
    assert_eq!(first.orphan_users, 1);
    assert!(sync(&db, &sim, &[]).await.accounts[0].source_unchanged);

    db.exec("UPDATE wazzup_users SET name = 'One again' WHERE id = 'u1'")
        .await;
    let third = sync(&db, &sim, &[]).await;

    assert!(!third.accounts[0].source_unchanged, "the change is seen");
    assert_eq!(sim.users("tok-1")["u1"].name, "One again");
}

#[tokio::test]
async fn an_accounts_batches_go_out_together_and_its_settings_wait_for_all_of_them() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 400).await;
    // Every answer takes half a second: only requests sent together overlap.
    sim.set_latency(500);

    let out = run_bin(&["sync"], &env_for(&db, &sim, &[])).await;

    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(sim.users("tok-1").len(), 400);
    assert_eq!(
        sim.in_flight().peak,
        4,
        "four batches of one account at once"
    );
    let requests = sim.requests();
    let posts: Vec<_> = requests.iter().filter(|r| r.method == "POST").collect();
    let patch = requests
        .iter()
        .find(|r| r.method == "PATCH")
        .expect("settings");
    assert_eq!(posts.len(), 4);
    let last_post = posts.iter().filter_map(|r| r.at).max().unwrap();
    assert!(
        patch.at.unwrap() >= last_post + std::time::Duration::from_millis(500),
        "the settings went out only after every batch was answered"
    );
}

#[tokio::test]
async fn a_new_phone_region_reads_every_unchanged_row_again() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    // National numbers: what they mean depends on the region.
    db.exec("UPDATE wazzup_users SET phone = '2612345' || right(id, 1)")
        .await;
    let lv = [("WAZZUP_SYNC__SOURCE__DEFAULT_PHONE_REGION", "LV")];
    sync(&db, &sim, &lv).await;
    assert_eq!(
        sim.users("tok-1")["u2"].phone.as_deref(),
        Some("37126123452")
    );
    sim.clear_requests();

    // Not a byte of the rows changed, but they mean something else now.
    let dk = [("WAZZUP_SYNC__SOURCE__DEFAULT_PHONE_REGION", "DK")];
    let report = sync(&db, &sim, &dk).await;

    assert_eq!(report.accounts[0].updated, 3);
    let users = sim.users("tok-1");
    let phones: Vec<_> = users.values().map(|u| u.phone.clone().unwrap()).collect();
    assert_eq!(phones, ["4526123451", "4526123452", "4526123453"]);
}

#[tokio::test]
async fn a_mirror_that_remembers_no_rows_learns_them_without_sending_anything() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 20).await;
    sync(&db, &sim, &[]).await;
    let forgotten = "SELECT count(*) FROM wazzup_sync.mirror_users
                     WHERE source_hash IS NULL OR hide_phone IS NULL OR name IS NULL";
    let n: i64 = sqlx::query_scalar(forgotten)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        n, 0,
        "every acknowledged user remembers the row it came from"
    );

    // As after an upgrade from a version that did not hash rows.
    db.exec(
        "UPDATE wazzup_sync.mirror_users SET source_hash = NULL, name = NULL, hide_phone = NULL",
    )
    .await;
    db.exec("UPDATE wazzup_users SET name = 'Renamed' WHERE id = 'u1'")
        .await;
    sim.clear_requests();
    let report = sync(&db, &sim, &[]).await;

    let sent: Vec<(String, Vec<String>)> = sim
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.ids.clone()))
        .collect();
    assert_eq!(sent, [("POST".to_string(), vec!["u1".to_string()])]);
    assert_eq!(report.accounts[0].unchanged, 19);
    let n: i64 = sqlx::query_scalar(forgotten)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "the unchanged users' rows are remembered again");
    let name: String =
        sqlx::query_scalar("SELECT name FROM wazzup_sync.mirror_users WHERE user_id = 'u7'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(name, "User 7");
}
