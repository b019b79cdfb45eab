//! The benchmark (`waltap::dev::bench`) at toy size: it must keep running end to end and
//! produce a well-formed report. Nothing here looks at how fast anything was.

use std::time::Duration;

use serde_json::Value as Json;
use waltap::dev::bench::{self, BenchConfig, Contender};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_benchmark_writes_a_well_formed_report() {
    // The benchmark starts its own cluster, so it needs local server binaries even
    // when DATABASE_URL points the other tests elsewhere.
    if let Err(why) = waltap::dev::localpg::find_bindir() {
        eprintln!("skipping the benchmark smoke test: {why}");
        return;
    }
    let out = std::env::temp_dir().join(format!("waltap-bench-smoke-{}", std::process::id()));
    // Removed however the test ends, failures included.
    let _cleanup = RemoveOnDrop(out.clone());
    let config = BenchConfig {
        changes: 2000,
        runs: 1,
        latency_rate: 100,
        latency_duration: Duration::from_secs(1),
        out_dir: out.clone(),
        // The debug binary cargo built for these tests: slow, but only the plumbing counts.
        waltap_bin: Some(env!("CARGO_BIN_EXE_waltap").into()),
        // Every contender but the fan-outs to thousands, whose set-up alone would load the
        // two cores for long enough to slow the tests running beside this one.
        contenders: Contender::ALL
            .into_iter()
            .filter(|c| c.fanout().is_none_or(|(n, _)| n < 1000))
            .collect(),
        // GNU time is what the real runs use; here the /proc fallback gets exercised.
        use_gnu_time: false,
    };
    let report = bench::run(&config).await.expect("the benchmark runs");

    let json: Json = serde_json::from_str(
        &std::fs::read_to_string(out.join(bench::JSON_FILE)).expect("report.json written"),
    )
    .expect("report.json is JSON");
    assert!(json["machine"]["nproc"].as_u64().is_some_and(|n| n > 0));
    assert!(json["versions"]["postgres"].as_str().is_some());
    assert_eq!(json["settings"]["changes"], 2000);
    let catch_up = json["catch_up"].as_array().expect("catch_up is a list");
    let ran: Vec<&str> = catch_up
        .iter()
        .filter_map(|c| c["contender"].as_str())
        .collect();
    for c in [Contender::WaltapTail, Contender::WaltapListener] {
        assert_eq!(
            ran.iter().filter(|&&k| k == c.key()).count(),
            2,
            "{} ran on both identities: {ran:?}",
            c.key()
        );
    }
    for entry in catch_up {
        let runs = entry["runs"].as_array().expect("runs is a list");
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0]["events"], 2000);
        assert!(runs[0]["wall_secs"].as_f64().is_some_and(|s| s > 0.0));
        assert!(entry["events_per_sec"]["median"].as_f64().is_some());
    }
    let latency = json["latency"].as_array().expect("latency is a list");
    assert_eq!(latency.len(), report.latency.len());
    assert!(latency
        .iter()
        .all(|l| l["commits"].as_u64().is_some_and(|n| n > 0)));
    assert!(latency.iter().all(|l| l["p50_ms"].as_f64().is_some()));

    // Every child contender printed its first event (psycopg2 only where it is installed).
    let first: Vec<&str> = json["first_event"]
        .as_array()
        .expect("first_event is a list")
        .iter()
        .filter(|f| f["runs_ms"][0].as_f64().is_some_and(|ms| ms > 0.0))
        .filter_map(|f| f["contender"].as_str())
        .collect();
    for c in [Contender::RecvlogicalPgoutput, Contender::WaltapTail] {
        assert!(first.contains(&c.key()), "{} in {first:?}", c.key());
    }

    let markdown = std::fs::read_to_string(out.join(bench::MARKDOWN_FILE)).expect("report.md");
    assert_eq!(markdown, report.to_markdown());
    for heading in [
        "## Catch-up, REPLICA IDENTITY DEFAULT",
        "## Catch-up, REPLICA IDENTITY FULL",
        "## End-to-end latency",
        "## Time to the first event",
        "Slowest run ÷ the fastest peer's median",
        "## Fan-out, REPLICA IDENTITY DEFAULT",
    ] {
        assert!(markdown.contains(heading), "{heading:?} in:\n{markdown}");
    }
    for c in &report.catch_up {
        assert!(
            markdown.contains(c.contender.label()),
            "{} in the table",
            c.contender.label()
        );
    }
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
