//! The shipped dashboard and alerts use only metrics the real daemon exports.

use std::collections::BTreeSet;

use crate::helpers::*;

/// Every `wazzup_sync_*` name in a file, histogram suffixes taken off.
fn metric_names(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("wazzup_sync_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        names.insert(base);
    }
    names
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_use_only_metrics_the_daemon_exports() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 3).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let env = env_for(&db, &sim, &[("WAZZUP_SYNC__HTTP__LISTEN", &listen)]);
    let mut child = spawn_bin(&["run"], &env);
    let scraped = poll(&format!("http://{listen}/metrics"), 30, |s, body| {
        s == 200 && body.contains("wazzup_sync_cycle_duration_seconds_count")
    })
    .await;
    child.kill().await.unwrap();
    let (_, metrics) = scraped.expect("metrics");
    let exported: BTreeSet<String> = metrics
        .lines()
        .filter(|l| l.starts_with("wazzup_sync_"))
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(&n)
                .to_string()
        })
        .collect();

    for file in [
        "deploy/grafana/dashboard.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let used = metric_names(file);
        assert!(used.len() >= 5, "{file} uses {used:?}");
        let missing: Vec<&String> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics the daemon does not export: {missing:?}\nexported: {exported:?}"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/dashboard.json"
        ))
        .unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 8));
}
