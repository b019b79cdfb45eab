//! The HTTP delivery server (`waltap serve`): subscribe and persisted streams for services
//! in any language, over Server-Sent Events, WebSocket and a long-polling pull feed.
//!
//! This module owns the router, the shared state every handler reads, the accept loop
//! and the end of open sessions at shutdown (`Http`). The process around it (the group
//! member, the hub, the order of shutdown) is [`crate::app`]'s.
//!
//! The API contract is the README's "HTTP API" section and `docs/openapi.json` (served at
//! `/v1/openapi.json`). Submodules: `auth` (keys, tokens, connection cap), `error`
//! (codes), `session` (SSE and WebSocket framing), `subscribe`, `streams`, `metrics`,
//! `health`, `tokens`, `console` (the operator's page at `/`). Only [`crate::app`]
//! depends on this module.

mod accept;
mod auth;
pub(crate) mod columns;
mod console;
mod error;
mod health;
mod metrics;
mod session;
mod streams;
mod subscribe;
mod tokens;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{ErrorCode, TableError};
use crate::event::TableName;
use crate::filter::Filter;
use crate::hub::Hub;
use crate::log::append::{AppendError, AppenderConfig};
use crate::log::StoreError;
use crate::pg::config::SourceConfig;
pub use auth::{ApiKey, Claims, Keys, KeysError};
use auth::{Caller, ConnectionCap};
use error::ApiError;
use metrics::Metrics;

/// The OpenAPI document of this API, checked in beside the code.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Every route as (method, path), in the router's syntax (which is OpenAPI's).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/"),
    ("get", "/v1/console"),
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/subscribe"),
    ("post", "/v1/tokens"),
    ("get", "/v1/streams"),
    ("post", "/v1/streams"),
    ("get", "/v1/streams/{name}"),
    ("delete", "/v1/streams/{name}"),
    ("get", "/v1/streams/{name}/events"),
    ("post", "/v1/streams/{name}/ack"),
    ("post", "/v1/streams/{name}/reset"),
];

/// Bounds on what one client may ask for.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Largest JSON request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest filter, in bytes of its JSON text (query parameter or body).
    pub max_filter_bytes: usize,
    /// Nesting of the filter's JSON (objects and arrays).
    pub max_filter_depth: usize,
    /// Open delivery connections per key (SSE, WebSocket, pending feed requests).
    pub connections_per_key: usize,
    /// Longest lifetime a client may ask for a token (whole seconds).
    pub max_token_ttl: Duration,
    /// Most events one feed request may return (its `limit` is clamped to this).
    pub max_feed_limit: usize,
    /// Longest a feed request may wait for events (its `wait` must not exceed it).
    pub max_feed_wait: Duration,
    /// Open HTTP connections, all keys and none together (a few more are kept for
    /// `/healthz`). Keep it under the process's open-file limit (`ulimit -n`).
    pub max_connections: usize,
    /// Time a client has to send a request's head, and to start the next request on a
    /// kept-alive connection.
    pub header_read_timeout: Duration,
    /// Longest pause while a client sends a request body.
    pub body_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 * 1024,
            max_filter_bytes: 8 * 1024,
            max_filter_depth: 16,
            connections_per_key: 512,
            max_token_ttl: Duration::from_secs(24 * 3600),
            max_feed_limit: 1000,
            max_feed_wait: Duration::from_secs(60),
            max_connections: 1000,
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything a `waltap serve` process needs ([`crate::app::serve`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The pipeline: its listener's source, slot and publication are the server's.
    pub appender: AppenderConfig,
    /// Events queued per ephemeral subscriber before it is cut off with `lagged`.
    pub subscriber_queue: usize,
    /// The API keys clients authenticate with, and what each may read.
    pub keys: Keys,
    /// Origins allowed to call the API from a browser (CORS); none = same-origin only.
    pub cors_origins: Vec<String>,
    /// Bounds on each client's requests.
    pub limits: Limits,
    /// Interval of the SSE comment keepalives.
    pub keepalive: Duration,
    /// Connections to the log shared by every stream consumer (plus one that listens for
    /// appends), however many consumers are connected.
    pub store_pool_size: usize,
    /// At shutdown, how long open requests and connections may take to finish before
    /// they are closed.
    pub shutdown_grace: Duration,
    /// How this process joins the group of processes on its slot (one leader appends).
    pub group: crate::log::leader::GroupConfig,
}

impl ServerConfig {
    /// Settings with the defaults for everything but the pipeline and the keys.
    pub fn new(appender: AppenderConfig, keys: Keys) -> Self {
        ServerConfig {
            appender,
            subscriber_queue: 1024,
            keys,
            cors_origins: Vec::new(),
            limits: Limits::default(),
            keepalive: Duration::from_secs(15),
            store_pool_size: crate::log::pool::DEFAULT_POOL_SIZE,
            shutdown_grace: Duration::from_secs(10),
            group: Default::default(),
        }
    }
}

/// Why the server stopped or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The subscription hub could not start.
    #[error("cannot start the subscription hub")]
    Hub(#[source] crate::Error),
    /// The pipeline that appends to the event log failed.
    #[error(transparent)]
    Pipeline(Box<AppendError>),
    /// Binding or serving the listening socket failed.
    #[error("HTTP server")]
    Io(#[from] std::io::Error),
    /// A configured CORS origin is not a valid header value.
    #[error("invalid CORS origin {0:?}")]
    CorsOrigin(String),
    /// The stream consumers' connection pool could not be made.
    #[error("cannot make the stream consumers' connection pool")]
    Pool(#[source] StoreError),
}

/// A database the handlers query, through a pool: a slow statement holds one connection
/// and delays no other request.
struct Db {
    config: SourceConfig,
    pool: crate::pg::SqlPool,
}

impl Db {
    async fn get(&self) -> Result<crate::pg::PooledClient, StoreError> {
        Ok(self.pool.get().await?)
    }
}

/// Connections the handlers keep to the watched database when the log lives elsewhere
/// (catalog lookups only).
const CATALOG_POOL_SIZE: usize = 4;

/// What every handler shares.
struct AppState {
    hub: Hub,
    keys: Keys,
    cap: ConnectionCap,
    metrics: Arc<Metrics>,
    limits: Limits,
    keepalive: Duration,
    /// The log's database, and the watched one when the log lives elsewhere.
    store: Db,
    /// What stream consumers read and acknowledge through.
    consumer_pool: crate::log::pool::ConsumerPool,
    catalog: Option<Db>,
    /// The pipeline's slot: the source of every stream made here.
    slot: String,
    /// The pipeline's publication: only its tables are delivered.
    publication: String,
    /// Fires at shutdown: every session ends.
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Stream consumers served by this process, by stream name: where explicit acks go.
    consumers:
        std::sync::Mutex<HashMap<String, (u64, tokio::sync::mpsc::Sender<session::Inbound>)>>,
    next_session: std::sync::atomic::AtomicU64,
    pipeline_running: std::sync::atomic::AtomicBool,
    /// The pipeline's retention, which makes a stream's cursor stale when it lags.
    retention: Option<crate::log::retention::Retention>,
}

type Shared = Arc<AppState>;

impl AppState {
    fn catalog_db(&self) -> &Db {
        self.catalog.as_ref().unwrap_or(&self.store)
    }

    /// Refuses a table the caller's key may not read or the source does not publish
    /// (system catalogs and waltap's own tables never are). A key's `"*"` thus means
    /// every published table.
    async fn check_published(&self, caller: &Caller, table: &TableName) -> Result<(), ApiError> {
        caller.check_table(table)?;
        let catalog = self.catalog_db().get().await?;
        let published = crate::pg::catalog::is_published(&catalog, &self.publication, table)
            .await
            .map_err(StoreError::sql("read the publication's tables"))?;
        if published {
            return Ok(());
        }
        let why = crate::pg::catalog::not_published(&catalog, &self.publication, table)
            .await
            .map_err(StoreError::sql("read the publication's tables"))?;
        Err(why.into())
    }

    /// Checks a filter against the table's columns and types now, as a subscription
    /// would when it starts (so a token is not minted for a filter that cannot work).
    async fn check_filter_columns(
        &self,
        table: &TableName,
        filter: Option<&Filter>,
    ) -> Result<(), ApiError> {
        let catalog = self.catalog_db().get().await?;
        let schema = crate::pg::catalog::table_schema(&catalog, table)
            .await
            .map_err(StoreError::sql("read a table's columns"))?
            .ok_or_else(|| TableError::NotPublished(table.to_string()))?;
        crate::filter::CompiledFilter::new(filter, &schema)
            .map(drop)
            .map_err(|e| ApiError::BadFilter(e.to_string()))
    }

    /// The `int8` columns of `tables`, when the request asked for them as strings.
    async fn int8_strings(
        &self,
        form: columns::Int8Form,
        tables: &[TableName],
    ) -> Result<columns::Int8Strings, ApiError> {
        if form == columns::Int8Form::Number {
            return Ok(columns::Int8Strings::default());
        }
        let catalog = self.catalog_db().get().await?;
        columns::Int8Strings::load(&catalog, form, tables)
            .await
            .map_err(|e| StoreError::sql("read a table's columns")(e).into())
    }

    /// Parses a filter within the configured bounds.
    fn filter(&self, json: Option<serde_json::Value>) -> Result<Option<Filter>, ApiError> {
        let Some(value) = json else { return Ok(None) };
        let size = value.to_string().len();
        if size > self.limits.max_filter_bytes {
            return Err(ApiError::BadFilter(format!(
                "the filter is {size} bytes; at most {} are accepted",
                self.limits.max_filter_bytes
            )));
        }
        if depth(&value) > self.limits.max_filter_depth {
            return Err(ApiError::BadFilter(format!(
                "the filter nests deeper than {} levels",
                self.limits.max_filter_depth
            )));
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| ApiError::BadFilter(e.to_string()))
    }

    /// Parses a filter given as text (a query parameter), within the bounds.
    fn filter_text(&self, text: Option<&str>) -> Result<Option<Filter>, ApiError> {
        let Some(text) = text else { return Ok(None) };
        if text.len() > self.limits.max_filter_bytes {
            return Err(ApiError::BadFilter(format!(
                "the filter is {} bytes; at most {} are accepted",
                text.len(),
                self.limits.max_filter_bytes
            )));
        }
        let value = serde_json::from_str(text)
            .map_err(|e| ApiError::BadFilter(format!("invalid JSON: {e}")))?;
        self.filter(Some(value))
    }
}

fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[derive(Deserialize)]
struct TokenParam {
    token: Option<String>,
}

impl FromRequestParts<Shared> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Caller, ApiError> {
        if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
            let secret = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or(ApiError::Unauthorized)?;
            let key = state
                .keys
                .find(secret.trim())
                .ok_or(ApiError::Unauthorized)?;
            return Ok(Caller {
                key: key.clone(),
                token: None,
            });
        }
        let Query(TokenParam { token }) = Query::<TokenParam>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::Unauthorized)?;
        let token = token.ok_or(ApiError::Unauthorized)?;
        let (claims, key) = state.keys.verify(&token)?;
        Ok(Caller {
            key,
            token: Some(claims),
        })
    }
}

/// The HTTP side of a `waltap serve` process, ready to accept connections: its shared
/// state (the hub it hands subscriptions from, the pools, keys and metrics) and the
/// router. What else runs in the process, and the order of shutdown, is
/// [`crate::app::serve`]'s.
pub(crate) struct Http {
    state: Shared,
    cors: Option<tower_http::cors::CorsLayer>,
}

impl Http {
    /// Builds the state for `config`; subscriptions come from `hub`.
    pub(crate) fn new(config: &ServerConfig, hub: Hub) -> Result<Http, ServerError> {
        let metrics = Arc::new(Metrics::default());
        let appender = &config.appender;
        let cors = cors_layer(&config.cors_origins)?;
        let log = match &appender.jetstream {
            Some(js) => crate::log::EventLog::JetStream(
                crate::log::jetstream::JetStreamReader::new(js, &appender.listener.slot),
            ),
            None => crate::log::EventLog::Postgres,
        };
        let consumer_pool =
            crate::log::pool::ConsumerPool::reading(&appender.store, config.store_pool_size, log)
                .map_err(ServerError::Pool)?;
        let catalog = if appender.store.describe() != appender.listener.source.describe() {
            let source = appender.listener.source.clone();
            let pool = crate::pg::SqlPool::new(&source, CATALOG_POOL_SIZE)
                .map_err(|e| ServerError::Pool(e.into()))?;
            Some(Db {
                config: source,
                pool,
            })
        } else {
            None
        };
        let state = Arc::new(AppState {
            hub,
            keys: config.keys.clone(),
            cap: ConnectionCap::new(config.limits.connections_per_key),
            metrics,
            limits: config.limits.clone(),
            keepalive: config.keepalive,
            store: Db {
                config: appender.store.clone(),
                pool: consumer_pool.sql().clone(),
            },
            consumer_pool,
            catalog,
            slot: appender.listener.slot.clone(),
            publication: appender.listener.publication.clone(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            consumers: std::sync::Mutex::new(HashMap::new()),
            next_session: Default::default(),
            pipeline_running: std::sync::atomic::AtomicBool::new(true),
            retention: appender.retention,
        });
        if !config.keys.token_secret_configured {
            tracing::warn!("no token secret configured (WALTAP_TOKEN_SECRET or token_secret in the keys file): tokens are signed with a random secret and stop working when the process restarts");
        }
        Ok(Http { state, cors })
    }

    /// Where the pipeline counts what it appends.
    pub(crate) fn appended_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.state.metrics.events_in.clone()
    }

    /// Where the group member reports its role.
    pub(crate) fn membership(&self) -> Arc<crate::log::leader::Membership> {
        self.state.metrics.membership.clone()
    }

    /// The pipeline ended: `/healthz` reports it.
    pub(crate) fn pipeline_stopped(&self) {
        self.state
            .pipeline_running
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Accepts and serves connections until [`Http::stop`]; connections still open then
    /// get `config.shutdown_grace` to finish.
    pub(crate) fn accept(
        &self,
        listener: tokio::net::TcpListener,
        config: &ServerConfig,
    ) -> tokio::task::JoinHandle<()> {
        let app = router(self.state.clone(), self.cors.clone());
        let bounds = accept::Bounds {
            max_connections: config.limits.max_connections,
            header_read_timeout: config.limits.header_read_timeout,
            shutdown_grace: config.shutdown_grace,
        };
        tokio::spawn(accept::serve(
            listener,
            app,
            health_router(self.state.clone()),
            bounds,
            self.state.stop.clone(),
        ))
    }

    /// Stops accepting; every open delivery session ends (a stream consumer releases its
    /// lease), waiting at most `grace` for them.
    pub(crate) async fn stop(&self, grace: Duration) {
        self.state.stop.cancel();
        self.state.tasks.close();
        if tokio::time::timeout(grace, self.state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("delivery sessions still open after the grace period; stopping anyway");
        }
    }

    /// Stops the hub, once nothing else holds the state.
    pub(crate) async fn shutdown(self) {
        match Arc::try_unwrap(self.state) {
            Ok(state) => state.hub.shutdown().await,
            Err(_) => tracing::debug!("hub still referenced at shutdown; dropped with the process"),
        }
    }
}

fn cors_layer(origins: &[String]) -> Result<Option<tower_http::cors::CorsLayer>, ServerError> {
    if origins.is_empty() {
        return Ok(None);
    }
    let mut allowed = Vec::with_capacity(origins.len());
    for o in origins {
        allowed.push(HeaderValue::from_str(o).map_err(|_| ServerError::CorsOrigin(o.clone()))?);
    }
    Ok(Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("last-event-id"),
            ]),
    ))
}

fn router(state: Shared, cors: Option<tower_http::cors::CorsLayer>) -> Router {
    let limit = state.limits.max_body_bytes;
    let app = Router::new()
        .route("/", get(console::page))
        .route("/v1/console", get(console::status))
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics_text))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/subscribe", get(subscribe::subscribe))
        .route("/v1/tokens", post(tokens::tokens))
        .route("/v1/streams", get(streams::list).post(streams::create))
        .route(
            "/v1/streams/{name}",
            get(streams::consume).delete(streams::delete),
        )
        .route("/v1/streams/{name}/events", get(streams::feed))
        .route("/v1/streams/{name}/ack", post(streams::ack))
        .route("/v1/streams/{name}/reset", post(streams::reset))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            error_responses,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            state.limits.body_idle_timeout,
        ))
        .with_state(state);
    match cors {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// What a connection beyond the cap may ask: `/healthz` only.
fn health_router(state: Shared) -> Router {
    let cap = state.limits.max_connections;
    Router::new()
        .route("/healthz", get(health::healthz))
        .fallback(move || async move { ApiError::Busy(cap) })
        .with_state(state)
}

/// Counts error responses, and gives those the framework makes itself (a malformed query
/// string or path, a method the route lacks) the API's JSON error shape.
async fn error_responses(
    State(state): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !status.is_client_error() && !status.is_server_error() {
        return response;
    }
    state
        .metrics
        .errors
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // The framework's rejections are one short line of text.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    };
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        t => t.to_owned(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = json!({"error": error::error_body(code, &message)}).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn openapi(caller: Caller) -> Result<Response, ApiError> {
    caller.require_key()?;
    Ok(([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_route_is_in_the_openapi_document() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        for (method, path) in ROUTES {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} is not described in docs/openapi.json"
            );
        }
        let described: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(
            described,
            ROUTES.len(),
            "docs/openapi.json describes routes the server lacks"
        );
    }

    #[test]
    fn filter_depth() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({"a": [{"b": 1}]})), 3);
    }
}
