//! The `shoal` binary: parses the command line and runs it inside an actix system on a tokio
//! runtime (`System::with_tokio_rt`; `System::new()` inside tokio would panic).

#![forbid(unsafe_code)]

use clap::Parser;
use shoal_cli::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo prints its own progress; node internals only speak up when something is wrong.
    let default_level = if matches!(cli.command, cli::Command::Demo(_)) { "warn" } else { "info" };
    cli::init_tracing(cli.log_format, default_level);
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("cannot build the tokio runtime")
    });
    match system.block_on(cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
