//! wazzup-sync: keeps Wazzup users and role settings in step with a CRM's PostgreSQL database.
//!
//! The module tree reads like the pipeline: [`source`] reads the CRM, [`domain`] normalizes and
//! validates, [`plan`] diffs against the mirror, the [`client`] pushes through the Wazzup API
//! (the `wazzup-api` crate), [`state`] records outcomes; [`sync`] runs a cycle stage by stage
//! and [`commands`] wires the command line. See docs/ARCHITECTURE.md.

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
