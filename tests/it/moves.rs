//! Phones that move between users, and room freed at the user limit: both converge whether
//! Wazzup checks phones per request or user by user, with any batch size.

use crate::helpers::*;
use wazzup_sim::PhoneCheck;

/// The simulator's phone of each of these users.
fn phones(sim: &wazzup_sim::Simulator, ids: &[&str]) -> Vec<Option<String>> {
    let users = sim.users("tok-1");
    ids.iter()
        .map(|id| {
            users
                .get(*id)
                .and_then(|u| u.phone.as_ref().map(ToString::to_string))
        })
        .collect()
}

#[tokio::test]
async fn swapped_and_rotated_phones_land_in_one_cycle_however_wazzup_checks_them() {
    for (check, batch) in [
        (PhoneCheck::PerUser, "1"),
        (PhoneCheck::PerUser, "100"),
        (PhoneCheck::Request, "1"),
        (PhoneCheck::Request, "100"),
    ] {
        let db = TestDb::with_crm().await;
        let sim = simulator().await;
        sim.set_phone_check(check);
        db.add_account("a1", "tok-1").await;
        sim.add_account("tok-1");
        db.add_users("a1", 6).await;
        let extra = [("WAZZUP_SYNC__SYNC__BATCH_SIZE", batch)];
        sync(&db, &sim, &extra).await;

        // u1 and u2 swap; u3 → u4's, u4 → u5's, u5 → u3's; u6 takes nobody's.
        db.exec(
            "UPDATE wazzup_users SET phone = CASE id
                 WHEN 'u1' THEN '+371 20000002' WHEN 'u2' THEN '+371 20000001'
                 WHEN 'u3' THEN '+371 20000004' WHEN 'u4' THEN '+371 20000005'
                 WHEN 'u5' THEN '+371 20000003' WHEN 'u6' THEN '+371 20000066' END;
             UPDATE wazzup_users SET name = 'Renamed' WHERE id = 'u6'",
        )
        .await;
        let report = sync(&db, &sim, &extra).await;

        let case = format!("{check:?}, batches of {batch}");
        assert_eq!(
            phones(&sim, &["u1", "u2", "u3", "u4", "u5", "u6"]),
            [
                "37120000002",
                "37120000001",
                "37120000004",
                "37120000005",
                "37120000003",
                "37120000066"
            ]
            .map(|p| Some(p.to_string())),
            "{case}"
        );
        assert!(db.open_dead_letters().await.is_empty(), "{case}");
        assert_eq!(
            report.accounts[0].updated, 6,
            "{case}: each user counted once"
        );
        assert_eq!(report.accounts[0].rejected_remotely, 0, "{case}");
        let again = sync(&db, &sim, &extra).await;
        assert_eq!(
            again.accounts[0].requests, 0,
            "{case}: nothing left to send"
        );
    }
}

#[tokio::test]
async fn a_hire_takes_the_phone_of_a_user_who_left_in_the_same_cycle() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    sim.set_phone_check(PhoneCheck::PerUser);
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    sync(&db, &sim, &[]).await;

    db.exec(
        "DELETE FROM wazzup_users WHERE id = 'u3'; DELETE FROM wazzup_user_roles WHERE user_id = 'u3';
         INSERT INTO wazzup_users VALUES ('a1', 'hire', 'New Hire', '+371 20000003', false)",
    )
    .await;
    sync(&db, &sim, &[]).await;

    let users = sim.users("tok-1");
    assert!(!users.contains_key("u3"), "the leaver is deleted");
    assert_eq!(
        users["hire"].phone.as_deref(),
        Some("37120000003"),
        "the hire got the leaver's phone in the same cycle"
    );
    assert!(db.open_dead_letters().await.is_empty());
}

#[tokio::test]
async fn creates_held_by_the_user_limit_land_as_soon_as_users_leave() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.set_user_limit("tok-1", 5);
    db.add_users("a1", 5).await;
    sync(&db, &sim, &[]).await;
    db.exec(
        "INSERT INTO wazzup_users SELECT 'a1', 'h' || g, 'Hire ' || g, NULL, false FROM generate_series(1, 3) g;
         INSERT INTO wazzup_user_roles SELECT 'a1', 'h' || g, 'ch-1', 'auditor', false FROM generate_series(1, 3) g",
    )
    .await;
    sync(&db, &sim, &[]).await;
    assert_eq!(db.open_dead_letters().await.len(), 3, "the account is full");

    // Two users leave; the hires' next attempt is minutes away, but there is room now.
    db.exec(
        "DELETE FROM wazzup_users WHERE id IN ('u1', 'u2');
         DELETE FROM wazzup_user_roles WHERE user_id IN ('u1', 'u2')",
    )
    .await;
    let report = sync(&db, &sim, &[]).await;

    let users = sim.users("tok-1");
    assert!(!users.contains_key("u1") && !users.contains_key("u2"));
    assert!(
        users.contains_key("h1") && users.contains_key("h2"),
        "{users:?}"
    );
    assert!(!users.contains_key("h3"), "still no room for the third");
    assert_eq!(users.len(), 5);
    let roles: Vec<String> = sim
        .settings("tok-1")
        .user_roles
        .iter()
        .filter(|r| r.user_id.starts_with('h'))
        .map(|r| r.user_id.to_string())
        .collect();
    assert_eq!(roles, ["h1", "h2"], "the landed hires got their roles");
    let dead = db.open_dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].record_id.as_str(), dead[0].error_code.as_str()),
        ("h3", "USER_LIMIT_EXCEEDED")
    );
    assert_eq!(report.accounts[0].created, 2);
    assert_eq!(report.accounts[0].deleted, 2);
}
