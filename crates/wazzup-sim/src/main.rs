//! `wazzup-sim`: the Wazzup simulator (`serve`) and the demo (`demo`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wazzup_sim::Simulator;
use wazzup_sim::demo::{self, DemoOptions};

/// A stand-in for the Wazzup users and settings API, and the demo that syncs a sample CRM into it.
#[derive(Parser)]
#[command(name = "wazzup-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the simulator on a loopback address until SIGTERM/SIGINT.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: String,
        /// Answer 401 to tokens not registered with --token (default: accept any token).
        #[arg(long)]
        strict: bool,
        /// Tokens to register (repeatable).
        #[arg(long)]
        token: Vec<String>,
        /// Allow a non-loopback address (inside a container, to publish the port).
        #[arg(long)]
        public: bool,
        /// Delay every answer by this many milliseconds (requests are answered concurrently).
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Seed a sample CRM in a throwaway database and sync it with the real wazzup-sync binary.
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
        /// The wazzup-sync binary (default: the one beside this one).
        #[arg(long)]
        daemon: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve {
            listen,
            strict,
            token,
            public,
            latency_ms,
        } => serve(&listen, strict, &token, public, latency_ms).await,
        Command::Demo {
            database_url,
            accounts,
            users,
            keep,
            daemon,
        } => {
            let daemon = daemon.unwrap_or_else(|| {
                let me = std::env::current_exe().unwrap_or_default();
                me.with_file_name("wazzup-sync")
            });
            demo::run(&DemoOptions {
                database_url,
                accounts,
                users,
                keep,
                daemon,
            })
            .await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wazzup-sim: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(
    listen: &str,
    strict: bool,
    tokens: &[String],
    public: bool,
    latency_ms: u64,
) -> anyhow::Result<()> {
    let sim = if public {
        Simulator::start_public(listen, !strict).await?
    } else {
        Simulator::start(listen, !strict).await?
    };
    for t in tokens {
        sim.add_account(t);
    }
    sim.set_latency(latency_ms);
    println!("Wazzup simulator listening on {}", sim.url());
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
