//! # postern-tests
//!
//! End-to-end tests, in one test binary: they start the controller and worker in-process
//! (or the real `postern` binary), and talk to real peers: the PostgreSQL running on this
//! machine and the system `psql`.
//!
//! # Layout
//! - [`harness`]: a controller + worker pair on loopback, an admin API client, helpers.
//! - `dev_cli`: `postern dev` and `postern connect … -- psql` as a user runs them.
//! - [`idp`]: a real OpenID provider (`oidc-provider`, Node.js) and a headless browser.
//! - `oidc`: OIDC login (code and device flows), groups → roles, refusals, key rotation.
//! - `policy`: refusals, their messages and audit events; deny beats allow.
//! - `postgres`: `postgres` targets against a throwaway password-protected PostgreSQL:
//!   brokered SCRAM/MD5 login, statement audit, cancel, pgbench, protocol errors.
//! - [`sshd`]: a throwaway OpenSSH `sshd` for SSH targets.
//! - `ssh`: `postern ssh` (key and certificate mode), scp/sftp, recordings, refusals.
//! - `worker_refusals`: bad tokens and garbage at the worker.
//! - `private_network`: outbound-only workers behind the controller's relay, worker choice,
//!   several controllers; across real network namespaces nothing can connect into.
//! - `many_connections`: 50 parallel connections through one session, checksummed.
//! - `operations`: the API over TLS (pinned cluster CA, `--ca-file`), `--check-config` on
//!   the `deploy/` examples, `/metrics` moving and parsing, no secret in a full run's logs.
#![forbid(unsafe_code)]

pub mod harness;
pub mod idp;
pub mod sshd;

#[cfg(test)]
mod audit;
#[cfg(test)]
mod dev_cli;
#[cfg(test)]
mod many_connections;
#[cfg(test)]
mod oidc;
#[cfg(test)]
mod operations;
#[cfg(test)]
mod policy;
#[cfg(test)]
mod postgres;
#[cfg(test)]
mod private_network;
#[cfg(test)]
mod revocation;
#[cfg(test)]
mod ssh;
#[cfg(test)]
mod worker_refusals;
