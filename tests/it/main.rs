//! Every integration test in one binary (one link of the whole stack): a real PostgreSQL
//! database per test, the Wazzup simulator over loopback HTTP, and the real binary.
//!
//! Tests that need a tool besides PostgreSQL are `#[ignore]`d with the tool's name and live in
//! their own module: `scripts/test` runs `container::` where podman is installed and
//! `pgbouncer::` where pgbouncer is.

// A test reads as one story: arrange, act, assert, however long.
#![allow(clippy::too_many_lines)]

mod helpers;

mod approvals;
mod arrays;
mod connections;
mod container;
mod convergence;
mod deploy;
mod explain;
mod grace;
mod history;
mod moves;
mod notified;
mod operations;
mod pgbouncer;
mod plan_detail;
mod resilience;
mod roles;
mod secrets;
mod sync_engine;
