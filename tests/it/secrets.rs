//! Secrets from files: `<VAR>_FILE` names a file holding the value, as Docker and Kubernetes
//! mount secrets.

use crate::helpers::*;

/// The test's environment with these variables replaced by `_FILE` ones.
fn with_files(
    env: Vec<(String, String)>,
    files: &[(&str, &std::path::Path)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| !files.iter().any(|(name, _)| k == name))
        .collect();
    for (name, path) in files {
        env.push((format!("{name}_FILE"), path.to_str().unwrap().to_string()));
    }
    env
}

#[tokio::test]
async fn the_urls_and_the_token_can_be_read_from_files() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    sim.add_account("tok-file");
    db.add_users("single", 3).await;
    let source = temp_file("source-url", &format!("{}\n", db.url));
    let state = temp_file("state-url", &format!("{}\r\n", db.url));
    let token = temp_file("token", "tok-file\n\n");
    let env = with_files(
        env_for(&db, &sim, &[]),
        &[
            ("WAZZUP_SYNC__SOURCE__URL", &source),
            ("WAZZUP_SYNC__STATE__URL", &state),
            ("WAZZUP_SYNC__WAZZUP__TOKEN", &token),
        ],
    );

    let out = run_bin(&["sync"], &env).await;

    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        sim.users("tok-file").len(),
        3,
        "the token from the file was used"
    );
    assert!(!text(&out).contains("tok-file"));
}

#[tokio::test]
async fn a_variable_and_its_file_together_or_an_unreadable_file_stop_start_up() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    let token = temp_file("token", "tok-secret-value\n");
    let mut env = env_for(&db, &sim, &[("WAZZUP_SYNC__WAZZUP__TOKEN", "tok-other")]);
    env.push((
        "WAZZUP_SYNC__WAZZUP__TOKEN_FILE".into(),
        token.to_str().unwrap().into(),
    ));

    let out = run_bin(&["sync"], &env).await;

    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(
            "WAZZUP_SYNC__WAZZUP__TOKEN and WAZZUP_SYNC__WAZZUP__TOKEN_FILE are both set"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("tok-secret-value") && !stderr.contains("tok-other"));

    let missing = std::env::temp_dir().join("wzs-no-such-dir/state-url");
    let env = with_files(
        env_for(&db, &sim, &[]),
        &[("WAZZUP_SYNC__STATE__URL", &missing)],
    );
    let out = run_bin(&["sync"], &env).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stderr.contains("WAZZUP_SYNC__STATE__URL_FILE: cannot read the file")
            && stderr.contains(missing.to_str().unwrap()),
        "{stderr}"
    );

    // A file that holds something wrong: the error names the setting, never the content.
    let bad = temp_file("source-url", "not-a-url-but-a-secret-hunter2\n");
    let env = with_files(
        env_for(&db, &sim, &[]),
        &[("WAZZUP_SYNC__SOURCE__URL", &bad)],
    );
    let out = run_bin(&["sync"], &env).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(stderr.contains("WAZZUP_SYNC__SOURCE__URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
