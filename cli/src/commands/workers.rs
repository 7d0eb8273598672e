//! `postern workers ...`.

use std::process::ExitCode;

use anyhow::Result;

use postern_controller::api::types::{CreateWorker, CreatedWorker, Worker};

use super::targets::yes_no;
use super::{ok, Ctx};
use crate::args::{kv_map, WorkersCmd};
use crate::output::{kv_list, opt, print_json, relative, Table};

/// Runs a `workers` subcommand.
pub async fn run(ctx: &Ctx, cmd: WorkersCmd) -> Result<ExitCode> {
    let api = ctx.api()?;
    match cmd {
        WorkersCmd::Create { name, tags } => {
            let created: CreatedWorker = api
                .post(
                    &["v1", "workers"],
                    &CreateWorker {
                        name,
                        tags: kv_map(&tags)?,
                    },
                )
                .await?;
            if ctx.json {
                // Asked for explicitly: the token is the point of this command.
                print_json(&created)?;
                return ok();
            }
            let w = &created.worker;
            let token = &created.activation_token;
            crate::outln!("Created worker {} (tags: {}).", w.name, kv_list(&w.tags));
            crate::outln!();
            crate::outln!("One-time activation token (shown once, valid 24 h):");
            crate::outln!();
            crate::outln!("    {token}");
            crate::outln!();
            crate::outln!("Start the worker with it on a host that can reach your targets:");
            crate::outln!();
            crate::outln!("    POSTERN_CONTROLLER_URL={} \\", ctx.addr);
            if let Some(fp) = ctx
                .ca_pem
                .as_deref()
                .and_then(|pem| crate::trust::pem_fingerprint(pem).ok())
            {
                crate::outln!("    POSTERN_CONTROLLER_CA_FINGERPRINT={fp} \\");
            }
            crate::outln!("    POSTERN_ACTIVATION_TOKEN={token} \\");
            crate::outln!("    POSTERN_DATA_DIR=/var/lib/postern-worker \\");
            crate::outln!("    postern-worker");
            crate::outln!();
            crate::outln!(
                "(or put controller_url, activation_token and data_dir in its TOML config). \
                 It registers, then `postern workers list` shows it connected."
            );
        }
        WorkersCmd::List => {
            let workers: Vec<Worker> = api.get(&["v1", "workers"], &[]).await?;
            if ctx.json {
                print_json(&workers)?;
                return ok();
            }
            let mut t = Table::new(&[
                "NAME",
                "STATUS",
                "MODE",
                "CONNECTED",
                "ADDRESS",
                "TAGS",
                "LAST CONTACT",
                "SESSIONS",
            ]);
            for w in workers {
                let addr = shown_address(&w);
                t.row(vec![
                    w.name,
                    w.status,
                    w.mode,
                    yes_no(w.connected),
                    opt(addr),
                    kv_list(&w.tags),
                    opt(w.last_seen.map(relative)),
                    opt(w.active_sessions),
                ]);
            }
            t.print("No workers. Create one with `postern workers create NAME`.")?;
        }
        WorkersCmd::Delete { name } => {
            // What it was decides what deleting it did (a worker that never registered had
            // no certificate to stop trusting).
            let before: Option<Worker> = api
                .get::<Vec<Worker>>(&["v1", "workers"], &[])
                .await
                .ok()
                .and_then(|all| all.into_iter().find(|w| w.name == name));
            api.delete(&["v1", "workers", &name]).await?;
            if !ctx.json {
                match before {
                    Some(w) if w.status == "pending" => crate::outln!(
                        "Deleted worker {name}; its activation token can no longer be used."
                    ),
                    _ => crate::outln!(
                        "Deleted worker {name}: its sessions have ended and its certificate is \
                         no longer trusted."
                    ),
                }
            }
        }
    }
    ok()
}

/// The ADDRESS column. An outbound-only worker's address is the relay of the controller it is
/// connected to; once it is gone, the last one says nothing (that controller may not even run
/// a relay now).
fn shown_address(w: &Worker) -> Option<String> {
    let addr = w.session_addr.as_deref().filter(|a| !a.is_empty())?;
    match w.mode.as_str() {
        "outbound-only" if !w.connected => None,
        "outbound-only" => Some(format!("{addr} (relay)")),
        _ => Some(addr.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disconnected_outbound_worker_shows_no_relay_address() {
        let mut w = Worker {
            name: "w1".into(),
            status: "registered".into(),
            mode: "outbound-only".into(),
            connected: true,
            session_addr: Some("127.0.0.1:9203".into()),
            tags: Default::default(),
            last_seen: None,
            created_at: 0,
            active_sessions: None,
            active_connections: None,
        };
        assert_eq!(shown_address(&w).as_deref(), Some("127.0.0.1:9203 (relay)"));
        w.connected = false;
        assert_eq!(shown_address(&w), None);
        w.mode = "direct".into();
        assert_eq!(shown_address(&w).as_deref(), Some("127.0.0.1:9203"));
        w.session_addr = Some(String::new());
        assert_eq!(shown_address(&w), None);
    }
}
