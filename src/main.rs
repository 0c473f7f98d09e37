use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wazzup_sync::config::Settings;
use wazzup_sync::dead_letters::{self, Selection};
use wazzup_sync::sync::CycleOptions;
use wazzup_sync::{app, demo, ops, simulator, state, telemetry};

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
    /// Check settings, both databases, the queries' columns and every account's token.
    Check,
    /// Exit 0 when the running daemon's /readyz answers ready (for HEALTHCHECK).
    Healthcheck,
    /// List, retry or discard the records that were refused.
    #[command(name = "dead-letters", subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Run the Wazzup simulator (loopback only), for trying the daemon without Wazzup.
    Simulate {
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: String,
        /// Answer 401 to tokens not registered with --token (default: accept any token).
        #[arg(long)]
        strict: bool,
        /// Tokens to register (repeatable).
        #[arg(long)]
        token: Vec<String>,
    },
    /// Seed a sample CRM in a throwaway database and sync it into an in-process simulator.
    Demo {
        /// PostgreSQL to use (a database is created and dropped in it).
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        database_url: String,
        #[arg(long, default_value_t = 5)]
        accounts: usize,
        #[arg(long, default_value_t = 200)]
        users: usize,
        /// Keep the demo database afterwards.
        #[arg(long)]
        keep: bool,
    },
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
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wazzup-sync: failed to start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(try_main(cli))
}

fn load(cli_config: Option<&std::path::Path>) -> Result<Settings, ExitCode> {
    Settings::load(cli_config).map_err(|e| {
        eprintln!("wazzup-sync: {e}");
        ExitCode::from(2)
    })
}

async fn try_main(cli: Cli) -> ExitCode {
    let config = cli.config.as_deref();
    let result: anyhow::Result<ExitCode> = async {
        match cli.command {
            Command::Simulate {
                listen,
                strict,
                token,
            } => {
                telemetry::init_fallback();
                let sim = simulator::Simulator::start(&listen, !strict).await?;
                for t in &token {
                    sim.add_account(t);
                }
                println!("Wazzup simulator listening on {}", sim.url());
                app::shutdown_signal().await;
                Ok(ExitCode::SUCCESS)
            }
            Command::Demo {
                database_url,
                accounts,
                users,
                keep,
            } => {
                telemetry::init(&wazzup_sync::config::LogSettings {
                    format: "pretty".into(),
                    level: "warn".into(),
                });
                demo::run(&database_url, accounts, users, keep).await?;
                Ok(ExitCode::SUCCESS)
            }
            command => {
                let settings = match load(config) {
                    Ok(s) => s,
                    Err(code) => return Ok(code),
                };
                telemetry::init(&settings.log);
                match command {
                    Command::Run => {
                        app::run_daemon(settings).await?;
                        Ok(ExitCode::SUCCESS)
                    }
                    Command::Sync { allow_mass_delete } => {
                        let opts = CycleOptions {
                            allow_mass_delete: app::allow_set(&allow_mass_delete),
                            ..Default::default()
                        };
                        sync_and_report(settings, opts).await
                    }
                    Command::Reconcile => {
                        let opts = CycleOptions {
                            reconcile: true,
                            ..Default::default()
                        };
                        sync_and_report(settings, opts).await
                    }
                    Command::Plan { format, detail } => {
                        let report = app::plan(settings, detail).await?;
                        if format == "json" {
                            println!("{}", serde_json::to_string_pretty(&report)?);
                        } else {
                            app::print_plan(&report, &mut std::io::stdout())?;
                        }
                        Ok(ExitCode::SUCCESS)
                    }
                    Command::Migrate => {
                        app::migrate(&settings).await?;
                        Ok(ExitCode::SUCCESS)
                    }
                    Command::Healthcheck => Ok(if ops::healthcheck(&settings).await? {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }),
                    Command::DeadLetters(cmd) => dead_letter_command(settings, cmd).await,
                    Command::Check => Ok(if app::check(settings).await? {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }),
                    Command::Simulate { .. } | Command::Demo { .. } => unreachable!(),
                }
            }
        }
    }
    .await;
    match result {
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

async fn dead_letter_command(
    settings: Settings,
    cmd: DeadLetterCommand,
) -> anyhow::Result<ExitCode> {
    let pool = state::connect(&settings)?;
    wazzup_sync::db::probe_all(&[&state::target(&settings)?]).await?;
    if !state::is_migrated(&pool, &settings.state.schema).await? {
        println!("No state schema yet: nothing has been synced.");
        return Ok(ExitCode::SUCCESS);
    }
    match cmd {
        DeadLetterCommand::List {
            account,
            format,
            all,
        } => {
            let rows = dead_letters::list(&pool, &Selection { account, id: None }, all).await?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                dead_letters::print_table(&rows, &mut std::io::stdout())?;
            }
        }
        DeadLetterCommand::Retry {
            account,
            id,
            all: _,
            now,
        } => {
            let accounts = dead_letters::retry(&pool, &Selection { account, id }).await?;
            println!(
                "Marked dead letters of {} account(s) due for the next cycle.",
                accounts.len()
            );
            if now && !accounts.is_empty() {
                let opts = CycleOptions {
                    only_accounts: Some(accounts.into_iter().collect()),
                    ..Default::default()
                };
                return sync_and_report(settings, opts).await;
            }
        }
        DeadLetterCommand::Discard {
            account,
            id,
            all: _,
        } => {
            let n = dead_letters::discard(&pool, &Selection { account, id }).await?;
            println!("Discarded {n} dead letter(s).");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One cycle, each account that did not complete named on stderr, and the exit code.
async fn sync_and_report(settings: Settings, opts: CycleOptions) -> anyhow::Result<ExitCode> {
    let report = app::sync_once(settings, opts).await?;
    for line in app::failed_accounts(&report) {
        eprintln!("wazzup-sync: account not synced: {line}");
    }
    Ok(ExitCode::from(app::exit_code(&report) as u8))
}
