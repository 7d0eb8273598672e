//! The commands, one module per noun, and what they share: the resolved controller address,
//! token and output mode ([`Ctx`]).

mod audit;
mod auth;
pub mod completions;
mod connect;
mod credentials;
mod groups;
mod oidc_login;
mod policy;
mod psql;
mod recordings;
mod roles;
mod sessions;
mod ssh;
mod targets;
mod users;
mod workers;

pub(crate) use auth::password_login;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::args::{Cli, Command, GlobalArgs};
use crate::client::ApiClient;
use crate::profile::{config_dir, normalize_addr, Profile, DEFAULT_ADDR};

/// What every command needs: where the controller is, which token to send, how to print.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Print JSON instead of tables.
    pub json: bool,
    /// Controller URL, normalised.
    pub addr: String,
    /// Token to send, if any.
    pub token: Option<String>,
    /// Whether `token` came from the saved profile (and not from a flag or the environment).
    pub token_from_profile: bool,
    /// Where the profile lives.
    pub config_dir: PathBuf,
    /// The saved profile as loaded.
    pub profile: Profile,
    /// The CA (PEM) to trust for `addr`: `--ca-file`, else the one pinned in the profile for
    /// this controller; `None` means the system's roots.
    pub ca_pem: Option<String>,
}

impl Ctx {
    /// Resolves flags, environment and profile: flag/env first, then the profile.
    pub fn resolve(global: &GlobalArgs) -> Result<Ctx> {
        let config_dir = config_dir()?;
        let profile = Profile::load(&config_dir)?;
        let profile_addr = profile.addr.as_deref().map(normalize_addr);
        let addr = match (&global.addr, &profile_addr) {
            (Some(a), _) => normalize_addr(a),
            (None, Some(a)) => a.clone(),
            (None, None) => DEFAULT_ADDR.to_owned(),
        };
        // The profile's token belongs to the profile's controller: never send it elsewhere.
        let (token, token_from_profile) = match &global.token {
            Some(t) if !t.is_empty() => (Some(t.clone()), false),
            _ if profile_addr.as_deref() == Some(addr.as_str()) => (profile.token.clone(), true),
            _ => (None, false),
        };
        // Like the token, a pinned CA belongs to the profile's controller only.
        let ca_pem = match &global.ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the CA file {}", path.display()))?,
            ),
            None if profile_addr.as_deref() == Some(addr.as_str()) => profile.ca_pem.clone(),
            None => None,
        };
        Ok(Ctx {
            json: global.json,
            addr,
            token,
            token_from_profile,
            config_dir,
            profile,
            ca_pem,
        })
    }

    /// An API client with the resolved token (calls fail with "not logged in" without one).
    pub fn api(&self) -> Result<ApiClient> {
        Ok(ApiClient::with_ca(
            &self.addr,
            self.token.clone(),
            self.ca_pem.as_deref(),
        )?)
    }

    /// An API client without a token (login calls).
    pub fn anon_api(&self) -> Result<ApiClient> {
        Ok(ApiClient::with_ca(
            &self.addr,
            None,
            self.ca_pem.as_deref(),
        )?)
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let command = match cli.command {
        Command::Dev(args) => return crate::dev::run(args, cli.global.json).await,
        Command::Completions { shell } => return completions::completions(shell),
        Command::Man { dir } => return completions::man(dir.as_deref()),
        other => other,
    };
    let ctx = Ctx::resolve(&cli.global)?;
    match command {
        Command::Login(args) => auth::login(&ctx, args).await,
        Command::Logout => auth::logout(&ctx).await,
        Command::Whoami => auth::whoami(&ctx).await,
        Command::Connect(args) => connect::run(&ctx, args).await,
        Command::Psql(args) => psql::run(&ctx, args).await,
        Command::Ssh(args) => ssh::run(&ctx, args).await,
        Command::Recordings(cmd) => recordings::run(&ctx, cmd).await,
        Command::Targets(cmd) => targets::run(&ctx, cmd).await,
        Command::Credentials(cmd) => credentials::run(&ctx, cmd).await,
        Command::Users(cmd) => users::run(&ctx, cmd).await,
        Command::Groups(cmd) => groups::run(&ctx, cmd).await,
        Command::Roles(cmd) => roles::run(&ctx, cmd).await,
        Command::Workers(cmd) => workers::run(&ctx, cmd).await,
        Command::Sessions(cmd) => sessions::run(&ctx, cmd).await,
        Command::Policy(cmd) => policy::run(&ctx, cmd).await,
        Command::Audit(cmd) => audit::run(&ctx, cmd).await,
        Command::Dev(args) => crate::dev::run(args, cli.global.json).await,
        Command::Completions { shell } => completions::completions(shell),
        Command::Man { dir } => completions::man(dir.as_deref()),
    }
}

/// The usual ending of a command.
fn ok() -> Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}

/// After a filtered list came back empty: why, if a filter names a thing (`users`,
/// `targets`, `sessions`) that does not exist — the controller's "no user named …, did you
/// mean …" — so that a typo is not read as "nothing happened". Names the caller may not look
/// up are left alone.
async fn unknown_names(api: &ApiClient, named: &[(&str, Option<&str>)]) {
    for &(kind, name) in named {
        let Some(name) = name.filter(|n| !n.trim().is_empty()) else {
            continue;
        };
        if let Err(e) = api.get::<serde_json::Value>(&["v1", kind, name], &[]).await {
            if e.is_not_found() {
                crate::errln!("note: {e}");
            }
        }
    }
}
