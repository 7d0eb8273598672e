//! Reading a user name or password from the terminal or stdin, without extra crates: echo is
//! turned off with `stty` for the password and always turned back on.

use std::io::{BufRead, IsTerminal, Write};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Whether stdin is a terminal (a person can be asked).
pub fn stdin_is_tty() -> bool {
    std::io::stdin().is_terminal()
}

/// Reads one line from stdin, without its line ending.
pub async fn read_line() -> Result<String> {
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await
    .context("reading stdin")?
    .context("reading stdin")?;
    Ok(trim_newline(line))
}

/// Asks for a line on the terminal.
pub async fn ask(prompt: &str) -> Result<String> {
    crate::errout!("{prompt}");
    let _ = std::io::stderr().flush();
    interruptible(read_line()).await
}

/// Asks for a password on the terminal without echoing it.
pub async fn ask_password(prompt: &str) -> Result<String> {
    crate::errout!("{prompt}");
    let _ = std::io::stderr().flush();
    let echo_off = EchoOff::new();
    if !echo_off.0 {
        crate::errout!("(stty failed: the password will be visible) ");
    }
    let result = interruptible(read_line()).await;
    drop(echo_off);
    crate::errln!();
    result
}

/// Runs `read` unless Ctrl-C comes first (then the prompt is abandoned, not the terminal).
async fn interruptible(read: impl std::future::Future<Output = Result<String>>) -> Result<String> {
    tokio::select! {
        r = read => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

fn trim_newline(mut s: String) -> String {
    while s.ends_with('\n') || s.ends_with('\r') {
        s.pop();
    }
    s
}

/// Terminal echo switched off for as long as this lives.
struct EchoOff(bool);

impl EchoOff {
    fn new() -> EchoOff {
        EchoOff(stty("-echo"))
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if self.0 {
            stty("echo");
        }
    }
}

fn stty(arg: &str) -> bool {
    Command::new("stty")
        .arg(arg)
        .stdin(Stdio::inherit())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
