//! Logging: JSON lines by default, readable text on a terminal or when asked.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber. `RUST_LOG` wins over the configured level.
pub fn init(log: &LogSettings) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| {
            // The scheduler and the pool narrate at INFO; keep their warnings only.
            EnvFilter::new(format!("{},tokio_cron_scheduler=warn,sqlx=warn", log.level))
        });
    let pretty = match log.format.as_str() {
        "pretty" => true,
        "json" => false,
        _ => std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if pretty {
        builder.with_target(false).try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

/// A quiet default for commands run before settings load.
pub fn init_fallback() {
    init(&LogSettings {
        format: "auto".into(),
        level: "info".into(),
    });
}
