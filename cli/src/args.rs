//! The command line, as clap derive types: one enum per noun, one variant per verb.
//!
//! Parsing of small values (`k=v`, `8h`, comma lists) lives here too, so that a bad value is
//! reported by clap with the flag it came from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Postern: identity-aware access to databases, servers and internal services.
#[derive(Debug, Parser)]
#[command(name = "postern", version, propagate_version = true)]
#[command(
    about = "Postern: identity-aware access to databases, servers and internal services",
    after_help = "Start here: `postern dev` runs a controller and a worker on this machine."
)]
pub struct Cli {
    /// Flags every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted by every command.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Print machine-readable JSON instead of tables (an error: one JSON object on stderr).
    #[arg(long, global = true)]
    pub json: bool,
    /// Controller URL (default: the saved profile's, else http://127.0.0.1:9200).
    #[arg(long, global = true, env = "POSTERN_ADDR", value_name = "URL")]
    pub addr: Option<String>,
    /// API token to use instead of the saved profile's.
    #[arg(
        long,
        global = true,
        env = "POSTERN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// PEM file of the CA that signs the controller's HTTPS certificate (default: the CA
    /// pinned at login, else the system's roots).
    #[arg(long, global = true, env = "POSTERN_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// The nouns (and a few verbs) of the CLI.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Log in to a controller and save the token in the profile.
    Login(LoginArgs),
    /// Log out: revoke the saved token and forget it.
    Logout,
    /// Show who the saved token belongs to.
    Whoami,
    /// Open a session to a target and serve it on a local port.
    Connect(ConnectArgs),
    /// Run psql against a PostgreSQL target through a session (no database password needed).
    Psql(PsqlArgs),
    /// Log in to an SSH target with the system `ssh` (or `scp`, `sftp`) through a session.
    Ssh(SshArgs),
    /// List, play and export recorded shell sessions.
    #[command(subcommand)]
    Recordings(RecordingsCmd),
    /// Manage targets (databases, servers, services).
    #[command(subcommand)]
    Targets(TargetsCmd),
    /// Set, show or remove the credential a target's sessions use (never shown to users).
    #[command(subcommand)]
    Credentials(CredentialsCmd),
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Manage groups.
    #[command(subcommand)]
    Groups(GroupsCmd),
    /// Manage roles, their rules and bindings.
    #[command(subcommand)]
    Roles(RolesCmd),
    /// Manage workers.
    #[command(subcommand)]
    Workers(WorkersCmd),
    /// List, inspect and cancel sessions.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Explain policy decisions.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Read the audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Run a controller and a worker in this process, on loopback, for trying Postern out.
    Dev(DevArgs),
    /// Print a shell completion script: `postern completions bash > /etc/bash_completion.d/postern`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `postern man | man -l -`; --dir writes one per command.
    Man {
        /// Write postern.1 and a page per command (postern-login.1, …) into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `postern credentials …`.
#[derive(Debug, Subcommand)]
pub enum CredentialsCmd {
    /// Store the credential the worker injects into TARGET's connections.
    #[command(group(clap::ArgGroup::new("secret").required(true).args(["password_stdin", "ssh_key", "ssh_ca"])))]
    Set {
        /// Target name.
        target: String,
        /// User name on the target (database user, SSH login).
        #[arg(long, short)]
        username: String,
        /// Read a password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
        /// An SSH private key file (OpenSSH format).
        #[arg(long, value_name = "FILE")]
        ssh_key: Option<std::path::PathBuf>,
        /// SSH certificate mode: the controller's SSH user CA signs a certificate per session;
        /// prints the CA public key to put in the target's `TrustedUserCAKeys`.
        #[arg(long)]
        ssh_ca: bool,
        /// PostgreSQL zero standing credentials: USERNAME is an admin (CREATEROLE) role; each
        /// session gets its own role, a member of the group role named by `--db-user`, dropped
        /// when the session ends. Needs --password-stdin.
        #[arg(long, requires = "password_stdin")]
        per_session_roles: bool,
    },
    /// Show a target's credential kind and user name (never the secret).
    Show {
        /// Target name.
        target: String,
    },
    /// Remove a target's credential.
    Delete {
        /// Target name.
        target: String,
    },
}

/// `postern login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// User name (default: the profile's; asked for on a terminal).
    #[arg(long, short)]
    pub user: Option<String>,
    /// Read the password from the first line of stdin.
    #[arg(long)]
    pub password_stdin: bool,
    /// Log in with single sign-on (OpenID Connect) in a browser.
    #[arg(long, conflicts_with_all = ["user", "password_stdin", "device"])]
    pub oidc: bool,
    /// Log in with single sign-on from another device: prints a URL and a code to enter
    /// there (for machines without a browser).
    #[arg(long, conflicts_with_all = ["user", "password_stdin"])]
    pub device: bool,
    /// The single sign-on method to use (implies --oidc unless --device); default: the
    /// controller's first. `--list-methods` shows them.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["user", "password_stdin"])]
    pub method: Option<String>,
    /// Print the login URL instead of opening a browser ($BROWSER, else xdg-open).
    #[arg(long)]
    pub no_browser: bool,
    /// List the controller's login methods and exit.
    #[arg(long, conflicts_with_all = ["user", "password_stdin", "oidc", "device"])]
    pub list_methods: bool,
    /// SHA-256 of the controller's cluster CA (the controller logs it at start): trust and
    /// pin that CA at this first login without asking.
    #[arg(long, value_name = "SHA256")]
    pub ca_fingerprint: Option<String>,
}

/// `postern psql`.
#[derive(Debug, Args)]
pub struct PsqlArgs {
    /// Target name (a `postgres` target).
    pub target: String,
    /// Database to connect to (default: the database user's own).
    #[arg(long, value_name = "NAME")]
    pub db: Option<String>,
    /// Database user to act as; your roles must permit it (default: the target
    /// credential's user).
    #[arg(long, value_name = "USER")]
    pub db_user: Option<String>,
    /// Local port to listen on (127.0.0.1); a free one if absent.
    #[arg(long, short)]
    pub port: Option<u16>,
    /// Session length, e.g. 30m or 2h (default: the target's).
    #[arg(long, short, value_parser = parse_duration_secs, value_name = "DURATION")]
    pub duration: Option<u64>,
    /// Arguments passed on to psql, e.g. `-- -c 'select 1'`.
    #[arg(last = true, value_name = "PSQL ARGS")]
    pub psql_args: Vec<String>,
}

/// `postern connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Target name.
    pub target: String,
    /// Local port to listen on (127.0.0.1); a free one if absent.
    #[arg(long, short)]
    pub port: Option<u16>,
    /// Session length, e.g. 30m or 2h (default: the target's).
    #[arg(long, short, value_parser = parse_duration_secs, value_name = "DURATION")]
    pub duration: Option<u64>,
    /// Spread the session's connections over this many QUIC connections, each on a thread
    /// of its own, for a worker with as many session lanes (`session_lanes`): concurrent
    /// connections then use several CPUs at both ends (1-16).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16), value_name = "N")]
    pub lanes: u8,
    /// Command to run against the session; `{port}` and `{host}` in its arguments are
    /// replaced by the local port and address. The session ends when it exits.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `postern ssh`.
#[derive(Debug, Args)]
pub struct SshArgs {
    /// Target name.
    pub target: String,
    /// Login on the target (default: the brokered credential's user); must be permitted by
    /// your roles.
    #[arg(long, short)]
    pub login: Option<String>,
    /// Session length, e.g. 30m or 2h (default: the target's).
    #[arg(long, short, value_parser = parse_duration_secs, value_name = "DURATION")]
    pub duration: Option<u64>,
    /// Run `scp` instead of `ssh`; name the target as the host in its arguments
    /// (`postern ssh web --scp -- file.txt web:/tmp/`).
    #[arg(long, conflicts_with = "sftp")]
    pub scp: bool,
    /// Run `sftp` instead of `ssh` (the host argument is added).
    #[arg(long)]
    pub sftp: bool,
    /// Arguments for ssh (options, then the remote command), scp or sftp.
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

/// `postern recordings …`.
#[derive(Debug, Subcommand)]
pub enum RecordingsCmd {
    /// List recordings (needs `recordings:read`).
    List {
        /// Only this session's.
        #[arg(long, value_name = "ID")]
        session: Option<String>,
    },
    /// Replay a recording in this terminal.
    Play {
        /// Recording id (`r_…`).
        id: String,
        /// Playback speed factor.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
    /// Write a recording as an asciicast v2 file (`ID.cast` unless --output is given).
    Export {
        /// Recording id (`r_…`).
        id: String,
        /// File to write; `-` for standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
    },
}

/// `postern targets ...`.
#[derive(Debug, Subcommand)]
pub enum TargetsCmd {
    /// List the targets you may see.
    List,
    /// Show one target.
    Show {
        /// Target name.
        name: String,
    },
    /// Create a target.
    Create(CreateTargetArgs),
    /// Change a target.
    Update(UpdateTargetArgs),
    /// Delete a target (its open sessions are cancelled).
    Delete {
        /// Target name.
        name: String,
    },
}

/// Target protocols, as typed on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TargetKind {
    /// Plain TCP.
    Tcp,
    /// SSH.
    Ssh,
    /// PostgreSQL.
    Postgres,
}

/// `postern targets create`.
#[derive(Debug, Args)]
pub struct CreateTargetArgs {
    /// Unique name.
    pub name: String,
    /// Protocol.
    #[arg(long = "type", short = 't', value_enum)]
    pub kind: TargetKind,
    /// HOST:PORT the worker dials.
    #[arg(long, short)]
    pub address: String,
    #[command(flatten)]
    pub common: TargetSettings,
}

/// `postern targets update`.
#[derive(Debug, Args)]
pub struct UpdateTargetArgs {
    /// Target name.
    pub name: String,
    /// New HOST:PORT.
    #[arg(long, short)]
    pub address: Option<String>,
    #[command(flatten)]
    pub common: TargetSettings,
    /// Allow sessions again.
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    /// Refuse new sessions and cancel open ones.
    #[arg(long)]
    pub disable: bool,
}

/// Settings shared by `targets create` and `targets update`.
#[derive(Debug, Args)]
pub struct TargetSettings {
    /// Label KEY=VALUE (repeatable; on update, replaces all labels).
    #[arg(long = "label", short = 'l', value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub labels: Vec<(String, String)>,
    /// Session length when none is asked for, e.g. 1h.
    #[arg(long, value_parser = parse_duration_secs, value_name = "DURATION")]
    pub default_duration: Option<u64>,
    /// Longest session allowed, e.g. 8h.
    #[arg(long, value_parser = parse_duration_secs, value_name = "DURATION")]
    pub max_duration: Option<u64>,
    /// Connections allowed per session (on update, 0 removes the limit).
    #[arg(long, value_name = "N")]
    pub connection_limit: Option<u32>,
    /// Worker tag KEY=VALUE a worker must carry (repeatable; on update, replaces the filter).
    #[arg(long = "worker-filter", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub worker_filter: Vec<(String, String)>,
}

/// `postern users ...`.
#[derive(Debug, Subcommand)]
pub enum UsersCmd {
    /// List users.
    List,
    /// Show one user.
    Show {
        /// User name.
        name: String,
    },
    /// Create a user (SSO users are created on first login).
    Create {
        /// User name.
        name: String,
        /// Read a password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a user's password (with users:write), or change your own with --current. The
    /// user's other logins (API tokens) end.
    SetPassword {
        /// User name.
        name: String,
        /// Read the password(s) from stdin instead of asking: the current one first with
        /// --current, then the new one, one per line.
        #[arg(long)]
        password_stdin: bool,
        /// Give the current password too: how a user without users:write changes their own.
        #[arg(long)]
        current: bool,
    },
    /// Delete a user (its tokens, memberships, bindings and single sign-on links go with it).
    ///
    /// A user who logs in with single sign-on is created afresh at their next login, without
    /// what an admin gave by hand: `postern users lock` keeps one out.
    Delete {
        /// User name.
        name: String,
    },
    /// Lock a user: refuse logins and new sessions, and cancel open ones.
    Lock {
        /// User name.
        name: String,
    },
    /// Unlock a user.
    Unlock {
        /// User name.
        name: String,
    },
}

/// `postern groups ...`.
#[derive(Debug, Subcommand)]
pub enum GroupsCmd {
    /// List groups and their members.
    List,
    /// Create a group.
    Create {
        /// Group name.
        name: String,
    },
    /// Delete a group.
    Delete {
        /// Group name.
        name: String,
    },
    /// Add a user to a group.
    AddMember {
        /// Group name.
        group: String,
        /// User name.
        user: String,
    },
    /// Remove a user from a group.
    RemoveMember {
        /// Group name.
        group: String,
        /// User name.
        user: String,
    },
}

/// `postern roles ...`.
#[derive(Debug, Subcommand)]
pub enum RolesCmd {
    /// List roles.
    List,
    /// Show a role's rules and bindings.
    Show {
        /// Role name.
        name: String,
    },
    /// Create an empty role.
    Create {
        /// Role name.
        name: String,
    },
    /// Delete a role.
    Delete {
        /// Role name.
        name: String,
    },
    /// Add an allow rule: ACTIONS is comma-separated (connect,read | users:* | *).
    Allow(RuleArgs),
    /// Add a deny rule (deny wins over allow).
    Deny(RuleArgs),
    /// Remove a role's rule by its number (as `roles show` numbers them).
    RemoveRule {
        /// Role name.
        name: String,
        /// The rule's number (1 is the first).
        number: i64,
    },
    /// Bind a role to a user or a group.
    Bind(BindArgs),
    /// Remove a role's binding to a user or a group.
    Unbind(BindArgs),
}

/// `postern roles allow|deny`.
#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Role name.
    pub role: String,
    /// Comma-separated actions: connect, read, users:*, targets:write, sessions:cancel, *, ...
    #[arg(value_parser = parse_actions)]
    pub actions: Actions,
    /// Target name glob the rule applies to (default: every target).
    #[arg(long, value_name = "GLOB")]
    pub targets: Option<String>,
    /// Label KEY=VALUE a target must carry (repeatable; all must match).
    #[arg(long = "label", short = 'l', value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub labels: Vec<(String, String)>,
    /// For connect: a login on the target (SSH user, database user) the rule covers
    /// (repeatable; `*` for any).
    #[arg(long = "login", value_name = "LOGIN")]
    pub logins: Vec<String>,
}

/// A parsed, non-empty list of actions.
#[derive(Debug, Clone)]
pub struct Actions(pub Vec<String>);

/// `postern roles bind|unbind`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("principal").required(true).args(["user", "group"])))]
pub struct BindArgs {
    /// Role name.
    pub role: String,
    /// A user.
    #[arg(long)]
    pub user: Option<String>,
    /// A group.
    #[arg(long)]
    pub group: Option<String>,
}

/// `postern workers ...`.
#[derive(Debug, Subcommand)]
pub enum WorkersCmd {
    /// Create a worker and print its one-time activation token.
    Create {
        /// Worker name.
        name: String,
        /// Tag KEY=VALUE matched against targets' worker filters (repeatable).
        #[arg(long = "tag", value_parser = parse_kv, value_name = "KEY=VALUE")]
        tags: Vec<(String, String)>,
    },
    /// List workers.
    List,
    /// Delete (revoke) a worker.
    Delete {
        /// Worker name.
        name: String,
    },
}

/// `postern sessions ...`.
#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// List sessions (yours, or everyone's with sessions:read).
    List {
        /// Only pending or active sessions.
        #[arg(long)]
        active: bool,
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
        /// Only this target's.
        #[arg(long)]
        target: Option<String>,
    },
    /// Show one session.
    Show {
        /// Session id.
        id: String,
    },
    /// Cancel a session; its open connections are closed at once.
    Cancel {
        /// Session id.
        id: String,
    },
}

/// `postern policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Would USER be allowed ACTION on TARGET, and by which rule? Exits 1 when denied.
    Check {
        /// User name.
        user: String,
        /// Target name.
        target: String,
        /// Action to check.
        #[arg(long, default_value = "connect")]
        action: String,
        /// For connect: the login to check (default: the target's credential's user).
        #[arg(long)]
        login: Option<String>,
    },
}

/// `postern audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// List audit events, oldest first.
    List(AuditFilter),
    /// Show the newest events; with -f, keep following new ones as they are stored.
    Tail {
        /// Keep following (the controller pushes new events; Ctrl-C stops).
        #[arg(long, short)]
        follow: bool,
        /// Filters.
        #[command(flatten)]
        filter: AuditFilter,
    },
    /// Walk the hash chain and name the first event that breaks it; on success, print the
    /// head's position and hash to keep outside the database (an anchor).
    Verify {
        /// A position and hash printed by an earlier verify (SEQ:HASH): the chain must still
        /// hold that event, which a chain recomputed from some earlier event on does not.
        #[arg(long, value_name = "SEQ:HASH")]
        anchor: Option<postern_controller::api::types::AuditAnchor>,
    },
    /// Write matching events as JSON lines (for a SIEM), oldest first.
    Export {
        /// Output format.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
        format: String,
        /// Write to this file instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Filters.
        #[command(flatten)]
        filter: AuditFilter,
    },
}

/// Filters shared by the `audit` commands.
#[derive(Debug, Clone, Args)]
pub struct AuditFilter {
    /// Only events by this actor (user name, worker:NAME, system).
    #[arg(long)]
    pub user: Option<String>,
    /// Only events about this target (on it, or inside its sessions).
    #[arg(long)]
    pub target: Option<String>,
    /// Only events of this session.
    #[arg(long)]
    pub session: Option<String>,
    /// Only this action, or a prefix ending in `.` (session.).
    #[arg(long)]
    pub action: Option<String>,
    /// Only events whose resource contains this text (target:pg-prod).
    #[arg(long)]
    pub resource: Option<String>,
    /// Only events in the last DURATION (1h, 2d) or since an RFC 3339 time.
    #[arg(long, value_parser = parse_since, value_name = "WHEN")]
    pub since: Option<i64>,
    /// Only events up to DURATION ago or an RFC 3339 time.
    #[arg(long, value_parser = parse_since, value_name = "WHEN")]
    pub until: Option<i64>,
    /// At most N events, the newest N (1 to 100000; default: 100 for list, 20 for tail,
    /// every event for export).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub limit: Option<i64>,
}

/// `postern dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the database, keys and worker state live (default: the user data dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the HTTP API; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:9200", value_name = "ADDR")]
    pub api_addr: SocketAddr,
    /// Keep the controller's state in this PostgreSQL database
    /// (postgres://USER@HOST:PORT/DB) instead of SQLite in the data directory. Its stored
    /// keys are sealed with the data directory's key: use the database with that directory
    /// only.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// The dev worker's session lanes (`session_lanes`): endpoints on one port, each on a
    /// thread of its own, for sessions spread over several connections
    /// (`postern connect --lanes N`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64), value_name = "N")]
    pub session_lanes: u32,
}

/// Parses `KEY=VALUE`.
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

/// Collects `KEY=VALUE` pairs into a map.
/// A key given twice with different values is refused (`--label env=a --label env=b`
/// would otherwise keep one of them silently).
pub fn kv_map(pairs: &[(String, String)]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        if let Some(old) = map.insert(k.clone(), v.clone()) {
            if &old != v {
                anyhow::bail!("{k} is given twice ({k}={old} and {k}={v}): give it once");
            }
        }
    }
    Ok(map)
}

/// Parses a duration such as `90s`, `15m`, `8h`, `1h30m` or a bare number of seconds.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs);
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 30m or 8h: {e}"))?;
    if d.as_secs() == 0 {
        return Err(format!("'{s}' is shorter than a second"));
    }
    Ok(d.as_secs())
}

/// Parses `--since`: a duration back from now, or an RFC 3339 time; gives Unix seconds.
pub fn parse_since(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t.unix_timestamp());
    }
    let secs = parse_duration_secs(s)
        .map_err(|_| format!("'{s}' is neither a duration (1h, 2d) nor an RFC 3339 time"))?;
    Ok(postern_proto::unix_now().saturating_sub(i64::try_from(secs).unwrap_or(i64::MAX)))
}

/// Parses a comma-separated list of actions.
pub fn parse_actions(s: &str) -> Result<Actions, String> {
    let actions: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    if actions.is_empty() {
        return Err("expected actions such as connect,read or users:* or *".into());
    }
    Ok(Actions(actions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn a_key_given_twice_with_two_values_is_refused() {
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let map = kv_map(&[pair("env", "dev"), pair("team", "a"), pair("env", "dev")])
            .expect("the same value twice is harmless");
        assert_eq!(map.len(), 2);
        let err = kv_map(&[pair("env", "a"), pair("env", "b")]).expect_err("two values");
        assert_eq!(
            err.to_string(),
            "env is given twice (env=a and env=b): give it once"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn small_values_parse() {
        assert_eq!(parse_kv("env=prod"), Ok(("env".into(), "prod".into())));
        assert!(parse_kv("env").is_err());
        assert!(parse_kv("=x").is_err());
        assert_eq!(parse_duration_secs("8h"), Ok(8 * 3600));
        assert_eq!(parse_duration_secs("1h30m"), Ok(5400));
        assert_eq!(parse_duration_secs("45"), Ok(45));
        assert!(parse_duration_secs("soon").is_err());
        assert_eq!(
            parse_actions("connect, read,").map(|a| a.0),
            Ok(vec!["connect".to_owned(), "read".to_owned()])
        );
        assert!(parse_actions(",").is_err());
    }

    #[test]
    fn connect_takes_a_trailing_command() {
        let cli = Cli::try_parse_from([
            "postern", "connect", "pg", "--port", "7000", "--", "psql", "-p", "{port}",
        ])
        .expect("parses");
        let Command::Connect(c) = cli.command else {
            panic!("not connect")
        };
        assert_eq!(c.port, Some(7000));
        assert_eq!(c.command, ["psql", "-p", "{port}"]);
    }
}
