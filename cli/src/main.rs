//! The `postern` binary; everything lives in the `postern_cli` library.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    postern_cli::main_entry(std::env::args_os())
}
