//! A person between the CRM and risky changes: widening held with `sync.hold_widening`, bulk
//! deletes and mass leaves held by the guard, decided with `wazzup-sync approvals`, every
//! decision on the record.

use std::time::Duration;

use crate::helpers::*;

const HOLD: (&str, &str) = ("WAZZUP_SYNC__SYNC__HOLD_WIDENING", "true");

/// The open approvals, as `approvals list --format json` prints them.
async fn list(db: &TestDb, sim: &wazzup_sim::Simulator) -> Vec<serde_json::Value> {
    let out = run_bin(
        &["approvals", "list", "--format", "json"],
        &env_for(db, sim, &[]),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `approvals approve|reject ARGS…`, its exit code and stderr.
async fn decide(db: &TestDb, sim: &wazzup_sim::Simulator, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["approvals"];
    all.extend_from_slice(args);
    let out = run_bin(&all, &env_for(db, sim, &[])).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The role the simulator's settings give this user on ch-1.
fn role_of(sim: &wazzup_sim::Simulator, user: &str) -> Option<String> {
    sim.settings("tok-1")
        .user_roles
        .iter()
        .find(|r| r.user_id.as_str() == user && r.channel_id.as_str() == "ch-1")
        .map(|r| r.role.as_str().to_string())
}

/// (action, actor, note) of the history rows of this user, oldest first.
async fn history_of(db: &TestDb, user: &str) -> Vec<(String, Option<String>, Option<String>)> {
    sqlx::query_as(
        "SELECT action, actor, note FROM wazzup_sync.changes WHERE user_id = $1 ORDER BY id",
    )
    .bind(user)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_promotion_waits_for_approval_while_the_rest_of_the_account_syncs() {
    let (db, sim) = one_account(4).await;
    sync(&db, &sim, &[HOLD]).await;
    db.exec(
        "UPDATE wazzup_user_roles SET role = 'manager' WHERE user_id = 'u2';
         UPDATE wazzup_users SET name = 'Renamed' WHERE id = 'u1';
         UPDATE wazzup_user_roles SET role = 'auditor' WHERE user_id = 'u3';",
    )
    .await;
    sync(&db, &sim, &[HOLD]).await;
    assert_eq!(role_of(&sim, "u2").as_deref(), Some("seller"), "held");
    assert_eq!(role_of(&sim, "u3").as_deref(), Some("seller"), "held");
    assert_eq!(sim.users("tok-1")["u1"].name, "Renamed", "the rest goes");

    let waiting = list(&db, &sim).await;
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    let u2 = waiting.iter().find(|a| a["user_id"] == "u2").unwrap();
    assert_eq!(u2["reason"], "widens_access");
    assert_eq!(u2["action"], "role_changed");
    assert_eq!(u2["status"], "waiting");
    assert_eq!(u2["before"]["role"], "seller");
    assert_eq!(u2["after"]["role"], "manager");

    // Held again, not again and again: the next cycle keeps the same approval.
    sync(&db, &sim, &[HOLD]).await;
    assert_eq!(list(&db, &sim).await.len(), 2);

    let id = u2["id"].as_i64().unwrap().to_string();
    let (code, out, err) = decide(
        &db,
        &sim,
        &[
            "approve",
            &id,
            "--by",
            "alice",
            "--note",
            "promoted to lead",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Approved 1 by alice"), "{out}");
    sync(&db, &sim, &[HOLD]).await;
    assert_eq!(role_of(&sim, "u2").as_deref(), Some("manager"));
    assert_eq!(
        role_of(&sim, "u3").as_deref(),
        Some("seller"),
        "u3 still waits"
    );
    let story = history_of(&db, "u2").await;
    let alice = (
        Some("alice".to_string()),
        Some("promoted to lead".to_string()),
    );
    assert!(
        story.contains(&("approved".into(), alice.0.clone(), alice.1.clone())),
        "{story:?}"
    );
    assert_eq!(
        story.last().unwrap(),
        &("role_changed".to_string(), alice.0, alice.1),
        "the change names its approver"
    );
    // `history` names the approval in JSON and CSV.
    let out = run_bin(
        &[
            "history",
            "u2",
            "--action",
            "role_changed",
            "--format",
            "json",
        ],
        &env_for(&db, &sim, &[]),
    )
    .await;
    let row: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(row["approval_id"].to_string(), id, "{row}");
    let out = run_bin(
        &[
            "history",
            "u2",
            "--action",
            "role_changed",
            "--format",
            "csv",
        ],
        &env_for(&db, &sim, &[]),
    )
    .await;
    let csv = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        csv.lines().next().unwrap().ends_with(",id,approval_id"),
        "{csv}"
    );
    assert!(
        csv.lines().nth(1).unwrap().ends_with(&format!(",{id}")),
        "{csv}"
    );
    let status: String =
        sqlx::query_scalar("SELECT status FROM wazzup_sync.approvals WHERE id = $1")
            .bind(id.parse::<i64>().unwrap())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "applied");
}

#[tokio::test]
async fn a_rejected_change_stays_out_until_the_crm_row_changes_which_supersedes_it() {
    let (db, sim) = one_account(3).await;
    sync(&db, &sim, &[HOLD]).await;
    db.exec("UPDATE wazzup_user_roles SET role = 'manager' WHERE user_id = 'u2'")
        .await;
    sync(&db, &sim, &[HOLD]).await;
    let id = list(&db, &sim).await[0]["id"].as_i64().unwrap().to_string();
    let (code, _, err) = decide(&db, &sim, &["reject", &id, "--by", "bob"]).await;
    assert_eq!(code, 0, "{err}");
    sync(&db, &sim, &[HOLD]).await;
    sync(&db, &sim, &[HOLD]).await;
    assert_eq!(role_of(&sim, "u2").as_deref(), Some("seller"));
    let open = list(&db, &sim).await;
    assert_eq!(open.len(), 1, "not raised again: {open:?}");
    assert_eq!(open[0]["status"], "rejected");

    db.exec("UPDATE wazzup_user_roles SET role = 'auditor' WHERE user_id = 'u2'")
        .await;
    sync(&db, &sim, &[HOLD]).await;
    assert_eq!(role_of(&sim, "u2").as_deref(), Some("seller"), "held again");
    let open = list(&db, &sim).await;
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["status"], "waiting");
    assert_eq!(open[0]["after"]["role"], "auditor");
    let old: String = sqlx::query_scalar("SELECT status FROM wazzup_sync.approvals WHERE id = $1")
        .bind(id.parse::<i64>().unwrap())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(old, "superseded");

    // The CRM going back to what Wazzup holds leaves nothing waiting.
    db.exec("UPDATE wazzup_user_roles SET role = 'seller' WHERE user_id = 'u2'")
        .await;
    sync(&db, &sim, &[HOLD]).await;
    assert!(list(&db, &sim).await.is_empty());
}

#[tokio::test]
async fn a_bulk_delete_waits_as_approvals_and_goes_once_approved() {
    let (db, sim) = one_account(20).await;
    sync(&db, &sim, &[]).await;
    db.exec(
        "DELETE FROM wazzup_user_roles WHERE user_id IN (SELECT id FROM wazzup_users WHERE id <> 'u1' AND id <> 'u2' AND id <> 'u3' AND id <> 'u4' AND id <> 'u5');
         DELETE FROM wazzup_users WHERE id NOT IN ('u1', 'u2', 'u3', 'u4', 'u5');",
    )
    .await;
    let held = sync(&db, &sim, &[]).await;
    assert!(held.accounts[0].deletes_blocked.is_some());
    assert_eq!(sim.users("tok-1").len(), 20, "nothing deleted");
    let waiting = list(&db, &sim).await;
    assert_eq!(waiting.len(), 15);
    assert!(
        waiting
            .iter()
            .all(|a| a["reason"] == "mass_delete" && a["action"] == "user_deleted")
    );

    let (code, out, err) = decide(
        &db,
        &sim,
        &["approve", "--account", "a1", "--all", "--by", "carol"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Approved 15 by carol"), "{out}");
    let after = sync(&db, &sim, &[]).await;
    assert_eq!(after.accounts[0].deleted, 15);
    assert_eq!(sim.users("tok-1").len(), 5);
    assert!(list(&db, &sim).await.is_empty());
    assert_eq!(
        history_of(&db, "u6").await.last().unwrap(),
        &("user_deleted".to_string(), Some("carol".to_string()), None)
    );
}

#[tokio::test]
async fn deciding_part_of_a_bulk_delete_lets_only_the_approved_go_however_few_are_left() {
    let (db, sim) = one_account(20).await;
    sync(&db, &sim, &[]).await;
    db.exec(
        "DELETE FROM wazzup_user_roles WHERE user_id NOT IN ('u1', 'u2', 'u3', 'u4', 'u5');
         DELETE FROM wazzup_users WHERE id NOT IN ('u1', 'u2', 'u3', 'u4', 'u5');",
    )
    .await;
    sync(&db, &sim, &[]).await;
    let waiting = list(&db, &sim).await;
    assert_eq!(waiting.len(), 15);
    let id_of = |user: &str| {
        waiting
            .iter()
            .find(|a| a["user_id"] == user)
            .map(|a| a["id"].to_string())
            .unwrap()
    };
    let approve: Vec<String> = ["u6", "u7", "u8", "u9", "u10"].map(id_of).to_vec();
    let mut args = vec!["approve"];
    args.extend(approve.iter().map(String::as_str));
    args.extend(["--by", "carol"]);
    let (code, _, err) = decide(&db, &sim, &args).await;
    assert_eq!(code, 0, "{err}");
    let rejected = id_of("u11");
    let (code, _, err) = decide(&db, &sim, &["reject", &rejected, "--by", "carol"]).await;
    assert_eq!(code, 0, "{err}");

    // Ten are left, no more than the guard's bar: they still wait for their own decisions.
    for _ in 0..2 {
        sync(&db, &sim, &[]).await;
    }
    let users = sim.users("tok-1");
    assert_eq!(
        users.len(),
        15,
        "only the five approved went: {:?}",
        users.keys()
    );
    assert!(users.contains_key("u11"), "a rejected deletion stays out");
    let open = list(&db, &sim).await;
    assert_eq!(open.len(), 10);
    assert_eq!(
        open.iter().filter(|a| a["status"] == "rejected").count(),
        1,
        "{open:?}"
    );
    assert_eq!(open.iter().filter(|a| a["status"] == "waiting").count(), 9);
}

#[tokio::test]
async fn the_allow_flag_and_setting_are_recorded_as_decided_by_cli_and_config() {
    for (extra, args, by) in [
        (None, vec!["sync", "--allow-mass-delete", "a1"], "cli"),
        (
            Some(("WAZZUP_SYNC__SYNC__ALLOW_MASS_DELETE", "true")),
            vec!["sync"],
            "config",
        ),
    ] {
        let (db, sim) = one_account(20).await;
        sync(&db, &sim, &[]).await;
        db.exec(
            "DELETE FROM wazzup_user_roles WHERE user_id NOT IN ('u1', 'u2', 'u3');
             DELETE FROM wazzup_users WHERE id NOT IN ('u1', 'u2', 'u3');",
        )
        .await;
        let env = env_for(&db, &sim, &extra.into_iter().collect::<Vec<_>>());
        let out = run_bin(&args, &env).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(sim.users("tok-1").len(), 3);
        let decided: Vec<(String, String)> =
            sqlx::query_as("SELECT decided_by, status FROM wazzup_sync.approvals ORDER BY id")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(decided.len(), 17, "{by}");
        assert!(
            decided.iter().all(|(b, s)| b == by && s == "applied"),
            "{decided:?}"
        );
        let approved: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM wazzup_sync.changes WHERE action = 'approved' AND actor = $1",
        )
        .bind(by)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(approved, 17);
    }
}

#[tokio::test]
async fn a_mass_leave_waits_as_one_approval_and_revokes_nothing_until_approved() {
    let (db, sim) = one_account(20).await;
    let grace = [("WAZZUP_SYNC__SYNC__DELETE_GRACE", "1h")];
    sync(&db, &sim, &grace).await;
    db.exec(
        "DELETE FROM wazzup_user_roles WHERE user_id NOT IN ('u1', 'u2', 'u3');
         DELETE FROM wazzup_users WHERE id NOT IN ('u1', 'u2', 'u3');",
    )
    .await;
    let held = sync(&db, &sim, &grace).await;
    assert!(held.accounts[0].leave_blocked.is_some());
    assert_eq!(
        role_of(&sim, "u10").as_deref(),
        Some("seller"),
        "nothing revoked"
    );
    let waiting = list(&db, &sim).await;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0]["reason"], "mass_leave");
    assert_eq!(waiting[0]["user_id"], serde_json::Value::Null);
    assert_eq!(waiting[0]["after"]["leaving"], 17);
    sync(&db, &sim, &grace).await;
    assert_eq!(list(&db, &sim).await.len(), 1, "still one");

    let id = waiting[0]["id"].as_i64().unwrap().to_string();
    let (code, _, err) = decide(&db, &sim, &["approve", &id, "--by", "dave"]).await;
    assert_eq!(code, 0, "{err}");
    let after = sync(&db, &sim, &grace).await;
    assert_eq!(role_of(&sim, "u10"), None, "revoked once approved");
    assert_eq!(
        sim.users("tok-1").len(),
        20,
        "the users wait out their grace"
    );
    assert_eq!(after.accounts[0].leaving, 17);
    assert!(list(&db, &sim).await.is_empty());
}

#[tokio::test]
async fn a_missing_by_or_an_unknown_id_is_exit_2_with_one_line() {
    let (db, sim) = one_account(3).await;
    sync(&db, &sim, &[HOLD]).await;
    db.exec("UPDATE wazzup_user_roles SET role = 'manager' WHERE user_id = 'u2'")
        .await;
    sync(&db, &sim, &[HOLD]).await;
    let id = list(&db, &sim).await[0]["id"].as_i64().unwrap().to_string();
    for (args, says) in [
        (vec!["approve", id.as_str()], "--by"),
        (vec!["reject", id.as_str(), "--by", " "], "--by"),
        (
            vec!["approve", "424242", "--by", "eve"],
            "no approval 424242",
        ),
        (vec!["approve", "seven", "--by", "eve"], "\"seven\""),
        (vec!["approve", "--by", "eve"], "--account A --all"),
    ] {
        let (code, _, err) = decide(&db, &sim, &args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(
        list(&db, &sim).await[0]["status"],
        "waiting",
        "nothing decided"
    );
}

#[tokio::test]
async fn a_running_daemon_sends_an_approved_change_within_a_second_and_its_gauge_is_right_after_a_restart()
 {
    let (db, sim) = one_account(3).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = env_for(
        &db,
        &sim,
        &[
            HOLD,
            ("WAZZUP_SYNC__HTTP__LISTEN", listen.as_str()),
            // Only the first cycle comes from the schedule.
            ("WAZZUP_SYNC__SYNC__SCHEDULE", "0 0 0 1 1 *"),
        ],
    );
    sync(&db, &sim, &[HOLD]).await;
    db.exec("UPDATE wazzup_user_roles SET role = 'manager' WHERE user_id = 'u2'")
        .await;
    let daemon = spawn_bin(&["run"], &env);
    let metrics = format!("http://{listen}/metrics");
    let waiting = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("wazzup_sync_approvals_waiting{reason=\"widens_access\"}"))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
    };
    let mut seen = None;
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(&metrics).await
            && let Ok(text) = r.text().await
            && waiting(&text).as_deref() == Some("1")
        {
            seen = Some(text);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen.is_some(), "the held change is counted");
    drop(daemon);

    // After a restart, the gauge is read from the table.
    let daemon = spawn_bin(&["run"], &env);
    let mut after_restart = None;
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(&metrics).await
            && let Ok(text) = r.text().await
            && let Some(v) = waiting(&text)
            && text.contains("wazzup_sync_users_in_grace")
        {
            let done = v == "1";
            after_restart = Some(v);
            if done {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(after_restart.as_deref(), Some("1"));

    let id = list(&db, &sim).await[0]["id"].as_i64().unwrap().to_string();
    let started = std::time::Instant::now();
    let (code, _, err) = decide(&db, &sim, &["approve", &id, "--by", "frank"]).await;
    assert_eq!(code, 0, "{err}");
    while role_of(&sim, "u2").as_deref() != Some("manager") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the approved change never went out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(daemon);
}

#[tokio::test]
async fn a_daemon_listening_to_the_crm_hears_decisions_on_that_same_session() {
    let (db, sim) = one_account(3).await;
    let env = env_for(
        &db,
        &sim,
        &[
            HOLD,
            ("WAZZUP_SYNC__SYNC__SCHEDULE", "0 0 0 1 1 *"),
            ("WAZZUP_SYNC__SYNC__LISTEN_CHANNEL", "wazzup_sync"),
        ],
    );
    sync(&db, &sim, &[HOLD]).await;
    db.exec("UPDATE wazzup_user_roles SET role = 'manager' WHERE user_id = 'u2'")
        .await;
    let daemon = spawn_bin(&["run"], &env);
    let started = std::time::Instant::now();
    while list(&db, &sim).await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing was held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The state shares the CRM's database: one session listens for both.
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wazzup-sync' \
         AND datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(listening, 1, "one LISTEN session");

    let id = list(&db, &sim).await[0]["id"].as_i64().unwrap().to_string();
    let (code, _, err) = decide(&db, &sim, &["approve", &id, "--by", "frank"]).await;
    assert_eq!(code, 0, "{err}");
    let started = std::time::Instant::now();
    while role_of(&sim, "u2").as_deref() != Some("manager") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the approved change never went out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(daemon);
}
