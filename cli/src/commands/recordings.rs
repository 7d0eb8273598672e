//! `postern recordings list | play ID [--speed N] | export ID [-o FILE]`: the asciicast v2
//! recordings of SSH shells, kept by the controller.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use postern_controller::api::types::Recording;

use super::{ok, Ctx};
use crate::args::RecordingsCmd;
use crate::output::{bytes, print_json, relative, Table};

/// Pauses longer than this are shortened in playback (as `asciinema play -i`).
const MAX_PAUSE: f64 = 2.0;

/// Runs a `recordings` subcommand.
pub async fn run(ctx: &Ctx, cmd: RecordingsCmd) -> Result<ExitCode> {
    let api = ctx.api()?;
    match cmd {
        RecordingsCmd::List { session } => {
            let query: Vec<(&str, String)> = session
                .clone()
                .map(|s| vec![("session", s)])
                .unwrap_or_default();
            let list: Vec<Recording> = api.get(&["v1", "recordings"], &query).await?;
            if list.is_empty() {
                super::unknown_names(&api, &[("sessions", session.as_deref())]).await;
            }
            if ctx.json {
                print_json(&list)?;
                return ok();
            }
            let mut t = Table::new(&[
                "ID", "SESSION", "USER", "TARGET", "STARTED", "ENDED", "SIZE",
            ]);
            for r in list {
                t.row(vec![
                    r.id,
                    r.session_id,
                    r.user,
                    r.target,
                    relative(r.started_at),
                    match (r.ended_at, r.end_reason) {
                        (Some(at), Some(why)) => format!("{} ({why})", relative(at)),
                        (Some(at), None) => relative(at),
                        (None, _) => "recording".into(),
                    },
                    bytes(r.size),
                ]);
            }
            t.print("No recordings.")?;
            ok()
        }
        RecordingsCmd::Export { id, output } => {
            let cast = api.get_text(&["v1", "recordings", &id]).await?;
            match output.as_deref() {
                Some(p) if p.as_os_str() == "-" => {
                    crate::output::write_stdout_bytes(cast.as_bytes())?;
                }
                _ => {
                    let path = output.unwrap_or_else(|| format!("{id}.cast").into());
                    // Owner-only, as a screen may show anything typed or printed.
                    let mut file = crate::output::PrivateFile::create(&path)?;
                    std::io::Write::write_all(&mut file, cast.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                    file.commit()?;
                    if !ctx.json {
                        crate::errln!("Wrote {} ({}).", path.display(), bytes(cast.len() as i64));
                    }
                }
            }
            ok()
        }
        RecordingsCmd::Play { id, speed } => {
            if !(speed.is_finite() && speed > 0.0) {
                bail!("--speed must be a positive number");
            }
            let cast = api.get_text(&["v1", "recordings", &id]).await?;
            play(&cast, speed).await
        }
    }
}

/// Writes the output events to the terminal at their pace (divided by `speed`).
async fn play(cast: &str, speed: f64) -> Result<ExitCode> {
    let mut lines = cast.lines();
    let header: serde_json::Value = lines
        .next()
        .and_then(|h| serde_json::from_str(h).ok())
        .context("the recording has no asciicast header")?;
    if header["version"] != 2 {
        bail!("not an asciicast v2 recording");
    }
    let mut last = 0.0f64;
    for line in lines {
        let Ok((t, kind, data)) = serde_json::from_str::<(f64, String, String)>(line) else {
            continue;
        };
        if kind != "o" {
            continue;
        }
        let pause = ((t - last) / speed).clamp(0.0, MAX_PAUSE);
        last = t;
        if pause > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        }
        crate::output::write_stdout_bytes(data.as_bytes())?;
    }
    ok()
}
