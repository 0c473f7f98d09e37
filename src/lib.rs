//! wazzup-sync: keeps Wazzup users and role settings in step with a CRM's PostgreSQL database.
//!
//! The module tree reads like the pipeline: [`source`] reads the CRM, [`domain`] normalizes and
//! validates, [`plan`] decides against the mirror, the [`client`] pushes through the Wazzup API
//! (the `wazzup-api` crate), [`state`] records outcomes, the history and the approvals; [`sync`]
//! runs a cycle stage by stage and [`commands`] holds each command. Around them: [`config`]
//! (settings, checked at start-up), [`db`] (connection targets and their errors), [`ops`]
//! (`/healthz`, `/readyz`, `/metrics`) and [`telemetry`] (logging). See docs/ARCHITECTURE.md.

pub mod client;
pub mod commands;
pub mod config;
pub mod db;
pub mod domain;
pub mod ops;
pub mod plan;
pub mod source;
pub mod state;
pub mod sync;
pub mod telemetry;
