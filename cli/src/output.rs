//! Human and machine output: aligned tables, key/value blocks, JSON, and time formatting.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{Context, Result};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

/// Stdout was closed by its reader (`postern audit list | head`): the command stops there,
/// quietly and successfully, as the reader asked for no more.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub struct StdoutClosed;

/// What writing to stdout failed with: [`StdoutClosed`] for a reader that went away,
/// anything else (a full disk behind a redirect) as an error that says it was stdout.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// Writes `args` to stdout; unlike `print!`, a closed or failing stdout is an error to
/// return, not a panic.
pub fn write_stdout(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

/// Writes `bytes` to stdout, as [`write_stdout`] does text.
pub fn write_stdout_bytes(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

/// `println!` that returns a closed or failing stdout as an error ([`write_stdout`]) from the
/// enclosing function, which must return `anyhow::Result`.
#[macro_export]
macro_rules! outln {
    () => { $crate::output::write_stdout(format_args!("\n"))? };
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))? };
}

/// `print!` that returns a closed or failing stdout as an error (see [`outln!`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!($($arg)*))? };
}

/// Writes `args` to stderr; unlike `eprint!`, a closed or failing stderr loses the message
/// (there is nowhere left to report it) instead of panicking.
pub fn write_stderr(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `eprintln!` that never panics ([`write_stderr`]).
#[macro_export]
macro_rules! errln {
    () => { $crate::output::write_stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::write_stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprint!` that never panics ([`write_stderr`]).
#[macro_export]
macro_rules! errout {
    ($($arg:tt)*) => { $crate::output::write_stderr(format_args!($($arg)*)) };
}

/// A file written whole or not at all, readable by its owner only (exports hold statements,
/// commands and screens): the bytes go to `NAME.partial` beside it (made anew, never through
/// a link), which [`Self::commit`] renames over `path`; dropped uncommitted or failing, the
/// partial file goes and `path` is untouched. A device or pipe (`-o /dev/stdout`) is written
/// as it is.
pub struct PrivateFile {
    path: std::path::PathBuf,
    partial: Option<std::path::PathBuf>,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl PrivateFile {
    /// Starts writing `path`.
    pub fn create(path: &std::path::Path) -> Result<Self> {
        if path.metadata().is_ok_and(|m| !m.is_file() && !m.is_dir()) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            return Ok(Self {
                path: path.to_owned(),
                partial: None,
                file: Some(std::io::BufWriter::new(file)),
            });
        }
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let partial = path.with_file_name(name);
        // A leftover (or something planted there) is not written through.
        let _ = std::fs::remove_file(&partial);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
            .open(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        Ok(Self {
            path: path.to_owned(),
            partial: Some(partial),
            file: Some(std::io::BufWriter::new(file)),
        })
    }

    /// Puts the written file in place.
    pub fn commit(mut self) -> Result<()> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let flushed = file.into_inner().map_err(|e| e.into_error());
        let placed = match &self.partial {
            Some(partial) => flushed
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::rename(partial, &self.path)),
            None => flushed.map(drop),
        };
        if placed.is_err() {
            if let Some(partial) = &self.partial {
                let _ = std::fs::remove_file(partial);
            }
        }
        placed.with_context(|| format!("writing {}", self.path.display()))
    }
}

impl std::io::Write for PrivateFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().map_or(Ok(0), |f| f.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

impl Drop for PrivateFile {
    fn drop(&mut self) {
        if let (Some(_), Some(partial)) = (self.file.take(), &self.partial) {
            let _ = std::fs::remove_file(partial);
        }
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("encoding JSON output")?;
    outln!("{text}");
    Ok(())
}

/// A table with a header row; columns are padded to their widest cell.
#[derive(Debug)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Adds a row (as many cells as the header).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the table; the last column is not padded.
    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0usize; cols];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Renders the rows without the header (more rows of a table already printed).
    pub fn render_rows(&self) -> String {
        let all = self.render();
        all.split_once('\n')
            .map_or(String::new(), |(_, rows)| rows.to_owned())
    }

    /// Prints the table on stdout, or `empty` if it has no rows.
    pub fn print(&self, empty: &str) -> Result<()> {
        if self.rows.len() <= 1 {
            outln!("{empty}");
        } else {
            out!("{}", self.render());
        }
        Ok(())
    }
}

/// Prints `key: value` lines with the values aligned.
pub fn print_fields(fields: &[(&str, String)]) -> Result<()> {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in fields {
        outln!("{:<width$} {v}", format!("{k}:"));
    }
    Ok(())
}

/// A Unix time as RFC 3339 (UTC).
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// A Unix time relative to now: `in 59m`, `3h ago`, `now`.
pub fn relative(unix: i64) -> String {
    relative_to(unix, postern_proto::unix_now())
}

/// A Unix time relative to `now`.
pub fn relative_to(unix: i64, now: i64) -> String {
    let delta = unix.saturating_sub(now);
    if delta == 0 {
        return "now".into();
    }
    let span = short_duration(delta.unsigned_abs());
    if delta > 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// A Unix time as `RFC3339 (relative)`.
pub fn when(unix: i64) -> String {
    format!("{} ({})", rfc3339(unix), relative(unix))
}

/// A span of seconds in at most two units: `45s`, `59m`, `7h 59m`, `2d 3h`. Spans over a
/// minute are rounded to the minute.
pub fn short_duration(secs: u64) -> String {
    if secs < 60 {
        return format!("{secs}s");
    }
    let mins = secs / 60 + u64::from(secs % 60 >= 30);
    let (d, h, m) = (mins / 1440, (mins % 1440) / 60, mins % 60);
    match (d, h, m) {
        (0, 0, m) => format!("{m}m"),
        (0, h, 0) => format!("{h}h"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, 0, _) => format!("{d}d"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

/// `k=v,k2=v2`, or `-` for none.
pub fn kv_list(map: &BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A list joined by `, `, or `-` for none.
pub fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// A byte count in B, KiB, MiB or GiB.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// An optional value, or `-`.
pub fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_whole_owner_only_and_never_written_through_a_link() {
        use std::io::Write as _;
        let dir = std::env::temp_dir().join(format!("postern-pf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("out.jsonl");
        std::fs::write(&path, "kept\n").expect("old");
        // Dropped uncommitted: the old file stays, no partial one is left.
        let mut f = PrivateFile::create(&path).expect("create");
        f.write_all(b"half").expect("write");
        drop(f);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "kept\n");
        assert!(!dir.join("out.jsonl.partial").exists());
        // A link planted at the partial name is replaced, not followed.
        let victim = dir.join("victim");
        std::fs::write(&victim, "victim\n").expect("victim");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&victim, dir.join("out.jsonl.partial")).expect("link");
        let mut f = PrivateFile::create(&path).expect("create");
        f.write_all(b"new\n").expect("write");
        f.commit().expect("commit");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new\n");
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "victim\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        // A device is written as it is.
        let mut f = PrivateFile::create(std::path::Path::new("/dev/null")).expect("device");
        f.write_all(b"x").expect("write");
        f.commit().expect("commit");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(45), "45s");
        assert_eq!(short_duration(3599), "1h");
        assert_eq!(short_duration(3540), "59m");
        assert_eq!(short_duration(8 * 3600 - 60), "7h 59m");
        assert_eq!(short_duration(2 * 86400 + 3 * 3600 + 50), "2d 3h");
        // 2^64 - 1 s: 213,503,982,334,601 days and 7 h (no overflow on the way).
        assert_eq!(short_duration(u64::MAX), "213503982334601d 7h");
        assert_eq!(relative_to(100 + 3540, 100), "in 59m");
        assert_eq!(relative_to(100, 100 + 7200), "2h ago");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["NAME", "TYPE"]);
        t.row(vec!["pg-prod".into(), "postgres".into()]);
        t.row(vec!["x".into(), "tcp".into()]);
        assert_eq!(
            t.render(),
            "NAME     TYPE\npg-prod  postgres\nx        tcp\n"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
