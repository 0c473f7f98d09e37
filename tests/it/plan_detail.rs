//! `plan --detail`: who would be created, updated (and which fields), deleted, and who gets
//! which access; changes that widen access are marked. An unreadable phone is named.

use crate::helpers::*;

async fn plan_json(env: &[(String, String)]) -> serde_json::Value {
    let out = run_bin(&["plan", "--detail", "--format", "json"], env).await;
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

/// The records of a user, as (action, channel_id) pairs.
fn records_of<'a>(plan: &'a serde_json::Value, user: &str) -> Vec<&'a serde_json::Value> {
    plan["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["user_id"] == user)
        .collect()
}

fn action<'a>(records: &[&'a serde_json::Value], action: &str) -> &'a serde_json::Value {
    records
        .iter()
        .find(|r| r["action"] == action)
        .unwrap_or_else(|| panic!("no {action} in {records:?}"))
}

#[tokio::test]
async fn plan_detail_lists_each_record_and_marks_only_changes_that_widen_access() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    for (user, phone, role, new_clients) in [
        ("u1", Some("+371 26 000 001"), "seller", false),
        ("u2", Some("+371 26 000 002"), "seller", false),
        ("u3", None, "seller", false),
        ("u4", None, "seller", true),
        ("u5", None, "manager", false),
        ("u6", None, "auditor", false),
    ] {
        db.add_user("a1", user, &format!("User {user}"), phone)
            .await;
        db.add_role("a1", user, "ch-1", role, new_clients).await;
    }
    let env = env_for(&db, &sim, &[]);

    // Before the first sync: everyone would be created; new manager and auditor rows widen.
    let plan = plan_json(&env).await;
    let u1 = records_of(&plan, "u1");
    let create = action(&u1, "user_created");
    assert_eq!(create["account_id"], "a1");
    assert_eq!(create["name"], "User u1");
    assert_eq!(create["phone"], "371 *** *01", "phones are masked");
    assert!(create.get("widens_access").is_none());
    assert!(action(&u1, "role_granted").get("widens_access").is_none());
    assert_eq!(
        action(&records_of(&plan, "u5"), "role_granted")["widens_access"],
        true
    );
    assert_eq!(
        action(&records_of(&plan, "u6"), "role_granted")["widens_access"],
        true
    );
    assert!(
        plan["records"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["account_id"] == "a1" && r["user_id"].is_string())
    );
    assert_eq!(sim.request_count(), 0, "plan sends nothing");

    let out = run_bin(&["sync"], &env).await;
    assert!(out.status.success(), "{}", text(&out));
    db.exec(
        "UPDATE wazzup_users SET name = 'Renamed' WHERE id = 'u1';
         UPDATE wazzup_users SET phone = '+371 26 000 009' WHERE id = 'u2';
         DELETE FROM wazzup_users WHERE id = 'u3';
         UPDATE wazzup_user_roles SET role = 'manager' WHERE user_id = 'u1';
         UPDATE wazzup_user_roles SET allow_get_new_clients = true WHERE user_id = 'u2';
         UPDATE wazzup_user_roles SET allow_get_new_clients = false WHERE user_id = 'u4';
         UPDATE wazzup_user_roles SET role = 'seller' WHERE user_id = 'u5';
         UPDATE wazzup_user_roles SET role = 'manager' WHERE user_id = 'u6';",
    )
    .await;
    db.add_role("a1", "u4", "ch-2", "auditor", false).await;

    let plan = plan_json(&env).await;

    let u1 = records_of(&plan, "u1");
    assert_eq!(
        action(&u1, "user_updated")["changes"],
        serde_json::json!({"name": {"from": "User u1", "to": "Renamed"}})
    );
    let changed = action(&u1, "role_changed");
    assert_eq!(changed["from"]["role"], "seller");
    assert_eq!(changed["to"]["role"], "manager");
    assert_eq!(changed["widens_access"], true);
    let u2 = records_of(&plan, "u2");
    assert_eq!(
        action(&u2, "user_updated")["changes"],
        serde_json::json!({"phone": {"from": "371 *** *02", "to": "371 *** *09"}})
    );
    assert_eq!(
        action(&u2, "new_clients_on")["widens_access"],
        true,
        "new clients turned on"
    );
    let u3 = records_of(&plan, "u3");
    action(&u3, "user_deleted");
    assert!(action(&u3, "role_revoked").get("widens_access").is_none());
    let u4 = records_of(&plan, "u4");
    assert!(u4.iter().any(|r| r["action"] == "role_granted"
        && r["channel_id"] == "ch-2"
        && r["widens_access"] == true));
    assert!(
        u4.iter()
            .any(|r| r["action"] == "new_clients_off" && r.get("widens_access").is_none()),
        "new clients turned off narrows: {u4:?}"
    );
    assert!(
        action(&records_of(&plan, "u5"), "role_changed")
            .get("widens_access")
            .is_none(),
        "manager to seller narrows"
    );
    assert_eq!(
        action(&records_of(&plan, "u6"), "role_changed")["widens_access"],
        true,
        "auditor to manager widens"
    );
    let widening: usize = plan["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("widens_access").is_some())
        .count();
    assert_eq!(widening, 4, "u1, u2, u4 on ch-2, u6");

    // The table says the same, one line per record, widening marked, phones masked.
    let out = run_bin(&["plan", "--detail"], &env).await;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let line = |user: &str, action: &str| {
        table
            .lines()
            .find(|l| l.contains(&format!(" {user} ")) && l.contains(action))
            .unwrap_or_else(|| panic!("no {action} line for {user} in\n{table}"))
            .to_string()
    };
    assert!(line("u1", "role_changed").contains("seller -> manager"));
    assert!(line("u1", "role_changed").contains("[WIDENS ACCESS]"));
    assert!(!line("u5", "role_changed").contains("WIDENS"));
    assert!(line("u2", "user_updated").contains("371 *** *02"));
    assert!(!table.contains("37126000009"), "no full phone in\n{table}");
    assert!(line("u3", "user_deleted").contains("a1"));
}

#[tokio::test]
async fn an_unreadable_phone_is_named_in_the_log_and_in_the_plan() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_user("a1", "u1", "Anna", Some("12")).await;
    db.add_user("a1", "u2", "Boris", Some("+371 26 123 456"))
        .await;
    let env = env_for(&db, &sim, &[]);

    let plan = plan_json(&env).await;
    let unreadable = action(&records_of(&plan, "u1"), "unreadable_phone");
    assert_eq!(unreadable["phone"], "12");
    assert!(
        records_of(&plan, "u2")
            .iter()
            .all(|r| r["action"] != "unreadable_phone")
    );

    let out = run_bin(&["sync"], &env).await;
    assert!(out.status.success(), "{}", text(&out));
    let warn = log_line(&text(&out), "Sending a user without its phone")
        .unwrap_or_else(|| panic!("no line for the phone in\n{}", text(&out)));
    assert_eq!(warn["level"], "WARN");
    assert_eq!(warn["code"], "unreadable_phone");
    assert_eq!(warn["record_id"], "u1");
    assert_eq!(warn["entity"], "user");
    assert_eq!(warn["phone"], "12");
    assert_eq!(sim.users("tok-1")["u1"].phone, None, "sent without a phone");
    assert_eq!(
        log_lines(&text(&out))
            .iter()
            .filter(|l| l["code"] == "unreadable_phone")
            .count(),
        1
    );
}
