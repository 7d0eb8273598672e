//! `postern ssh TARGET [--login USER] [--scp | --sftp] [-- ARGS...]`: authorizes an `ssh`
//! session, serves it on a local port and runs the system `ssh` (or `scp`, `sftp`) against
//! it. The worker's SSH host key comes pinned in the authorization (a one-off known_hosts
//! file: no trust-on-first-use prompt), and the SSH hop authenticates with the session's own
//! ephemeral key, written to a private temporary directory that is removed afterwards. The
//! engineer never holds a key for the target: the worker logs in with the brokered one.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;

use postern_controller::api::types::{Authorization, AuthorizeRequest, SshAccess, TargetType};

use super::connect::{supervise, Signals};
use super::Ctx;
use crate::args::SshArgs;
use crate::output::relative;
use crate::session::{new_client_key, open_session};

/// Runs `postern ssh`.
pub async fn run(ctx: &Ctx, args: SshArgs) -> Result<ExitCode> {
    if args.scp {
        check_scp_operands(&args.target, &args.args)?;
    }
    let mut signals = Signals::new()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("cannot listen on 127.0.0.1")?;
    let port = listener
        .local_addr()
        .context("reading the local address")?
        .port();
    let key = new_client_key()?;
    let setup = async {
        let auth: Authorization = ctx
            .api()?
            .post(
                &["v1", "targets", &args.target, "authorize"],
                &AuthorizeRequest {
                    client_spki: key.spki_b64().to_owned(),
                    duration_secs: args.duration,
                    login: args.login.clone(),
                    target_type: Some(TargetType::Ssh),
                },
            )
            .await?;
        let Some(ssh) = auth.ssh.clone() else {
            bail!(
                "target '{}' is a {} target, not ssh: use `postern connect {}`",
                auth.target,
                auth.protocol.as_str(),
                auth.target
            );
        };
        let session = open_session(&auth, &key).await?;
        anyhow::Ok((auth, ssh, session))
    };
    let (auth, ssh, session) = tokio::select! {
        r = setup => r?,
        _ = signals.int.recv() => return Ok(ExitCode::from(130)),
        _ = signals.term.recv() => return Ok(ExitCode::from(143)),
    };
    let _accept = session.serve(listener);
    let files = HopFiles::write(&key.private_key_pem(), &ssh, &auth.target)?;
    crate::errln!(
        "Session {} to {} as {} via worker {}, expires {}.",
        session.session_id(),
        auth.target,
        ssh.login,
        auth.worker.name,
        relative(session.expires_at()),
    );
    let (program, argv) = command_line(&args, &ssh, port, &files);
    let code = supervise(session, program, &argv, &mut signals).await;
    drop(files);
    code
}

/// scp's options that take a value (`scp -P 22`, or `-P22`).
const SCP_VALUE_OPTIONS: &str = "DFJSPXcilo";

/// Every session reaches one host, its target, which scp operands must name as `TARGET:path`
/// (every host name is sent to the session): a copy naming another host would land on the
/// target without a word, and one naming none would copy locally and report success.
fn check_scp_operands(target: &str, args: &[String]) -> Result<()> {
    let mut remote = false;
    let mut operands = args.iter();
    while let Some(arg) = operands.next() {
        if let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) {
            // `-P 22`: the value is the next argument, unless it is attached (`-P22`).
            if let Some(at) = flags.find(|c| SCP_VALUE_OPTIONS.contains(c)) {
                if at + 1 == flags.len() {
                    operands.next();
                }
            }
            continue;
        }
        let Some(host) = scp_host(arg) else {
            continue;
        };
        if host != target {
            bail!(
                "'{arg}' names the host '{host}', but this session reaches only '{target}': \
                 write {target}:PATH"
            );
        }
        remote = true;
    }
    if !remote {
        bail!(
            "scp needs a path on the target: postern ssh {target} --scp -- FILE {target}:PATH \
             (or -- {target}:PATH .)"
        );
    }
    Ok(())
}

/// The host an scp operand names (`[user@]host:path`, `scp://[user@]host[:port]/path`), as
/// scp reads it: a colon before any slash makes it remote.
fn scp_host(operand: &str) -> Option<&str> {
    let host = if let Some(rest) = operand.strip_prefix("scp://") {
        let authority = rest.split('/').next().unwrap_or(rest);
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    } else {
        let colon = operand.find(':')?;
        if colon == 0 || operand[..colon].contains('/') {
            return None;
        }
        &operand[..colon]
    };
    Some(host.rsplit_once('@').map_or(host, |(_, h)| h))
}

/// `ssh`, `scp` or `sftp` with the options that pin the worker and use the session key,
/// then the user's arguments (and the host, where the program needs it).
fn command_line(
    args: &SshArgs,
    ssh: &SshAccess,
    port: u16,
    files: &HopFiles,
) -> (&'static str, Vec<String>) {
    let program = if args.scp {
        "scp"
    } else if args.sftp {
        "sftp"
    } else {
        "ssh"
    };
    let options = [
        "HostName=127.0.0.1".to_owned(),
        format!("Port={port}"),
        format!("User={}", ssh.login),
        format!("HostKeyAlias={}", files.alias),
        format!("UserKnownHostsFile={}", files.known_hosts.display()),
        "GlobalKnownHostsFile=/dev/null".to_owned(),
        "StrictHostKeyChecking=yes".to_owned(),
        "UpdateHostKeys=no".to_owned(),
        format!("IdentityFile={}", files.key.display()),
        "IdentitiesOnly=yes".to_owned(),
        "PubkeyAuthentication=yes".to_owned(),
        "PasswordAuthentication=no".to_owned(),
        "KbdInteractiveAuthentication=no".to_owned(),
        "ProxyCommand=none".to_owned(),
        "ProxyJump=none".to_owned(),
        "ControlMaster=no".to_owned(),
        "ControlPath=none".to_owned(),
    ];
    let mut argv: Vec<String> = options
        .iter()
        .flat_map(|o| ["-o".to_owned(), o.clone()])
        .collect();
    match program {
        // ssh takes options after the destination too, then the remote command.
        "ssh" => {
            argv.push(args.target.clone());
            argv.extend(args.args.iter().cloned());
        }
        // scp names the host in its own arguments (`TARGET:path`).
        "scp" => argv.extend(args.args.iter().cloned()),
        // sftp wants the destination last.
        _ => {
            argv.extend(args.args.iter().cloned());
            argv.push(args.target.clone());
        }
    }
    (program, argv)
}

/// The session key and the one-off known_hosts file, in a private temporary directory that
/// is removed when this is dropped.
struct HopFiles {
    dir: PathBuf,
    key: PathBuf,
    known_hosts: PathBuf,
    alias: String,
}

impl HopFiles {
    fn write(key_pem: &str, ssh: &SshAccess, target: &str) -> Result<HopFiles> {
        let dir = std::env::temp_dir().join(format!(
            "postern-ssh-{}",
            postern_proto::ids::random_base32(12)
        ));
        create_private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let files = HopFiles {
            key: dir.join("session_key"),
            known_hosts: dir.join("known_hosts"),
            alias: format!("postern-{target}"),
            dir,
        };
        write_private(&files.key, key_pem.as_bytes())?;
        let line = format!("{} {}\n", files.alias, ssh.host_key.trim());
        write_private(&files.known_hosts, line.as_bytes())?;
        Ok(files)
    }
}

impl Drop for HopFiles {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            crate::errln!(
                "warning: cannot remove the session's temporary files in {}: {e}",
                self.dir.display()
            );
        }
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod scp_tests {
    use super::*;

    fn check(args: &[&str]) -> Result<()> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        check_scp_operands("web", &args)
    }

    #[test]
    fn scp_operands_must_name_the_target() {
        for ok in [
            &["file.txt", "web:/tmp/"][..],
            &["web:/etc/hostname", "."],
            &["-P", "22", "-r", "dir", "deploy@web:dir"],
            &["-o", "Compression=yes", "scp://deploy@web:22/tmp/x", "./x"],
            &["-P22", "./a:b", "web:"],
        ] {
            assert!(check(ok).is_ok(), "{ok:?}: {:?}", check(ok));
        }
        let err = check(&["big.bin", "/tmp/x.bin"]).expect_err("a local copy");
        assert!(
            err.to_string().contains("scp needs a path on the target"),
            "{err}"
        );
        let err = check(&["big.bin", "otherhost:/tmp/x"]).expect_err("another host");
        assert!(
            err.to_string().contains("names the host 'otherhost'"),
            "{err}"
        );
        // An option's value is not an operand.
        assert!(check(&["-i", "web:key", "f"]).is_err());
        assert!(check(&["-o", "web:x"]).is_err());
    }
}
