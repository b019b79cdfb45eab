//! Where a hub's changes come from: a replication slot of its own (a [`Listener`]), or a
//! feed another module runs for it ([`FeedHandle`]), such as the event log's tail that lets
//! every member of a group serve subscriptions from the one walsender of its leader.
//!
//! Both give the same [`Delivery`] items in commit order; the differences the fan-out
//! task cares about are here: only a slot is acknowledged, and where each starts.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::event::Position;
use crate::source::pipeline::{Delivery, Listener, ListenerConfig};

/// A running feed of changes that is not a slot of the hub's own.
pub(crate) struct FeedHandle {
    /// The position after which its first delivery lies.
    pub start: Position,
    /// Changes and watermarks in commit order; an error ends the feed (changes may have
    /// been missed), and so does the channel closing.
    pub deliveries: mpsc::Receiver<Result<Delivery, Error>>,
    /// Stops the task behind the feed.
    pub stop: CancellationToken,
}

/// Starts a [`FeedHandle`]: called when the hub starts, and again after a feed ended with an
/// error. It is given the hub's `down` flag, to set while the feed cannot read (it
/// reconnects by itself, missing nothing, so its subscriptions go on; `/healthz` and new
/// subscriptions see the flag).
#[derive(Clone)]
pub(crate) struct FeedStarter(Arc<StartFeed>);

type StartFeed =
    dyn Fn(Arc<AtomicBool>) -> BoxFuture<'static, Result<FeedHandle, Error>> + Send + Sync;

impl FeedStarter {
    pub(crate) fn new(
        start: impl Fn(Arc<AtomicBool>) -> BoxFuture<'static, Result<FeedHandle, Error>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        FeedStarter(Arc::new(start))
    }
}

impl fmt::Debug for FeedStarter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FeedStarter")
    }
}

/// What the fan-out task reads.
// One per hub, never moved on the hot path: boxing the listener would gain nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Upstream {
    Slot(Listener),
    Feed(FeedHandle),
}

impl Upstream {
    /// Opens the slot, or starts the feed when one is configured.
    pub(super) async fn start(
        listener: &ListenerConfig,
        feed: Option<&FeedStarter>,
        down: &Arc<AtomicBool>,
    ) -> Result<Upstream, Error> {
        match feed {
            Some(start) => (start.0)(down.clone()).await.map(Upstream::Feed),
            None => Listener::start(listener.clone()).await.map(Upstream::Slot),
        }
    }

    /// The position before the first change this upstream delivers.
    pub(super) fn start_position(&self) -> Position {
        match self {
            Upstream::Slot(l) => Position::before_lsn(l.start_lsn()),
            Upstream::Feed(f) => f.start,
        }
    }

    pub(super) async fn next_delivery(&mut self) -> Option<Result<Delivery, Error>> {
        match self {
            Upstream::Slot(l) => l.next_delivery().await,
            Upstream::Feed(f) => f.deliveries.recv().await,
        }
    }

    /// Offered to every subscriber counts as handled: a slot is confirmed up to it. A feed
    /// is someone else's to confirm.
    pub(super) fn ack(&self, position: Position) {
        if let Upstream::Slot(l) = self {
            l.ack(position);
        }
    }

    pub(super) async fn shutdown(self) {
        match self {
            Upstream::Slot(l) => l.shutdown().await,
            Upstream::Feed(f) => f.stop.cancel(),
        }
    }
}
