//! Role values: the operator's map is law, and a capitalised "Manager" is never read as the
//! API's `manager` (the UI's Supervisor, who sees every chat).

use crate::helpers::*;
use wazzup_sync::domain::Role;

/// The role map of the README's configuration example.
const README_ROLE_MAP: &str = r#"
[source.role_map]
"Manager" = "seller"
"Supervisor" = "manager"
"Quality Control" = "auditor"
"#;

fn roles_in_wazzup(sim: &wazzup_sim::Simulator, token: &str) -> Vec<(String, Role)> {
    sim.settings(token)
        .user_roles
        .into_iter()
        .map(|r| (r.user_id.to_string(), r.role))
        .collect()
}

#[tokio::test]
async fn the_readme_role_map_decides_every_role_end_to_end() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    for (user, role) in [
        ("u1", "Manager"),
        ("u2", "MANAGER"),
        ("u3", "Supervisor"),
        ("u4", "Quality Control"),
        ("u5", "manager"),
        ("u6", "seller"),
    ] {
        db.add_user("a1", user, &format!("User {user}"), None).await;
        db.add_role("a1", user, "ch-1", role, false).await;
    }
    let config = temp_file("wazzup-sync.toml", README_ROLE_MAP);

    let out = run_bin(
        &["--config", config.to_str().unwrap(), "sync"],
        &env_for(&db, &sim, &[]),
    )
    .await;

    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        roles_in_wazzup(&sim, "tok-1"),
        [
            ("u1".to_string(), Role::Seller),
            ("u2".to_string(), Role::Seller),
            ("u3".to_string(), Role::Manager),
            ("u4".to_string(), Role::Auditor),
            // The map's keys are compared without case: it decides for "manager" too.
            ("u5".to_string(), Role::Seller),
            ("u6".to_string(), Role::Seller),
        ]
    );
    assert!(db.open_dead_letters().await.is_empty());
}

#[tokio::test]
async fn a_capitalised_manager_without_a_map_is_an_ambiguous_role_and_reaches_nothing() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_user("a1", "u1", "Anna", None).await;
    db.add_user("a1", "u2", "Boris", None).await;
    db.add_role("a1", "u1", "ch-1", "Manager", true).await;
    db.add_role("a1", "u2", "ch-1", "MANAGER", false).await;

    let out = run_bin(&["sync"], &env_for(&db, &sim, &[])).await;

    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        sim.users("tok-1").len(),
        2,
        "the users themselves are valid"
    );
    assert!(
        roles_in_wazzup(&sim, "tok-1").is_empty(),
        "no role row reaches Wazzup"
    );
    let dead = db.open_dead_letters().await;
    let codes: Vec<(&str, &str)> = dead
        .iter()
        .map(|d| (d.record_id.as_str(), d.error_code.as_str()))
        .collect();
    assert_eq!(
        codes,
        [("u1/ch-1", "ambiguous_role"), ("u2/ch-1", "ambiguous_role")]
    );
    assert!(
        dead[0]
            .error_message
            .contains("WAZZUP_SYNC__SOURCE__ROLE_MAP__MANAGER=seller"),
        "says how to map it: {}",
        dead[0].error_message
    );
    // The log line names the record as a plain string.
    let line = log_line(
        &text(&out),
        "Refused a CRM record; it is not sent to Wazzup",
    )
    .expect("a line for the refused role row");
    assert_eq!(line["record_id"], "u1/ch-1");
    assert_eq!(line["code"], "ambiguous_role");
}

#[tokio::test]
async fn check_lists_every_role_value_with_its_rows_and_what_it_becomes() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    db.add_role("a1", "u1", "ch-2", "Manager", false).await;
    db.add_role("a1", "u2", "ch-2", "Manager", false).await;
    db.add_role("a1", "u3", "ch-2", "boss", false).await;

    let out = run_bin(&["check"], &env_for(&db, &sim, &[])).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();

    assert!(out.status.success(), "refused values warn only:\n{stdout}");
    assert!(
        stdout.contains("WARN role values in the user roles query: 3 distinct, 2 refused"),
        "{stdout}"
    );
    let line = |value: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(value))
            .unwrap_or_else(|| panic!("no line for {value} in\n{stdout}"))
            .to_string()
    };
    assert!(line("\"seller\"").contains("3 rows  -> seller"), "{stdout}");
    assert!(
        line("\"Manager\"").contains("2 rows  refused: ambiguous_role"),
        "{stdout}"
    );
    assert!(
        line("\"boss\"").contains("1 rows  refused: unknown_role"),
        "{stdout}"
    );

    let out = run_bin(
        &["check"],
        &env_for(
            &db,
            &sim,
            &[
                ("WAZZUP_SYNC__SOURCE__ROLE_MAP__MANAGER", "seller"),
                ("WAZZUP_SYNC__SOURCE__ROLE_MAP__BOSS", "auditor"),
            ],
        ),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        stdout.contains("ok   role values in the user roles query: 3 distinct, 0 refused"),
        "{stdout}"
    );
    assert!(stdout.contains("-> seller (source.role_map)"), "{stdout}");
    assert!(stdout.contains("-> auditor (source.role_map)"), "{stdout}");
}

#[tokio::test]
async fn a_role_map_value_that_is_not_an_exact_api_role_stops_start_up() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;

    let out = run_bin(
        &["sync"],
        &env_for(
            &db,
            &sim,
            &[("WAZZUP_SYNC__SOURCE__ROLE_MAP__BOSS", "Manager")],
        ),
    )
    .await;

    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("WAZZUP_SYNC__SOURCE__ROLE_MAP__BOSS"),
        "{stderr}"
    );
}
