//! The `waltap` binary; the program itself is [`waltap::run_cli`].

fn main() -> std::process::ExitCode {
    waltap::run_cli()
}
