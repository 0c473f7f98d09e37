//! The CRM behind PgBouncer in transaction pooling mode, with PgBouncer's default settings:
//! `check`, then cycles with CRM changes between them, all landing. LISTEN behind the pooler is
//! a clear error; `source.listen_url` gives it a direct session. Ignored unless run with
//! `--ignored` (scripts/test does, where pgbouncer is installed).

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::helpers::*;

/// A PgBouncer of the test's own, in transaction mode, in front of the test's PostgreSQL.
struct Bouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Bouncer {
    fn start(pg_port: u16) -> Self {
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("the pgbouncer test needs pgbouncer (apt-get install pgbouncer)");
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("wzs-bouncer-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        // Only what a deployment must say; every other setting is PgBouncer's default.
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port={pg_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\npool_mode = transaction\nlogfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        let mut cmd = Command::new(binary);
        // PgBouncer refuses to run as root; -u drops to the postgres user.
        if is_root() {
            Command::new("chown")
                .args(["-R", "postgres", dir.to_str().unwrap()])
                .status()
                .unwrap();
            cmd.args(["-u", "postgres"]);
        }
        let mut child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child, port, dir };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "pgbouncer did not start; see {}/pgbouncer.log",
            dir.display()
        );
    }

    /// The URL of `database` through the pooler.
    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test]
#[ignore = "needs pgbouncer: scripts/test runs it where pgbouncer is installed"]
async fn the_crm_is_read_through_pgbouncer_in_transaction_mode_cycle_after_cycle() {
    let db = TestDb::with_crm().await;
    let sim = simulator().await;
    let direct = url::Url::parse(&db.url).unwrap();
    let bouncer = Bouncer::start(direct.port().unwrap_or(5432));
    let database = direct.path().trim_start_matches('/').to_string();
    for (acct, token) in [("a1", "tok-1"), ("a2", "tok-2")] {
        db.add_account(acct, token).await;
        sim.add_account(token);
        db.add_users(acct, 120).await;
    }
    let pooled = bouncer.url(&database);
    // The state needs sessions (advisory locks, search_path): it gets a direct connection.
    let env = env_for(
        &db,
        &sim,
        &[
            ("WAZZUP_SYNC__SOURCE__URL", &pooled),
            ("WAZZUP_SYNC__STATE__URL", &db.url),
            ("WAZZUP_SYNC__SYNC__CONCURRENCY", "2"),
        ],
    );

    let out = run_bin(&["check"], &env).await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "ok   users query columns",
        "ok   user roles query columns",
        "ok   accounts query columns",
        "ok   account a2: token accepted",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from\n{stdout}");
    }

    let changes = [
        "UPDATE wazzup_users SET name = name || ' (1)' WHERE id IN ('u1', 'u2')",
        "DELETE FROM wazzup_users WHERE id = 'u3' AND account_id = 'a1'",
        "INSERT INTO wazzup_users VALUES ('a2', 'new-1', 'New One', NULL, false)",
        "UPDATE wazzup_user_roles SET role = 'auditor' WHERE user_id = 'u7'",
        "UPDATE wazzup_users SET phone = NULL WHERE id = 'u9'",
        "UPDATE wazzup_users SET name = 'Last' WHERE id = 'u10'",
    ];
    for (cycle, change) in changes.iter().enumerate() {
        if cycle > 0 {
            db.exec(change).await;
        }
        let out = run_bin(&["sync"], &env).await;
        assert!(out.status.success(), "cycle {cycle}: {}", text(&out));
        for (acct, token) in [("a1", "tok-1"), ("a2", "tok-2")] {
            assert_eq!(
                sim_users(&sim, token),
                crm_users(&db, acct).await,
                "cycle {cycle}: Wazzup holds what the CRM says"
            );
        }
    }
    let roles = sim.settings("tok-1").user_roles;
    assert!(
        roles
            .iter()
            .any(|r| r.user_id == "u7" && r.role == wazzup_sync::domain::Role::Auditor)
    );

    // LISTEN through the pooler hears nothing: check says so and names the fix.
    let mut with_listen = env.clone();
    with_listen.push((
        "WAZZUP_SYNC__SYNC__LISTEN_CHANNEL".into(),
        "wazzup_sync".into(),
    ));
    let out = run_bin(&["check"], &with_listen).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL LISTEN on wazzup_sync receives no notifications")
            && stdout.contains("WAZZUP_SYNC__SOURCE__LISTEN_URL"),
        "{stdout}"
    );
    // The daemon keeps syncing on its schedule, but says so and is not ready.
    let listen = format!("127.0.0.1:{}", free_port());
    let mut run_env = with_listen.clone();
    run_env.push(("WAZZUP_SYNC__HTTP__LISTEN".into(), listen.clone()));
    let mut child = spawn_bin(&["run"], &run_env);
    let answer = poll(&format!("http://{listen}/readyz"), 30, |s, body| {
        s == 503 && body.contains("LISTEN")
    })
    .await;
    child.kill().await.unwrap();
    let (status, body) = answer.expect("readiness answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("WAZZUP_SYNC__SOURCE__LISTEN_URL"), "{body}");
    let out = child.wait_with_output().await.unwrap();
    let line = log_line(&text(&out), "LISTEN is not working").expect("an error line");
    assert_eq!(line["level"], "ERROR");

    with_listen.push(("WAZZUP_SYNC__SOURCE__LISTEN_URL".into(), db.url.clone()));
    let out = run_bin(&["check"], &with_listen).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("ok   LISTEN on wazzup_sync receives notifications")
    );

    // A state database behind the pooler too: a clear line, not a silent wrong schema.
    let pooled_state = env_for(&db, &sim, &[("WAZZUP_SYNC__SOURCE__URL", &pooled)]);
    let out = run_bin(&["sync"], &pooled_state).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Cannot connect to the state database")
            && stderr.contains("needs a session; give it a direct connection"),
        "{stderr}"
    );
}
