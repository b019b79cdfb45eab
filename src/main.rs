//! The `waltap` binary: parse the command line, set up logging, run the command.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = waltap::cli::Cli::parse();
    let asked = std::env::var("WALTAP_LOG").unwrap_or_default();
    let mut filter = Some(asked.as_str())
        .filter(|a| !a.trim().is_empty())
        .and_then(|a| EnvFilter::try_new(a).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // tokio-postgres logs every statement's parameters (row values, cursors) at debug:
    // kept out of `WALTAP_LOG=debug` unless asked for by name.
    if !asked.contains("tokio_postgres") {
        if let Ok(quiet) = "tokio_postgres=info".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    let mut builder = if cli.single_threaded() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(waltap::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our errors already include their causes in their messages.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
