//! Users who leave the CRM: their access goes at once, their Wazzup user after the grace
//! (`sync.delete_grace`); a user who comes back within it costs nothing, a hire can take its
//! phone, and at the user limit it makes room early.

use std::time::Duration;

use crate::helpers::*;
use wazzup_sim::PhoneCheck;

const GRACE: (&str, &str) = ("WAZZUP_SYNC__SYNC__DELETE_GRACE", "3s");

/// The channels the simulator's settings give this user a role on.
fn roles_of(sim: &wazzup_sim::Simulator, user: &str) -> Vec<String> {
    sim.settings("tok-1")
        .user_roles
        .iter()
        .filter(|r| r.user_id.as_str() == user)
        .map(|r| r.channel_id.to_string())
        .collect()
}

/// (action, cause) of the user's history rows, oldest first.
async fn history_of(db: &TestDb, user: &str) -> Vec<(String, String)> {
    sqlx::query_as("SELECT action, cause FROM wazzup_sync.changes WHERE user_id = $1 ORDER BY id")
        .bind(user)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_shorter_grace_applies_at_once_to_those_already_leaving() {
    let (db, sim) = one_account(4).await;
    let long = ("WAZZUP_SYNC__SYNC__DELETE_GRACE", "1h");
    sync(&db, &sim, &[long]).await;
    db.exec(U3_LEAVES).await;
    sync(&db, &sim, &[long]).await;
    assert!(sim.users("tok-1").contains_key("u3"), "in its grace");

    let none = ("WAZZUP_SYNC__SYNC__DELETE_GRACE", "0s");
    let report = sync(&db, &sim, &[none]).await;
    assert_eq!(report.accounts[0].deleted, 1, "{report:?}");
    assert!(!sim.users("tok-1").contains_key("u3"));
}

const U3_LEAVES: &str =
    "DELETE FROM wazzup_users WHERE id = 'u3'; DELETE FROM wazzup_user_roles WHERE user_id = 'u3';";

#[tokio::test]
async fn a_leaver_loses_its_roles_at_once_and_its_user_once_the_grace_has_passed() {
    let (db, sim) = one_account(4).await;
    sync(&db, &sim, &[GRACE]).await;
    assert_eq!(roles_of(&sim, "u3"), ["ch-1"]);

    db.exec(U3_LEAVES).await;
    let report = sync(&db, &sim, &[GRACE]).await;
    assert!(roles_of(&sim, "u3").is_empty(), "access is revoked at once");
    assert!(sim.users("tok-1").contains_key("u3"), "the user stays");
    assert_eq!(report.accounts[0].deleted, 0);
    assert_eq!(report.accounts[0].leaving, 1);
    assert_eq!(
        history_of(&db, "u3").await.last().unwrap(),
        &("role_revoked".to_string(), "left_crm".to_string())
    );

    // Within the grace, the unchanged account is skipped and nothing is deleted.
    let again = sync(&db, &sim, &[GRACE]).await;
    assert_eq!(again.accounts[0].requests, 0);
    assert!(sim.users("tok-1").contains_key("u3"));

    // Once it has passed, the account is looked at again though its rows did not change.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let after = sync(&db, &sim, &[GRACE]).await;
    assert_eq!(after.accounts[0].deleted, 1);
    assert!(
        !sim.users("tok-1").contains_key("u3"),
        "deleted after the grace"
    );
    assert_eq!(
        history_of(&db, "u3").await.last().unwrap(),
        &("user_deleted".to_string(), "left_crm".to_string())
    );
    let left: Option<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM wazzup_sync.mirror_users WHERE left_at IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, Some(0));
}

#[tokio::test]
async fn the_default_grace_keeps_a_leaver_a_day_and_plan_says_when_it_goes() {
    let (db, sim) = one_account(4).await;
    let default = [("WAZZUP_SYNC__SYNC__DELETE_GRACE", "24h")];
    sync(&db, &sim, &default).await;
    db.exec(U3_LEAVES).await;
    let before = chrono::Utc::now();
    sync(&db, &sim, &default).await;
    assert!(roles_of(&sim, "u3").is_empty());
    assert!(sim.users("tok-1").contains_key("u3"));

    let out = run_bin(
        &["plan", "--detail", "--format", "json"],
        &env_for(&db, &sim, &default),
    )
    .await;
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let leaving = plan["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "leaving")
        .unwrap_or_else(|| panic!("no leaving record in {plan}"))
        .clone();
    assert_eq!(leaving["user_id"], "u3");
    let at: chrono::DateTime<chrono::Utc> = leaving["delete_at"].as_str().unwrap().parse().unwrap();
    let day = chrono::Duration::hours(24);
    assert!(at >= before + day - chrono::Duration::minutes(1) && at <= chrono::Utc::now() + day);
    let table = run_bin(&["plan", "--detail"], &env_for(&db, &sim, &default)).await;
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(
        table.lines().any(|l| l.contains(" u3 ")
            && l.contains("leaving")
            && l.contains("deleted from Wazzup at")),
        "{table}"
    );
    let explain = run_bin(&["explain", "u3"], &env_for(&db, &sim, &default)).await;
    let explain = String::from_utf8_lossy(&explain.stdout).to_string();
    assert!(
        explain.contains("leaving: left the CRM, no access; deleted from Wazzup at"),
        "{explain}"
    );
}

#[tokio::test]
async fn a_leaver_who_comes_back_within_the_grace_costs_no_delete_and_no_post() {
    let (db, sim) = one_account(4).await;
    sync(&db, &sim, &[GRACE]).await;
    db.exec(
        "CREATE TABLE gone_users AS SELECT * FROM wazzup_users WHERE id = 'u3';
         CREATE TABLE gone_roles AS SELECT * FROM wazzup_user_roles WHERE user_id = 'u3';",
    )
    .await;
    db.exec(U3_LEAVES).await;
    sync(&db, &sim, &[GRACE]).await;
    assert!(roles_of(&sim, "u3").is_empty());

    db.exec(
        "INSERT INTO wazzup_users SELECT * FROM gone_users;
         INSERT INTO wazzup_user_roles SELECT * FROM gone_roles;",
    )
    .await;
    sim.clear_requests();
    sync(&db, &sim, &[GRACE]).await;
    let sent: Vec<(String, String)> = sim
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    assert_eq!(
        sent,
        [("PATCH".to_string(), "/v2/settings".to_string())],
        "only the roles go back"
    );
    assert_eq!(roles_of(&sim, "u3"), ["ch-1"]);
    assert_eq!(
        history_of(&db, "u3").await.last().unwrap(),
        &("role_granted".to_string(), "crm_change".to_string())
    );

    // Nothing is deleted once the grace the user left for would have passed.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    sync(&db, &sim, &[GRACE]).await;
    assert!(sim.users("tok-1").contains_key("u3"));
}

#[tokio::test]
async fn a_hire_takes_the_phone_of_a_leaver_in_its_grace() {
    let (db, sim) = one_account(3).await;
    sim.set_phone_check(PhoneCheck::PerUser);
    sync(&db, &sim, &[GRACE]).await;
    db.exec(U3_LEAVES).await;
    sync(&db, &sim, &[GRACE]).await;

    db.exec("INSERT INTO wazzup_users VALUES ('a1', 'hire', 'New Hire', '+371 20000003', false)")
        .await;
    sync(&db, &sim, &[GRACE]).await;
    let users = sim.users("tok-1");
    assert_eq!(users["hire"].phone.as_deref(), Some("37120000003"));
    assert_eq!(users["u3"].phone, None, "the leaver gave its phone up");
    assert!(db.open_dead_letters().await.is_empty());
}

#[tokio::test]
async fn at_the_user_limit_a_waiting_hire_lands_by_deleting_a_leaver_early() {
    let (db, sim) = one_account(6).await;
    sim.set_user_limit("tok-1", 6);
    sync(&db, &sim, &[GRACE]).await;
    // u3 left first, u5 later; both are in their grace when a hire comes.
    db.exec(U3_LEAVES).await;
    sync(&db, &sim, &[GRACE]).await;
    db.exec("DELETE FROM wazzup_users WHERE id = 'u5'; DELETE FROM wazzup_user_roles WHERE user_id = 'u5';")
        .await;
    sync(&db, &sim, &[GRACE]).await;

    db.exec("INSERT INTO wazzup_users VALUES ('a1', 'hire', 'New Hire', '+371 20000099', false)")
        .await;
    let report = sync(&db, &sim, &[GRACE]).await;
    let users = sim.users("tok-1");
    assert!(users.contains_key("hire"), "the hire landed");
    assert!(
        !users.contains_key("u3"),
        "the leaver gone longest made room"
    );
    assert!(users.contains_key("u5"), "only as many as needed");
    assert_eq!(report.accounts[0].deleted, 1);
    assert!(db.open_dead_letters().await.is_empty());
}
