//! wazzup-sync: keeps Wazzup users and role settings in step with a CRM's PostgreSQL database.
//!
//! The pipeline reads like the module tree: [`source`] reads the CRM, [`domain`] normalizes and
//! validates, [`plan`] diffs against the mirror, [`wazzup`] pushes, [`state`] records outcomes;
//! [`sync`] runs a cycle and [`app`] wires the commands.

pub mod app;
pub mod config;
pub mod db;
pub mod dead_letters;
pub mod demo;
pub mod domain;
pub mod ops;
pub mod plan;
pub mod simulator;
pub mod source;
pub mod state;
pub mod sync;
pub mod telemetry;
pub mod wazzup;
