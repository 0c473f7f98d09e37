//! The container image, built and run for real with podman: it starts from environment
//! variables alone, syncs a CRM database on the host into the simulator, reports healthy,
//! runs as a non-root user and stops cleanly on SIGTERM. Ignored unless run with `--ignored`
//! (scripts/test does, where podman is installed).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::helpers::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .env(
            "CONTAINERS_CONF",
            repo().join("scripts/podman/containers.conf"),
        )
        .output()
        .expect("run podman")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds the image from the Dockerfile, with the binary this test run built put in as the
/// `prebuilt` stage (a Rust builder image cannot be pulled here).
fn build_image(tag: &str) {
    let ctx = std::env::temp_dir().join(format!("wzs-image-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(ctx.join("target/release")).unwrap();
    std::fs::copy(repo().join("Dockerfile"), ctx.join("Dockerfile")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_wazzup-sync"),
        ctx.join("target/release/wazzup-sync"),
    )
    .unwrap();
    let out = podman(&[
        "build",
        "-q",
        "--format",
        "docker",
        "--build-arg",
        "BINARY_SOURCE=prebuilt",
        "-t",
        tag,
        ctx.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&ctx);
    ok(&out);
}

fn podman_ready() -> Result<(), String> {
    if Command::new("podman").arg("--version").output().is_err() {
        return Err("podman is not installed".into());
    }
    let base = Command::new(repo().join("scripts/podman-base-image"))
        .env(
            "CONTAINERS_CONF",
            repo().join("scripts/podman/containers.conf"),
        )
        .output()
        .map_err(|e| e.to_string())?;
    if !base.status.success() {
        return Err(format!(
            "no base image: {}",
            String::from_utf8_lossy(&base.stderr)
        ));
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs podman: scripts/test runs it where podman is installed"]
async fn the_image_syncs_from_environment_variables_alone_reports_healthy_and_stops_on_sigterm() {
    // Asked for explicitly: a missing podman is a failure, not a pass.
    if let Err(why) = podman_ready() {
        panic!("the container test needs podman: {why}");
    }
    let tag = "localhost/wazzup-sync:test";
    build_image(tag);

    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    db.add_account("a1", "tok-1").await;
    sim.add_account("tok-1");
    db.add_users("a1", 42).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let name = format!(
        "wzs-test-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let env = [
        format!("WAZZUP_SYNC__SOURCE__URL={}", db.url),
        format!("WAZZUP_SYNC__WAZZUP__BASE_URL={}", sim.url()),
        format!("WAZZUP_SYNC__HTTP__LISTEN=127.0.0.1:{port}"),
        "WAZZUP_SYNC__SYNC__SCHEDULE=*/2 * * * * *".to_string(),
    ];
    let mut args: Vec<&str> = vec!["run", "-d", "--name", &name, "--network", "host"];
    for e in &env {
        args.push("-e");
        args.push(e);
    }
    // No command: the image's ENTRYPOINT and CMD start the daemon.
    args.push(tag);
    ok(&podman(&args));

    // Synced, and the account's summary line written (it comes after the settings).
    let mut log = String::new();
    for _ in 0..150 {
        let logs = podman(&["logs", &name]);
        log = format!(
            "{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
        if sim.users("tok-1").len() == 42 && log.contains("\"message\":\"Account synced\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sim.users("tok-1").len(),
        42,
        "the container synced the CRM: {log}"
    );
    assert!(
        log.contains("\"message\":\"Account synced\""),
        "JSON logs: {log}"
    );

    // The image's HEALTHCHECK (wazzup-sync healthcheck) answers healthy.
    let mut healthy = false;
    let mut last = String::new();
    for _ in 0..50 {
        let hc = podman(&["healthcheck", "run", &name]);
        if hc.status.success() {
            healthy = true;
            break;
        }
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&hc.stdout),
            String::from_utf8_lossy(&hc.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let inspect = ok(&podman(&[
        "inspect",
        "--format",
        "{{.Config.User}}|{{.Config.Healthcheck.Test}}",
        &name,
    ]));
    let top = ok(&podman(&["top", &name, "user", "huser"]));
    ok(&podman(&["stop", "-t", "20", &name]));
    let exit = ok(&podman(&[
        "inspect",
        "--format",
        "{{.State.ExitCode}}",
        &name,
    ]));
    let logs = podman(&["logs", &name]);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    let _ = podman(&["rm", "-f", &name]);

    assert!(healthy, "podman healthcheck run reports healthy: {last}");
    assert!(
        inspect.starts_with("10001|"),
        "runs as a non-root user: {inspect}"
    );
    assert!(inspect.contains("wazzup-sync healthcheck"), "{inspect}");
    assert!(
        !top.lines()
            .skip(1)
            .any(|l| l.split_whitespace().next() == Some("root")),
        "{top}"
    );
    assert_eq!(exit, "0", "stops cleanly on SIGTERM: {log}");
    assert!(log.contains("wazzup-sync stopped"), "{log}");
}
