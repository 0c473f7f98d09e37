//! Operating the daemon: health and metrics endpoints, signals, dead letters by hand.

use std::time::Duration;

use crate::helpers::*;
use wazzup_sync::domain::UserPayload;

#[tokio::test]
async fn the_daemon_serves_health_and_metrics_and_stops_cleanly_on_sigterm() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = env_for(
        &db,
        &sim,
        &[
            ("WAZZUP_SYNC__HTTP__LISTEN", &listen),
            ("WAZZUP_SYNC__SYNC__SCHEDULE", "*/1 * * * * *"),
        ],
    );
    let child = spawn_bin(&["run"], &env);
    let pid = child.id().unwrap();

    let base = format!("http://{listen}");
    let mut ready = None;
    for _ in 0..100 {
        if let Some((200, body)) = get(&format!("{base}/readyz")).await {
            ready = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.as_deref(), Some("ready\n"));
    assert_eq!(get(&format!("{base}/healthz")).await.unwrap().0, 200);
    let mut metrics = String::new();
    for _ in 0..100 {
        let (status, body) = get(&format!("{base}/metrics")).await.unwrap();
        assert_eq!(status, 200);
        metrics = body;
        if metrics.contains("wazzup_sync_cycle_duration_seconds_count")
            && metrics.contains("wazzup_sync_open_dead_letters{")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for name in [
        "wazzup_sync_cycles_total",
        "wazzup_sync_cycle_duration_seconds_bucket",
        "wazzup_sync_requests_total",
        "wazzup_sync_records_total",
        "wazzup_sync_open_dead_letters",
        "wazzup_sync_accounts_auth_failed",
        "wazzup_sync_last_success_timestamp_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    assert!(
        metrics.contains(r#"endpoint="POST /v2/users",status="ok""#),
        "{metrics}"
    );
    let hc = run_bin(&["healthcheck"], &env).await;
    assert!(hc.status.success(), "{}", text(&hc));
    assert_eq!(sim.users("tok-1").len(), 3);

    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("stops within the grace period")
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("wazzup-sync stopped"));
    let hc = run_bin(&["healthcheck"], &env).await;
    assert_eq!(hc.status.code(), Some(1), "nothing answers once stopped");
}

#[tokio::test]
async fn readiness_fails_while_a_database_is_unreachable() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = env_for(
        &db,
        &sim,
        &[
            ("WAZZUP_SYNC__HTTP__LISTEN", &listen),
            (
                "WAZZUP_SYNC__STATE__URL",
                "postgres://postgres@127.0.0.1:1/none",
            ),
        ],
    );
    let mut child = spawn_bin(&["run"], &env);
    // It keeps retrying its migration rather than exiting, and is alive but not ready: its
    // /readyz answers 503 and names the database that cannot be reached.
    let (status, body) = poll(&format!("http://{listen}/readyz"), 30, |_, _| true)
        .await
        .expect("/readyz answers while the state database is down");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: "), "{body}");
    assert!(
        body.contains("Cannot connect to the state database"),
        "{body}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    let hc = run_bin(&["healthcheck"], &env).await;
    assert_eq!(hc.status.code(), Some(1));
    child.kill().await.unwrap();
}

#[tokio::test]
async fn dead_letters_can_be_listed_retried_and_discarded_by_hand() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    let outsider = UserPayload {
        id: "outsider".into(),
        name: "Outsider".into(),
        phone: Some("37120000002".into()),
    };
    sim.insert_users("tok-1", &[outsider]);
    db.add_users("a1", 3).await;
    db.add_user("a1", "blank", " ", None).await;
    sync(&db, &sim, &[]).await;
    let env = env_for(&db, &sim, &[]);

    let out = run_bin(&["dead-letters", "list"], &env).await;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    let u2 = table.lines().find(|l| l.contains(" u2 ")).expect(&table);
    assert!(
        u2.contains("USER_ALREADY_EXISTS (400)") && u2.contains("already exists"),
        "{u2}"
    );
    let blank = table.lines().find(|l| l.contains(" blank ")).expect(&table);
    assert!(
        blank.contains("invalid_name")
            && blank.contains("when fixed in CRM")
            && blank.contains("name is empty"),
        "{blank}"
    );

    let out = run_bin(&["dead-letters", "list", "--format", "json"], &env).await;
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let u2_id = rows.iter().find(|r| r["record_id"] == "u2").unwrap()["id"]
        .as_i64()
        .unwrap();

    // Retried by hand: sent again at once, although its schedule said a minute later.
    sim.remove_user("tok-1", "outsider");
    sim.clear_requests();
    let out = run_bin(
        &["dead-letters", "retry", "--id", &u2_id.to_string(), "--now"],
        &env,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(sim.users("tok-1").contains_key("u2"));
    assert!(
        db.open_dead_letters()
            .await
            .iter()
            .all(|d| d.record_id != "u2")
    );

    // Discarded: not sent again while unchanged; a change in the CRM brings it back.
    sim.insert_users(
        "tok-1",
        &[UserPayload {
            id: "other".into(),
            name: "Other".into(),
            phone: Some("37129999999".into()),
        }],
    );
    db.exec("UPDATE wazzup_users SET name = 'Three', phone = '+371 29999999' WHERE id = 'u3'")
        .await;
    sync(&db, &sim, &[]).await;
    let dead = db.open_dead_letters().await;
    assert!(
        dead.iter().any(|d| d.record_id == "u3"),
        "{dead:?} {:?}",
        sim.requests()
    );
    let out = run_bin(
        &["dead-letters", "discard", "--all", "--account", "a1"],
        &env,
    )
    .await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Discarded 2"),
        "{}",
        text(&out)
    );
    db.exec("UPDATE wazzup_sync.dead_letters SET next_attempt_at = now() - interval '1 day'")
        .await;
    sim.clear_requests();
    sync(&db, &sim, &[]).await;
    assert!(
        sim.requests()
            .iter()
            .all(|r| !r.ids.contains(&"u3".to_string())),
        "discarded stays quiet"
    );
    sim.remove_user("tok-1", "other");
    db.exec("UPDATE wazzup_users SET name = 'Three again' WHERE id = 'u3'")
        .await;
    sync(&db, &sim, &[]).await;
    assert_eq!(sim.users("tok-1")["u3"].name, "Three again");
}

#[tokio::test]
async fn reconcile_repairs_users_deleted_or_edited_in_wazzup_and_reports_unknown_ones() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 120).await;
    sync(&db, &sim, &[]).await;
    // Someone works in the Wazzup UI: deletes one user, renames another, adds a stranger,
    // and the settings lose a role when the user is deleted.
    sim.remove_user("tok-1", "u7");
    sim.insert_users(
        "tok-1",
        &[
            UserPayload {
                id: "u8".into(),
                name: "Edited in UI".into(),
                phone: None,
            },
            UserPayload {
                id: "stranger".into(),
                name: "Stranger".into(),
                phone: None,
            },
        ],
    );
    // A normal cycle trusts the mirror and sends nothing.
    sim.clear_requests();
    sync(&db, &sim, &[]).await;
    assert_eq!(sim.request_count(), 0);

    let out = run_bin(&["reconcile"], &env_for(&db, &sim, &[])).await;

    assert!(out.status.success(), "{}", text(&out));
    let users = sim.users("tok-1");
    assert_eq!(users["u7"].name, "User 7", "the deleted user is back");
    assert_eq!(users["u8"].name, "User 8", "the edit is undone");
    assert!(
        users.contains_key("stranger"),
        "unknown users are only reported by default"
    );
    let log = text(&out);
    assert!(
        log.contains("Wazzup holds users that the CRM does not know"),
        "{log}"
    );
    assert!(
        log.contains("\"drift_missing\":1") && log.contains("\"drift_changed\":1"),
        "{log}"
    );
    // 2 pages of users + settings read back; one POST with the two users; the settings again
    // (the deleted user's role had gone from them).
    let methods: Vec<String> = sim
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        methods,
        [
            "GET /v2/users",
            "GET /v2/users",
            "GET /v2/settings",
            "POST /v2/users",
            "PATCH /v2/settings"
        ]
    );
    assert_eq!(sim.settings("tok-1").user_roles.len(), 120);

    let out = run_bin(
        &["reconcile"],
        &env_for(&db, &sim, &[("WAZZUP_SYNC__SYNC__PRUNE_UNKNOWN", "true")]),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !sim.users("tok-1").contains_key("stranger"),
        "pruned when asked"
    );
    assert_eq!(sim.users("tok-1").len(), 120);
}

#[tokio::test]
async fn a_notification_from_the_crm_syncs_its_account_without_waiting_for_the_schedule() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    db.add_account("a2", "tok-2").await;
    sim.add_account("tok-1");
    sim.add_account("tok-2");
    db.add_users("a1", 2).await;
    let mut child = start_listening_daemon(&db, &sim, ("tok-1", 2)).await;
    sim.clear_requests();

    // The trigger an operator adds to the CRM tables does this; a burst costs one cycle.
    db.exec("INSERT INTO wazzup_users VALUES ('a1', 'new', 'New Hire', NULL, false)")
        .await;
    db.exec("INSERT INTO wazzup_users VALUES ('a2', 'other', 'Other Account', NULL, false)")
        .await;
    let started = std::time::Instant::now();
    for _ in 0..5 {
        db.exec("SELECT pg_notify('wazzup_sync', 'a1')").await;
    }
    let mut landed = None;
    for _ in 0..100 {
        if sim.users("tok-1").contains_key("new") {
            landed = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let landed = landed.expect("the notified account was synced");
    eprintln!("NOTIFY to landed: {landed:?}");
    assert!(landed < Duration::from_secs(5));
    wait_until_idle(&db).await;
    let posts = sim.requests().iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, 1, "five notifications, one cycle");
    assert!(
        !sim.users("tok-2").contains_key("other"),
        "only the notified account was synced"
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_cycle_that_fails_on_sessions_the_database_ended_is_tried_again_within_seconds() {
    let (db, sim) = one_account(2).await;
    let mut child = start_listening_daemon(&db, &sim, ("tok-1", 2)).await;

    // The database ends the daemon's pooled sessions (a restart, an administrator); the LISTEN
    // session stays, so the next notification finds the pools' sessions dead.
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'wazzup-sync' AND datname = current_database()
           AND query NOT LIKE 'LISTEN%') AS t",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(ended > 0, "the daemon held pooled sessions");
    db.exec("INSERT INTO wazzup_users VALUES ('a1', 'new', 'New Hire', NULL, false)")
        .await;
    db.exec("SELECT pg_notify('wazzup_sync', 'a1')").await;
    let started = std::time::Instant::now();
    while !sim.users("tok-1").contains_key("new") {
        if started.elapsed() > Duration::from_secs(20) {
            child.kill().await.unwrap();
            let out = child.wait_with_output().await.unwrap();
            panic!(
                "the edit waited for the schedule: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_long_cycle_reports_its_progress_every_few_seconds() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    for i in 1..=3 {
        db.add_account(&format!("a{i}"), &format!("tok-{i}")).await;
        sim.add_account(&format!("tok-{i}"));
        db.add_users(&format!("a{i}"), 150).await;
    }
    // 3 accounts x 3 requests, 700 ms each, one account at a time: about 6 s.
    sim.set_latency(700);

    let out = run_bin(
        &["sync"],
        &env_for(
            &db,
            &sim,
            &[
                ("WAZZUP_SYNC__SYNC__CONCURRENCY", "1"),
                ("WAZZUP_SYNC__SYNC__BATCHES_IN_FLIGHT", "1"),
            ],
        ),
    )
    .await;

    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    let line = log
        .lines()
        .find(|l| l.contains("\"Cycle in progress\""))
        .unwrap_or_else(|| panic!("no progress line in {log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["accounts_total"], 3);
    assert!(v["accounts_done"].as_u64().unwrap() < 3);
    assert!(v["users_pushed"].as_u64().is_some() && v["users_per_sec"].as_u64().is_some());
}

#[tokio::test]
async fn check_reports_each_part_and_fails_on_a_missing_column_or_a_refused_token() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    db.add_account("a2", "tok-refused").await;
    sim.add_account("tok-1");

    let out = run_bin(&["check"], &env_for(&db, &sim, &[])).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for line in [
        "ok   configuration",
        "ok   CRM database reachable",
        "ok   state database reachable",
        "ok   users query columns",
        "ok   user roles query columns",
        "ok   accounts query columns",
        "ok   account a1: token accepted",
        "FAIL account a2: Wazzup refused the account's token (HTTP 401)",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from\n{stdout}");
    }
    assert!(!stdout.contains("tok-"), "no token printed");
    let at = |line: &str| stdout.find(line).unwrap();
    assert!(
        at("account a1:") < at("account a2:"),
        "tokens are said in the accounts' order"
    );

    db.exec("DELETE FROM wazzup_accounts WHERE account_id = 'a2'; ALTER TABLE wazzup_users DROP COLUMN name").await;
    let out = run_bin(&["check"], &env_for(&db, &sim, &[])).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains("FAIL The users query has no column `name`"),
        "{stdout}"
    );
}

#[tokio::test]
async fn check_fails_on_each_account_row_a_cycle_skips_and_the_others_sync() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 2).await;
    db.exec(
        "INSERT INTO wazzup_accounts VALUES
           ('blank', '   ', false), ('null', NULL, false), (NULL, 'tok-orphan', false),
           ('broken', E'tok-secret\\nline2', false),
           ('twice', 'tok-2', false), ('twice', 'tok-3', false)",
    )
    .await;

    let out = run_bin(&["check"], &env_for(&db, &sim, &[])).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for line in [
        "ok   account a1: token accepted",
        "FAIL account blank: the account row has no token; a cycle skips this account",
        "FAIL account null: the account row has no token; a cycle skips this account",
        "FAIL account (no id): an account row has no account_id; a cycle skips this account",
        "FAIL account broken: the account row's token has a character a token cannot hold in an HTTP header",
        "FAIL account twice: the account id appears on more than one row of the accounts query; a cycle skips this account",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from\n{stdout}");
    }
    assert!(
        !stdout.contains("tok-") && !stdout.contains("secret"),
        "no token printed"
    );

    let out = run_bin(&["sync"], &env_for(&db, &sim, &[])).await;
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert_eq!(sim.users("tok-1").len(), 2, "the good account syncs");
    let skipped = log_lines(&log)
        .into_iter()
        .filter(|v| v["message"] == "Skipping an account row of the accounts query")
        .count();
    assert_eq!(skipped, 5, "{log}");
    assert!(!log.contains("tok-secret"), "no token in the log");
}

#[tokio::test]
async fn queries_pasted_from_psql_with_a_semicolon_or_a_comment_line_work() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    let env = env_for(
        &db,
        &sim,
        &[
            (
                "WAZZUP_SYNC__SOURCE__USERS_QUERY",
                "SELECT * FROM wazzup_users;\n",
            ),
            (
                "WAZZUP_SYNC__SOURCE__ROLES_QUERY",
                "SELECT * FROM wazzup_user_roles\n-- every role row",
            ),
            (
                "WAZZUP_SYNC__SOURCE__ACCOUNTS_QUERY",
                "SELECT * FROM wazzup_accounts; -- with their tokens",
            ),
        ],
    );
    let out = run_bin(&["check"], &env).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for line in [
        "ok   WAZZUP_SYNC__SOURCE__USERS_QUERY ended in `;`, which is stripped",
        "ok   WAZZUP_SYNC__SOURCE__ACCOUNTS_QUERY ended in `;`, which is stripped",
        "ok   users query columns",
        "ok   user roles query columns",
        "ok   accounts query columns",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from\n{stdout}");
    }
    assert!(!stdout.contains("ROLES_QUERY ended"), "{stdout}");
    let out = run_bin(&["sync"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(sim.users("tok-1").len(), 3);
    assert_eq!(sim.settings("tok-1").user_roles.len(), 3);
}

#[tokio::test]
async fn open_dead_letters_are_exported_after_a_restart_even_for_an_unchanged_account() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    db.add_account("a2", "tok-2").await;
    sim.add_account("tok-1");
    sim.add_account("tok-2");
    db.add_users("a1", 2).await;
    db.add_user("a2", "blank", "   ", None).await;
    db.add_users("a2", 1).await;
    let out = run_bin(&["sync"], &env_for(&db, &sim, &[])).await;
    assert!(out.status.success(), "{}", text(&out));

    // A fresh process whose first cycle skips both accounts: nothing changed in the CRM.
    let listen = format!("127.0.0.1:{}", free_port());
    let env = env_for(
        &db,
        &sim,
        &[
            ("WAZZUP_SYNC__HTTP__LISTEN", &listen),
            ("WAZZUP_SYNC__SYNC__SCHEDULE", "0 0 0 1 1 *"),
        ],
    );
    let mut child = spawn_bin(&["run"], &env);
    let (_, metrics) = poll(&format!("http://{listen}/metrics"), 30, |s, body| {
        s == 200 && body.contains("wazzup_sync_cycle_duration_seconds_count")
    })
    .await
    .expect("metrics");

    assert!(
        metrics.contains(r#"wazzup_sync_open_dead_letters{account_id="a2"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"wazzup_sync_open_dead_letters{account_id="a1"} 0"#),
        "{metrics}"
    );
    assert!(metrics.contains("wazzup_sync_ready 1"), "{metrics}");
    child.kill().await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    let skipped = log_lines(&text(&out))
        .into_iter()
        .filter(|l| l["message"] == "Account synced" && l["source_unchanged"] == true)
        .count();
    assert_eq!(skipped, 2, "both accounts were skipped as unchanged");
}

/// Sessions the daemon holds on the test's database, by application name.
async fn daemon_sessions(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wazzup-sync' AND datname = current_database()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_quiet_daemon_releases_its_idle_connections_and_keeps_only_the_listen_session() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    for i in 1..=4 {
        db.add_account(&format!("a{i}"), &format!("tok-{i}")).await;
        sim.add_account(&format!("tok-{i}"));
        db.add_users(&format!("a{i}"), 20).await;
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let env = env_for(
        &db,
        &sim,
        &[
            ("WAZZUP_SYNC__HTTP__LISTEN", &listen),
            ("WAZZUP_SYNC__SYNC__SCHEDULE", "0 0 0 1 1 *"),
            ("WAZZUP_SYNC__SYNC__LISTEN_CHANNEL", "wazzup_sync"),
        ],
    );
    let mut child = spawn_bin(&["run"], &env);
    for _ in 0..300 {
        if sim.users("tok-4").len() == 20 && sim.settings("tok-4").user_roles.len() == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sim.users("tok-4").len(), 20, "the first cycle ran");

    // Once no cycle has run for 10 s, the daemon closes the idle sessions.
    let mut held = i64::MAX;
    for _ in 0..40 {
        held = daemon_sessions(&db).await;
        if held <= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(held, 1, "only the LISTEN session stays open between cycles");
    child.kill().await.unwrap();
}
