//! Accepting HTTP connections within bounds: a global connection cap, a deadline for each
//! request head (also the idle time allowed between requests on a kept-alive connection),
//! and a grace period at shutdown.
//!
//! When the cap is reached, a small reserve of connections still gets in, each for one
//! request with a short head deadline, and answers only `/healthz` (anything else is
//! `503 server_busy`): probes keep working while clients hold every regular connection.
//! Beyond the reserve, new connections are closed at once.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Connections beyond the cap kept for `/healthz`.
pub const HEALTH_RESERVE: usize = 16;
/// The head deadline of a reserve connection.
const RESERVE_HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// How connections are bounded.
#[derive(Debug, Clone)]
pub struct Bounds {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `stop`, then lets open connections finish for the
/// grace period and closes those still open.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    reserve_app: Router,
    bounds: Bounds,
    stop: CancellationToken,
) {
    let regular = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    let reserve = Arc::new(Semaphore::new(HEALTH_RESERVE));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // pause rather than spin, then go on.
                tracing::warn!(error = %crate::error::report(&e), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if let Ok(permit) = regular.clone().try_acquire_owned() {
            let conn = connection(stream, app.clone(), bounds.header_read_timeout, true, &stop);
            connections.spawn(async move {
                conn.await;
                drop(permit);
            });
        } else if let Ok(permit) = reserve.clone().try_acquire_owned() {
            tracing::debug!(
                cap = bounds.max_connections,
                "connection cap reached; serving /healthz only"
            );
            let conn = connection(
                stream,
                reserve_app.clone(),
                RESERVE_HEAD_TIMEOUT,
                false,
                &stop,
            );
            connections.spawn(async move {
                conn.await;
                drop(permit);
            });
        } else {
            drop(stream);
        }
    }
    drop(listener);
    let open = connections.len();
    if open > 0 {
        tracing::info!(connections = open, grace = ?bounds.shutdown_grace, "waiting for open connections");
    }
    let drained = tokio::time::timeout(bounds.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "connections still open after the grace period; closing them"
        );
        connections.shutdown().await;
    }
}

/// One HTTP/1.1 connection (with upgrades, for WebSockets), shut down gracefully at `stop`.
fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    head_timeout: Duration,
    keep_alive: bool,
    stop: &CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let stop = stop.clone();
    async move {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(head_timeout)
            .keep_alive(keep_alive);
        let service = TowerToHyperService::new(app);
        let conn = http
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %crate::error::report(&e), "connection ended");
        }
    }
}
