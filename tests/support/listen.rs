//! Helpers to run a waltap listener against a test database.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value as Json;
use waltap::SourceConfig;
use waltap::TableName;
use waltap::{Event, Listener, ListenerConfig};

use super::TestDb;

/// How long any single expected event may take to arrive.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A listener configuration for `db` with a slot and publication of its own.
pub fn config(db: &TestDb, tables: &[&str]) -> ListenerConfig {
    config_for_url(db, &db.url(), tables)
}

/// As [`config`], connecting with another URL (role, TLS...).
pub fn config_for_url(db: &TestDb, url: &str, tables: &[&str]) -> ListenerConfig {
    let mut c = ListenerConfig::new(SourceConfig::parse(url).expect("test URL parses"));
    c.slot = db.unique_name("slot");
    c.publication = db.unique_name("pub");
    c.tables = tables.iter().map(|t| TableName::parse(t)).collect();
    c.reconnect_min = Duration::from_millis(50);
    c.reconnect_max = Duration::from_millis(500);
    c
}

/// Creates the publication and slot of `config` now, so that every later commit reaches
/// the slot (a slot made by a starting pipeline becomes consistent only once all
/// transactions running in the cluster at that time have ended).
pub async fn prepare_slot(db: &TestDb, config: &ListenerConfig) {
    let setup = waltap::setup::SetupOptions {
        slot: config.slot.clone(),
        publication: config.publication.clone(),
        tables: Vec::new(),
        create_publication: true,
        create_slot: true,
        temporary_slot: false,
        failover_slot: false,
        consumed_through: None,
    };
    if let Err(e) = waltap::setup::prepare(&db.client().await, &setup).await {
        panic!("setting up the slot: {e}");
    }
}

/// Starts a listener, panicking with the error when it cannot.
pub async fn start(config: ListenerConfig) -> Listener {
    match Listener::start(config).await {
        Ok(l) => l,
        Err(e) => panic!("listener did not start: {e}"),
    }
}

/// The next `n` events, acknowledging each; panics on an error or a timeout.
pub async fn take(listener: &mut Listener, n: usize) -> Vec<Event> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(EVENT_TIMEOUT, listener.next()).await {
            Err(_) => panic!(
                "timed out after {} of {n} events: {:?}",
                out.len(),
                json_all(&out)
            ),
            Ok(None) => panic!("listener ended after {} of {n} events", out.len()),
            Ok(Some(Err(e))) => panic!("listener failed after {} of {n} events: {e}", out.len()),
            Ok(Some(Ok(ev))) => {
                listener.ack(ev.position);
                out.push(ev);
            }
        }
    }
    out
}

/// The next event's JSON.
pub async fn take_json(listener: &mut Listener) -> Json {
    json(&take(listener, 1).await[0])
}

/// The error that ends the stream; panics if an event or nothing arrives instead.
pub async fn expect_error(listener: &mut Listener) -> waltap::Error {
    match tokio::time::timeout(EVENT_TIMEOUT, listener.next()).await {
        Err(_) => panic!("timed out waiting for an error"),
        Ok(None) => panic!("listener ended without an error"),
        Ok(Some(Ok(ev))) => panic!("expected an error, got event {}", json(&ev)),
        Ok(Some(Err(e))) => e,
    }
}

pub fn json(ev: &Event) -> Json {
    serde_json::to_value(ev).expect("events serialize")
}

pub fn json_all(evs: &[Event]) -> Vec<Json> {
    evs.iter().map(json).collect()
}

/// `confirmed_flush_lsn` of a slot, as an LSN number.
pub async fn confirmed_flush(db: &TestDb, slot: &str) -> Option<u64> {
    let client = db.client().await;
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("query slot");
    row.and_then(|r| r.get::<_, Option<String>>(0))
        .map(|s| s.parse::<waltap::Lsn>().expect("LSN").0)
}
