//! The `shoal` binary: parses the command line and runs it inside an actix system on a tokio
//! runtime (`System::with_tokio_rt`; `System::new()` inside tokio would panic).

#![forbid(unsafe_code)]

use clap::Parser;
use shoal_cli::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A node logs what it does; every other command prints its own output, and its libraries
    // (the NATS client's connection events) only speak up when something is wrong.
    let serves = matches!(
        cli.command,
        cli::Command::Node(_) | cli::Command::Gateway(_) | cli::Command::FunctionHost(_)
    );
    let default_level = if serves { "info" } else { "warn" };
    if serves {
        // Before the runtime's threads exist.
        shoal_runtime::staging::tune_allocator();
    }
    cli::init_tracing(cli.log_format, default_level);
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("cannot build the tokio runtime")
    });
    match system.block_on(cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<cli::Exit>() {
            Some(cli::Exit(code)) => std::process::ExitCode::from(*code),
            None => {
                eprintln!("error: {}", cli::error_report(&e));
                std::process::ExitCode::FAILURE
            }
        },
    }
}
