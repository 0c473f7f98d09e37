//! A database that cannot be reached is said plainly: which one, where, why, and the variable
//! to check; `run` never exits because of it. A failing CRM query is named.

use std::time::Duration;

use crate::helpers::*;

/// Settings whose CRM (and so state) URL points at a port nothing listens on.
fn closed_port_env(db: &TestDb, sim: &wazzup_sim::Simulator, port: u16) -> Vec<(String, String)> {
    let url = format!("postgres://postgres:hunter2@127.0.0.1:{port}/crm");
    env_for(db, sim, &[("WAZZUP_SYNC__SOURCE__URL", &url)])
}

#[tokio::test]
async fn a_closed_port_is_named_once_per_database_with_its_cause_and_variable() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    let port = free_port();
    let env = closed_port_env(&db, &sim, port);

    let out = run_bin(&["sync"], &env).await;

    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with('{')).collect();
    assert_eq!(
        lines,
        [
            format!(
                "wazzup-sync: Cannot connect to the CRM database at 127.0.0.1:{port}: connection refused (the server is down or listens elsewhere) (check WAZZUP_SYNC__SOURCE__URL)"
            ),
            format!(
                "wazzup-sync: Cannot connect to the state database at 127.0.0.1:{port}: connection refused (the server is down or listens elsewhere) (check WAZZUP_SYNC__SOURCE__URL, which the state database uses while WAZZUP_SYNC__STATE__URL is unset)"
            ),
        ],
        "{stderr}"
    );
    assert!(!stderr.contains("migrate") && !stderr.contains("pool timed out"));
    assert!(!stderr.contains("hunter2"), "no password in {stderr}");

    let out = run_bin(&["check"], &env).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        stdout.matches("Cannot connect to the CRM database").count(),
        1,
        "said once:\n{stdout}"
    );
    assert!(stdout.contains(&format!(
        "FAIL Cannot connect to the state database at 127.0.0.1:{port}"
    )));
    assert!(stdout.contains("skip the queries"), "{stdout}");

    let out = run_bin(&["migrate"], &env).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stderr.contains("Cannot connect to the state database"),
        "{stderr}"
    );
    assert!(!stderr.contains("Failed to migrate"), "{stderr}");
}

#[tokio::test]
async fn a_wrong_password_is_said_once_without_postgres_source_lines() {
    let Some(pg) = PrivatePg::start_with_password("right-password") else {
        panic!("the test needs PostgreSQL's initdb (Debian's postgresql package)");
    };
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    let url = format!(
        "postgres://postgres:wrong-password@127.0.0.1:{}/postgres",
        pg.port
    );
    let env = env_for(&db, &sim, &[("WAZZUP_SYNC__STATE__URL", &url)]);

    let out = run_bin(&["sync"], &env).await;

    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let line = stderr
        .lines()
        .find(|l| l.contains("state database"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("the server refused the login"), "{line}");
    assert!(line.contains("(check WAZZUP_SYNC__STATE__URL)"), "{line}");
    assert_eq!(
        line.matches("password authentication failed").count(),
        1,
        "{line}"
    );
    assert!(!line.contains(" at line "), "{line}");
    assert!(!stderr.contains("wrong-password"), "{stderr}");
}

#[tokio::test]
async fn a_failing_crm_query_is_named() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");

    let out = run_bin(
        &["sync"],
        &env_for(
            &db,
            &sim,
            &[(
                "WAZZUP_SYNC__SOURCE__ROLES_QUERY",
                "SELECT * FROM no_such_roles",
            )],
        ),
    )
    .await;

    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stderr.contains(r#"The user roles query failed: relation "no_such_roles" does not exist"#),
        "{stderr}"
    );
    assert!(!stderr.contains(" at line "), "{stderr}");
}

#[tokio::test]
async fn run_waits_for_a_database_that_is_down_at_start_and_syncs_once_it_is_up() {
    let Some(pg) = PrivatePg::start() else {
        panic!("the test needs PostgreSQL's initdb (Debian's postgresql package)");
    };
    pg.stop_server();
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let state_url = pg.url();
    let env = env_for(
        &db,
        &sim,
        &[
            ("WAZZUP_SYNC__STATE__URL", &state_url),
            ("WAZZUP_SYNC__HTTP__LISTEN", &listen),
            ("WAZZUP_SYNC__SYNC__SCHEDULE", "*/1 * * * * *"),
        ],
    );
    let mut child = spawn_bin(&["run"], &env);
    let base = format!("http://{listen}");

    let (status, body) = poll(&format!("{base}/readyz"), 10, |s, _| s == 503)
        .await
        .expect("the listener answers while the database is down");
    assert_eq!(status, 503);
    assert!(
        body.contains("Cannot connect to the state database"),
        "{body}"
    );
    assert_eq!(get(&format!("{base}/healthz")).await.unwrap().0, 200);
    // It waits for the database rather than exiting: the sync below is its proof.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );

    pg.start_server();
    for _ in 0..600 {
        if sim.users("tok-1").len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sim.users("tok-1").len(),
        3,
        "it synced once the database was up"
    );
    let ready = poll(&format!("{base}/readyz"), 10, |s, _| s == 200).await;
    assert_eq!(ready.map(|r| r.0), Some(200));

    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let log = text(&out);
    let waits: Vec<serde_json::Value> = log_lines(&log)
        .into_iter()
        .filter(|l| l["message"] == "Waiting for the state database before the first cycle")
        .collect();
    assert!(!waits.is_empty(), "{log}");
    assert!(
        waits[0]["error"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{}: connection refused", pg.port)),
        "{:?}",
        waits[0]
    );
    let delays: Vec<u64> = waits
        .iter()
        .map(|w| w["retry_in_secs"].as_u64().unwrap())
        .collect();
    assert!(
        delays.windows(2).all(|w| w[1] >= w[0]) && delays.len() < 10,
        "growing intervals: {delays:?}"
    );
    assert!(log.contains("The state database answers again"), "{log}");
}

#[tokio::test]
async fn a_port_where_something_else_answers_is_said_plainly() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    // The simulator speaks HTTP, not PostgreSQL.
    let url = format!("postgres://postgres@{}/crm", sim.addr());
    let env = env_for(&db, &sim, &[("WAZZUP_SYNC__STATE__URL", &url)]);

    let out = run_bin(&["sync"], &env).await;

    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stderr.contains(&format!(
            "Cannot connect to the state database at {}: what answers there does not speak PostgreSQL's protocol",
            sim.addr()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("(sqlx"), "{stderr}");
}
