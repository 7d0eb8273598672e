//! `postern completions SHELL` and `postern man`: generated from the clap definitions in
//! [`crate::args`], so they never drift from the real command line.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;

use crate::args::Cli;
use crate::output::write_stdout_bytes;

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    let mut cmd = Cli::command();
    // Generated in memory: clap_complete panics on a write error (`postern completions | head`).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "postern", &mut script);
    write_stdout_bytes(&script).context("writing the completion script")?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the manual page (roff) on stdout, or with `dir` writes `postern.1` and one page per
/// command and subcommand there.
pub fn man(dir: Option<&Path>) -> Result<ExitCode> {
    let cmd = Cli::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the manual pages to {}", dir.display()))?;
            crate::outln!("Manual pages written to {}", dir.display());
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .context("rendering the manual page")?;
            write_stdout_bytes(&page).context("writing the manual page")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_commands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "postern", &mut buf);
            let text = String::from_utf8(buf).expect("utf-8");
            assert!(text.contains("postern"), "{shell}");
            assert!(text.contains("login"), "{shell}: no login command");
            assert!(text.contains("targets"), "{shell}: no targets command");
        }
    }

    #[test]
    fn man_page_is_roff_with_the_commands() {
        let mut buf = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut buf)
            .expect("renders");
        let text = String::from_utf8(buf).expect("utf-8");
        assert!(text.starts_with(".ie") || text.starts_with(".TH"), "{text}");
        assert!(text.contains(".TH postern 1"), "{text}");
        assert!(text.contains("login"));
    }
}
