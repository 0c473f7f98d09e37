//! The `wazzup-sync` command line: parses it, loads the settings, and hands over to the
//! library's commands. Any error becomes one readable line and a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wazzup_sync::commands::{self, dead_letters};
use wazzup_sync::config::Settings;
use wazzup_sync::state::Selection;
use wazzup_sync::sync::CycleOptions;
use wazzup_sync::{ops, telemetry};

/// A cycle allocates many small strings (a row's values, ids, payloads); mimalloc serves them
/// with about a quarter of the CPU glibc's allocator needs (`bench/NOTES.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps Wazzup users and role settings in step with a CRM's PostgreSQL database.
#[derive(Parser)]
#[command(name = "wazzup-sync", version)]
struct Cli {
    /// A TOML file layered over the defaults (environment variables still win).
    #[arg(long, global = true, env = "WAZZUP_SYNC_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon: migrate, then sync on the schedule until SIGTERM/SIGINT.
    Run,
    /// Migrate, one cycle for every account, exit 0 when all completed, 1 otherwise.
    Sync {
        /// Let a mass deletion through for this account (repeatable; `*` for all), this cycle only.
        #[arg(long = "allow-mass-delete", value_name = "ACCOUNT")]
        allow_mass_delete: Vec<String>,
    },
    /// Read every account back from Wazzup, repair drift, then sync (exit codes as `sync`).
    Reconcile,
    /// Dry run: print per account what a cycle would send. Sends nothing, writes nothing.
    Plan {
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
        /// One line per record: creates, updates (with the fields that change), deletes, role
        /// rows added, changed or removed; changes that widen access are marked.
        #[arg(long)]
        detail: bool,
    },
    /// Create or update the state schema.
    Migrate,
    /// Check settings, both databases, the queries, the role values and every account's token.
    Check,
    /// Exit 0 when the running daemon's /readyz answers ready (for HEALTHCHECK).
    Healthcheck,
    /// List, retry or discard the records that were refused.
    #[command(name = "dead-letters", subcommand)]
    DeadLetters(DeadLetterCommand),
    /// The changes held until a person decides: list, approve, reject.
    #[command(subcommand)]
    Approvals(ApprovalCommand),
    /// The record of every change Wazzup acknowledged, newest first. Read-only.
    History {
        /// Only this user's changes.
        user_id: Option<String>,
        #[arg(long)]
        account: Option<String>,
        /// From this age (7d, 12h, 30m) or date (2026-12-01) on.
        #[arg(long)]
        since: Option<String>,
        /// Before this age or date.
        #[arg(long)]
        until: Option<String>,
        /// Only these actions, comma-separated (role_granted,role_changed,…).
        #[arg(long)]
        action: Option<String>,
        /// Only the changes that gave someone more access.
        #[arg(long)]
        widens_access: bool,
        /// Only what this cycle did (its id in `cycles`).
        #[arg(long)]
        cycle: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long, default_value = "table", value_parser = ["table", "json", "csv"])]
        format: String,
    },
    /// Who holds which role on which channel now, as Wazzup acknowledged it, and since when.
    Access {
        #[arg(long)]
        account: Option<String>,
        /// Only these roles, comma-separated (manager,auditor).
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        channel: Option<String>,
        #[arg(long, default_value = "table", value_parser = ["table", "json", "csv"])]
        format: String,
    },
    /// Everything about one user: the CRM rows, what they became and why, the mirror, the dead
    /// letters, what the next cycle would send; with --remote, what Wazzup holds now. Read-only.
    Explain {
        user_id: String,
        /// The user's account (needed when the id is in several accounts).
        #[arg(long)]
        account: Option<String>,
        /// Also ask Wazzup what it holds for the user now (GET requests only).
        #[arg(long)]
        remote: bool,
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
}

#[derive(Subcommand)]
enum ApprovalCommand {
    /// The open approvals, oldest first: what waits, why, and what was decided.
    List {
        #[arg(long)]
        account: Option<String>,
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// Let held changes go out in the next cycle (a running daemon starts it at once).
    Approve(DecideFlags),
    /// Keep held changes out until their CRM content changes.
    Reject(DecideFlags),
}

#[derive(clap::Args)]
struct DecideFlags {
    /// The approvals' ids (see `approvals list`).
    ids: Vec<String>,
    /// With --all: every waiting approval of this account.
    #[arg(long)]
    account: Option<String>,
    #[arg(long)]
    all: bool,
    /// Who decides (required; recorded in the history).
    #[arg(long)]
    by: Option<String>,
    /// Why, recorded in the history.
    #[arg(long)]
    note: Option<String>,
}

impl From<DecideFlags> for commands::approvals::DecideArgs {
    fn from(f: DecideFlags) -> Self {
        Self {
            ids: f.ids,
            account: f.account,
            all: f.all,
            by: f.by,
            note: f.note,
        }
    }
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Show open dead letters: what was refused, why, and what to fix.
    List {
        #[arg(long)]
        account: Option<String>,
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
        /// Include resolved ones.
        #[arg(long)]
        all: bool,
    },
    /// Send refused records again at the next cycle (or now, with --now).
    Retry {
        #[arg(long)]
        account: Option<String>,
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<i64>,
        #[arg(long)]
        all: bool,
        /// Run a cycle for the affected accounts at once.
        #[arg(long)]
        now: bool,
    },
    /// Close dead letters by hand; a refused record is not sent again until it changes in the CRM.
    Discard {
        #[arg(long)]
        account: Option<String>,
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<i64>,
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wazzup-sync: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log);
    // One thread: a cycle waits on its databases and the API far more than it computes, and
    // tasks handing work between threads cost a wake-up (a futex and a context switch) each.
    // Measured at 200 accounts: a fifth of the context switches, 9-13 % less CPU, the same
    // wall time.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wazzup-sync: failed to start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            // One line per database that cannot be reached; otherwise the cause chain, once.
            match e.downcast_ref::<wazzup_sync::db::Unreachable>() {
                Some(unreachable) => {
                    for line in &unreachable.0 {
                        eprintln!("wazzup-sync: {line}");
                    }
                }
                None => eprintln!("wazzup-sync: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    let ok = |yes: bool| {
        if yes {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    };
    match command {
        Command::Run => commands::run_daemon(settings)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Sync { allow_mass_delete } => {
            let opts = CycleOptions {
                allow_mass_delete: allow_mass_delete.into_iter().collect(),
                ..Default::default()
            };
            commands::sync::sync_and_report(settings, opts).await
        }
        Command::Reconcile => {
            commands::sync::sync_and_report(settings, CycleOptions::reconcile()).await
        }
        Command::Plan { format, detail } => {
            let report = commands::plan(settings, detail).await?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                commands::print_plan(&report, &mut std::io::stdout())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => commands::migrate(&settings)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Healthcheck => ops::healthcheck(&settings).await.map(ok),
        Command::Check => commands::check(settings).await.map(ok),
        Command::Explain {
            user_id,
            account,
            remote,
            format,
        } => {
            let req = commands::explain::Request {
                user_id,
                account,
                remote,
            };
            commands::explain::run(settings, req, format == "json")
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::DeadLetters(cmd) => dead_letters_command(cmd, settings).await,
        Command::Approvals(cmd) => {
            use commands::approvals::{run_decide, run_list};
            use wazzup_sync::state::approvals::Decision;
            match cmd {
                ApprovalCommand::List { account, format } => {
                    run_list(settings, account, format == "json").await
                }
                ApprovalCommand::Approve(f) => {
                    run_decide(settings, Decision::Approve, f.into()).await
                }
                ApprovalCommand::Reject(f) => {
                    run_decide(settings, Decision::Reject, f.into()).await
                }
            }
        }
        Command::History { .. } | Command::Access { .. } => {
            history_command(command, settings).await
        }
    }
}

async fn dead_letters_command(
    cmd: DeadLetterCommand,
    settings: Settings,
) -> anyhow::Result<ExitCode> {
    let (action, account, id) = match cmd {
        DeadLetterCommand::List {
            account,
            format,
            all,
        } => (
            dead_letters::Action::List {
                all,
                json: format == "json",
            },
            account,
            None,
        ),
        DeadLetterCommand::Retry {
            account, id, now, ..
        } => (dead_letters::Action::Retry { now }, account, id),
        DeadLetterCommand::Discard { account, id, .. } => {
            (dead_letters::Action::Discard, account, id)
        }
    };
    dead_letters::run(settings, action, Selection { account, id }).await
}

/// `history` and `access`.
async fn history_command(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    use commands::history::{AccessArgs, HistoryArgs, run_access, run_history};
    match command {
        Command::History {
            user_id,
            account,
            since,
            until,
            action,
            widens_access,
            cycle,
            limit,
            format,
        } => {
            let args = HistoryArgs {
                user_id,
                account,
                since,
                until,
                actions: action,
                widens_access,
                cycle,
                limit,
                format,
            };
            run_history(settings, args).await
        }
        Command::Access {
            account,
            role,
            channel,
            format,
        } => {
            let args = AccessArgs {
                account,
                roles: role,
                channel,
                format,
            };
            run_access(settings, args).await
        }
        _ => Ok(ExitCode::from(2)),
    }
}
