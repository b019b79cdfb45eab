//! `waltap stream create|list|delete|tail`: persisted streams from the command line.

use clap::Subcommand;

/// Manage and consume persisted streams.
#[derive(Debug, Subcommand)]
pub enum StreamCommand {}

pub async fn run(cmd: StreamCommand) -> anyhow::Result<()> {
    match cmd {}
}
