//! The application: what runs in one `waltap serve` process, and in what order it stops.
//!
//! A process is a member of the group on its slot ([`crate::log::leader`]): while it
//! leads, its pipeline reads the slot and appends to the event log; either way it serves
//! the whole HTTP API ([`crate::server`]). Its subscription hub is fed from the event log
//! (the log's tail), not from a slot of its own, so a group of N members costs the
//! source database one walsender, the leader's, and a subscription goes on unchanged
//! when leadership moves.
//!
//! Shutdown is ordered: the pipeline stops at once (it confirms the slot up to what the
//! log holds and hands leadership over, so a follower takes over while this member's
//! sessions drain); the server stops accepting and ends every open delivery connection
//! cleanly (a stream consumer releases its lease); then the hub stops.

use tokio_util::sync::CancellationToken;

use crate::hub::{Hub, HubConfig};
use crate::server::{Http, ServerConfig, ServerError};

/// The temporary slot of a member's subscriptions when the log is on JetStream: the
/// source's slot name, cut to leave room, and 16 random characters (not the process id:
/// members in containers all run as process 1). Slot names are at most 63 characters of
/// `a-z`, `0-9` and `_`.
fn subscription_slot(slot: &str) -> String {
    let random = ulid::Ulid::new().to_string().to_ascii_lowercase();
    // The last 16 characters of a ULID are its 80 random bits.
    let suffix = format!("_sub_{}", &random[random.len() - 16..]);
    let keep = slot
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .take_while(|end| *end + suffix.len() <= 63)
        .last()
        .unwrap_or(0);
    format!("{}{suffix}", &slot[..keep])
}

/// Runs the group member, the hub and the API on `listener` until `cancel` fires or the
/// pipeline fails definitively.
pub async fn serve(
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) -> Result<(), ServerError> {
    let appender = &config.appender;
    let slot = appender.listener.slot.clone();
    let mut hub_config = HubConfig::new(appender.listener.clone());
    hub_config.subscriber_queue = config.subscriber_queue;
    // A server started while Postgres restarts comes up and connects when it can.
    hub_config.start_offline = true;
    if appender.jetstream.is_some() {
        // The Postgres log is empty when events go to JetStream: subscriptions read a
        // temporary slot of this member's own (one more walsender per member), which
        // Postgres drops when the member's connection ends.
        hub_config.listener.slot = subscription_slot(&slot);
        hub_config.listener.temporary_slot = true;
        hub_config.listener.create_slot = true;
    } else {
        hub_config.feed = Some(crate::log::tail::feed(
            appender.store.clone(),
            slot.clone(),
            appender.listener.source.clone(),
        ));
    }
    let hub = Hub::start(hub_config).await.map_err(ServerError::Hub)?;
    let http = Http::new(&config, hub)?;

    let mut appender_config = config.appender.clone();
    appender_config.appended = Some(http.appended_counter());
    let pipeline_stop = cancel.child_token();
    let mut pipeline = tokio::spawn(crate::log::leader::run(
        appender_config,
        config.group.clone(),
        http.membership(),
        pipeline_stop.clone(),
    ));

    let addr = listener.local_addr()?;
    tracing::info!(%addr, slot = %slot, "serving");
    let mut server = http.accept(listener, &config);

    let mut pipeline_done = None;
    let served = tokio::select! {
        _ = cancel.cancelled() => None,
        served = &mut server => Some(served),
        done = &mut pipeline => {
            http.pipeline_stopped();
            pipeline_done = Some(done);
            None
        }
    };
    // The leader hands over first: a follower appends while this member's sessions drain.
    pipeline_stop.cancel();
    http.stop(config.shutdown_grace).await;
    let served = match served {
        Some(s) => s,
        None => server.await,
    };
    let done = match pipeline_done {
        Some(done) => done,
        None => pipeline.await,
    };
    let mut failure = None;
    match done {
        Ok(Err(e)) => failure = Some(ServerError::Pipeline(Box::new(e))),
        Ok(Ok(())) => {}
        Err(e) => tracing::error!(error = %crate::error::report(&e), "the pipeline task failed"),
    }
    http.shutdown().await;
    tracing::info!("server stopped");
    match failure {
        Some(e) => Err(e),
        None => served.map_err(|e| ServerError::Io(std::io::Error::other(e))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn subscription_slots_are_valid_and_distinct() {
        let long = "s".repeat(63);
        for slot in ["waltap", long.as_str()] {
            let a = super::subscription_slot(slot);
            let b = super::subscription_slot(slot);
            assert_ne!(a, b);
            assert!(a.len() <= 63, "{a}");
            assert!(a
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'));
        }
        assert!(super::subscription_slot("waltap").starts_with("waltap_sub_"));
    }
}
