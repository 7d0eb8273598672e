//! # postern-tests
//!
//! End-to-end tests, in one test binary: they start the controller and worker in-process
//! (or the real `postern` binary), and talk to real peers: the PostgreSQL running on this
//! machine and the system `psql`.
//!
//! # Layout
//! - [`harness`]: a controller + worker pair on loopback, an admin API client, helpers.
//! - `dev_cli`: `postern dev` and `postern connect … -- psql` as a user runs them.
//! - `policy`: refusals, their messages and audit events; deny beats allow.
//! - `worker_refusals`: bad tokens and garbage at the worker.
//! - `many_connections`: 50 parallel connections through one session, checksummed.
#![forbid(unsafe_code)]

pub mod harness;

#[cfg(test)]
mod dev_cli;
#[cfg(test)]
mod many_connections;
#[cfg(test)]
mod policy;
#[cfg(test)]
mod revocation;
#[cfg(test)]
mod worker_refusals;
