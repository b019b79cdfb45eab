//! `cargo run --release --example bench -- --runs 5 --out bench-results/`
//!
//! The command line of [`waltap::dev::bench`]: parses flags, builds the `waltap` binary for the
//! `waltap tail` contender unless one is given, runs the benchmark and prints the
//! Markdown report. See docs/benchmarks.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use waltap::dev::bench::{self, BenchConfig, Contender};

#[derive(Debug, Parser)]
#[command(about = "Benchmark waltap against pg_recvlogical on a throwaway PostgreSQL")]
struct Args {
    /// Catch-up runs per contender and replica identity (the report shows medians).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Row changes per replica identity (1/2 inserts, 3/10 updates, 1/5 deletes).
    #[arg(long, default_value_t = 100_000)]
    changes: u64,
    /// Latency test: single-row commits per second.
    #[arg(long, default_value_t = 1000)]
    latency_rate: u32,
    /// Latency test duration in seconds; 0 skips it.
    #[arg(long, default_value_t = 10.0)]
    latency_secs: f64,
    /// Directory for report.md, report.json and the contenders' logs.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// The waltap binary for `waltap tail`; by default cargo builds it in this profile.
    #[arg(long)]
    waltap_bin: Option<PathBuf>,
    /// Only these contenders (comma-separated): recvlogical-pgoutput,
    /// recvlogical-test-decoding, psycopg2, waltap-tail, waltap-listener, waltap-persisted, waltap-jetstream,
    /// waltap-fanout-{1,100,1000,10000}, waltap-tenants-{1,1000,10000}, waltap-follower
    /// (latency only: a subscription fed from the event log, as on a group follower).
    #[arg(long, value_delimiter = ',', value_parser = parse_contender)]
    only: Vec<Contender>,
    /// Measure child CPU by polling /proc even when GNU time is installed.
    #[arg(long)]
    no_gnu_time: bool,
}

fn parse_contender(s: &str) -> Result<Contender, String> {
    Contender::parse(s).ok_or_else(|| format!("unknown contender {s:?}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let release = !cfg!(debug_assertions);
    if !release {
        eprintln!("bench: warning: a debug build measures nothing useful; add --release");
    }
    let contenders = if args.only.is_empty() {
        Contender::ALL.to_vec()
    } else {
        args.only
    };
    let waltap_bin = match args.waltap_bin {
        Some(bin) => Some(bin),
        None if contenders.contains(&Contender::WaltapTail) => {
            eprintln!("bench: building the waltap binary");
            Some(tokio::task::spawn_blocking(move || bench::build_waltap(release)).await??)
        }
        None => None,
    };
    let config = BenchConfig {
        changes: args.changes,
        runs: args.runs.max(1),
        latency_rate: args.latency_rate,
        latency_duration: Duration::from_secs_f64(args.latency_secs.max(0.0)),
        out_dir: args.out.clone(),
        waltap_bin,
        contenders,
        use_gnu_time: !args.no_gnu_time,
    };
    let report = bench::run(&config).await?;
    println!("{}", report.to_markdown());
    eprintln!(
        "bench: wrote {} and {}",
        args.out.join(bench::MARKDOWN_FILE).display(),
        args.out.join(bench::JSON_FILE).display()
    );
    Ok(())
}
