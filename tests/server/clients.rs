//! The client libraries (`clients/typescript`, `clients/python`) against a real server and
//! Postgres: each suite runs as a child process (`node --test`, `python3 -m unittest`) and
//! fails this test with its output when it fails.
//!
//! The suites reach the server through a TCP proxy that the harness can cut (every open
//! connection closed at once, as a network drop would), and drive the database through a
//! small control endpoint: run SQL, cut the proxy, age and prune the event log (to make a
//! cursor stale), sign an already expired token. A suite is skipped, with a message, only
//! when its interpreter is not installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use waltap::server::{Claims, Keys};

use super::{start, Server, ADMIN, KEYS, ORDERS, TIMEOUT};
use crate::support::{wait_for, TestDb};

/// Tables the suites use beside `orders` and `users`.
const EXTRA_DDL: &str = "CREATE TABLE big (id int8 PRIMARY KEY, n int8, ns int8[], note text);";

/// How long a suite may run.
const SUITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `program --version` runs.
fn installed(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The TypeScript compiler of clients/typescript, installed with `npm ci` the first time a
/// test needs it (so `cargo test` on a fresh machine checks the declarations too);
/// `None` when Node or npm is missing or the registry cannot be reached.
async fn tsc() -> Option<PathBuf> {
    static TSC: tokio::sync::OnceCell<Option<PathBuf>> = tokio::sync::OnceCell::const_new();
    TSC.get_or_init(|| async {
        let dir = repo().join("clients/typescript");
        let tsc = dir.join("node_modules/.bin/tsc");
        if !installed("node") {
            return None;
        }
        if !tsc.exists() {
            if !installed("npm") {
                return None;
            }
            let out = tokio::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .output()
                .await
                .ok()?;
            if !out.status.success() {
                eprintln!(
                    "npm ci in clients/typescript failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        tsc.exists().then_some(tsc)
    })
    .await
    .clone()
}

/// A TCP proxy to the server whose connections can all be cut at once.
struct Proxy {
    url: String,
    cut: Arc<std::sync::Mutex<CancellationToken>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cut = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let current = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let token = current.lock().unwrap().clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Proxy { url, cut }
    }

    /// Closes every open connection; new ones go through.
    fn cut(&self) {
        let mut token = self.cut.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }
}

struct Control {
    db_url: String,
    proxy: Proxy,
}

/// The control endpoint: `POST /sql` (the body is run as a batch), `/cut`, `/prune`
/// (`{"contains"}`: once an event containing that JSON is in the log, every event of the
/// log is aged and deleted), `/expired-token`
/// (`{"stream"}` or `{"table"}`: a token of the orders key that expired a minute ago).
async fn control(state: Control) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/sql", post(sql))
        .route("/cut", post(cut))
        .route("/prune", post(prune))
        .route("/expired-token", post(expired_token))
        .with_state(Arc::new(state));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn sql(State(c): State<Arc<Control>>, body: String) -> Result<(), String> {
    connect(&c.db_url)
        .await
        .batch_execute(&body)
        .await
        .map_err(|e| e.to_string())
}

async fn cut(State(c): State<Arc<Control>>) {
    c.proxy.cut();
}

async fn prune(State(c): State<Arc<Control>>, Json(body): Json<Value>) -> Json<Value> {
    let mut store = connect(&c.db_url).await;
    // The pipeline appends a committed change a moment later: wait for the last one.
    let contains = body["contains"].to_string();
    wait_for("the change to be in the log", TIMEOUT, || async {
        store
            .query_opt(
                "SELECT 1 FROM waltap.events WHERE event::jsonb @> $1::text::jsonb",
                &[&contains],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    // Every source in the log: the server's pipeline slot is the only one.
    let sources: Vec<String> = store
        .query("SELECT DISTINCT source FROM waltap.events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut events = 0;
    for source in sources {
        events += super::expire_log(&mut store, &source).await;
    }
    Json(json!({"events": events}))
}

async fn expired_token(Json(body): Json<Value>) -> String {
    let keys = Keys::from_toml(KEYS, None).unwrap();
    let claims = Claims {
        key: keys.find(ORDERS).unwrap().id(),
        table: body["table"].as_str().map(waltap::TableName::parse),
        filter: None,
        stream: body["stream"].as_str().map(str::to_owned),
        position: None,
        exp: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 60,
    };
    keys.sign(&claims)
}

/// Starts Postgres, the server, the proxy and the control endpoint, then runs `cmd` (in
/// `dir`) with their addresses in the environment; fails with the suite's output.
async fn run_suite(mut cmd: tokio::process::Command, dir: &Path) {
    let db = TestDb::new().await;
    db.client().await.batch_execute(EXTRA_DDL).await.unwrap();
    // A small queue, so that the suites can make a subscriber lag.
    let s: Server = start(&db, |c| c.subscriber_queue = 16).await;
    let proxy = Proxy::start(s.url.trim_start_matches("http://").to_owned()).await;
    let proxy_url = proxy.url.clone();
    let control_url = control(Control {
        db_url: db.url(),
        proxy,
    })
    .await;
    cmd.current_dir(dir)
        .env("WALTAP_URL", &proxy_url)
        .env("WALTAP_ADMIN_KEY", ADMIN)
        .env("WALTAP_ORDERS_KEY", ORDERS)
        .env("WALTAP_CONTROL", &control_url)
        .kill_on_drop(true);
    let (status, stdout, stderr) = output_within(cmd, SUITE_TIMEOUT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "client suite failed ({status:?}; None: killed after {SUITE_TIMEOUT:?})\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    eprintln!("{stdout}{stderr}");
    s.stop().await;
    db.teardown().await;
}

/// Runs `cmd` for at most `limit` (then kills it); its exit status (None when killed) and
/// what it wrote until then.
async fn output_within(
    mut cmd: tokio::process::Command,
    limit: std::time::Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    use tokio::io::AsyncReadExt;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the client suite runs");
    let read = |pipe: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
        tokio::spawn(async move {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text).await;
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => Some(status.unwrap()),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    (status, stdout.await.unwrap(), stderr.await.unwrap())
}

#[tokio::test]
async fn typescript_client_against_a_real_server() {
    if !installed("node") {
        eprintln!("skipped: node is not installed (Node 18+ runs clients/typescript's tests)");
        return;
    }
    let dir = repo().join("clients/typescript");
    let mut cmd = tokio::process::Command::new("node");
    cmd.args(["--test", "test/client.test.js"]);
    run_suite(cmd, &dir).await;
}

#[tokio::test]
async fn typescript_declarations_type_check() {
    let dir = repo().join("clients/typescript");
    let Some(tsc) = tsc().await else {
        eprintln!("skipped: node and npm are needed to install the TypeScript compiler");
        return;
    };
    let out = tokio::process::Command::new(tsc)
        .args(["-p", "tsconfig.json"])
        .current_dir(&dir)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn python_client_against_a_real_server() {
    if !installed("python3") {
        eprintln!("skipped: python3 is not installed (Python 3.8+ runs clients/python's tests)");
        return;
    }
    let dir = repo().join("clients/python");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.args(["-m", "unittest", "discover", "-v", "-s", "tests", "-t", "."])
        .env("PYTHONPATH", &dir)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    run_suite(cmd, &dir).await;
}

/// `waltap types` reads the catalog: enums as unions, arrays, nullability, `int8` per the
/// option; the TypeScript compiles (when tsc is installed) and the Python runs.
#[tokio::test]
async fn waltap_types_from_the_catalog() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
             CREATE DOMAIN big_id AS int8;
             CREATE TABLE typed (id big_id PRIMARY KEY, mood mood, moods mood[] NOT NULL,
                 tags text[][], doc jsonb, amount numeric NOT NULL, at timestamptz,
                 \"Weird Col\" int, ratio float8 NOT NULL, class text);",
        )
        .await
        .unwrap();
    let types = |lang: &str, int8: &str| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_waltap"));
        cmd.args(["types", "--lang", lang, "--int8", int8, "--table", "typed"])
            .env("DATABASE_URL", db.url());
        crate::support::run_ok(cmd)
    };
    let ts = types("typescript", "string").await;
    for line in [
        "export interface Typed {",
        "  id: string;",
        "  mood: \"sad\" | \"ok\" | \"happy\" | null;",
        "  moods: Array<\"sad\" | \"ok\" | \"happy\" | null>;",
        "  tags: Array<Array<string | null> | null> | null;",
        "  doc: unknown | null;",
        "  amount: string;",
        "  \"Weird Col\": number | null;",
        "  ratio: number | \"NaN\" | \"Infinity\" | \"-Infinity\";",
        "  \"public.typed\": Typed;",
    ] {
        assert!(ts.contains(line), "{line:?} missing from:\n{ts}");
    }
    assert!(types("typescript", "number")
        .await
        .contains("  id: number;"));

    let dir = std::env::temp_dir().join(db.unique_name("types"));
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(tsc) = tsc().await {
        std::fs::write(
            dir.join("typed.ts"),
            format!("{ts}\nconst row: Typed = {{ id: \"1\", mood: \"ok\", moods: [], tags: null, doc: {{}}, amount: \"1.50\", at: null, \"Weird Col\": 3, ratio: \"NaN\", class: null }};\nvoid row;\n"),
        )
        .unwrap();
        let mut cmd = tokio::process::Command::new(&tsc);
        cmd.args(["--strict", "--noEmit"]).arg(dir.join("typed.ts"));
        crate::support::run_ok(cmd).await;
    } else {
        eprintln!("node and npm are needed to install the TypeScript compiler: generated TypeScript not compiled");
    }
    let py = types("python", "number").await;
    assert!(
        py.contains("\"mood\": Optional[Literal[\"sad\", \"ok\", \"happy\"]],"),
        "{py}"
    );
    if installed("python3") {
        let mut cmd = tokio::process::Command::new("python3");
        cmd.arg("-c")
            .arg(format!("{py}\nprint(Typed.__annotations__['id'])"));
        assert!(crate::support::run_ok(cmd).await.contains("int"));
    }
    let rs = types("rust", "number").await;
    assert!(rs.contains("    pub id: i64,"), "{rs}");
    let _ = std::fs::remove_dir_all(&dir);
    db.teardown().await;
}
