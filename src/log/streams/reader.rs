//! Reading the log for a consumer: pages after its cursor, checked against the pruned
//! mark in the same snapshot, passed through the stream's filter and view.

use super::consumer::{RawRow, StreamItem};
use super::cursor::Mark;
use super::lease::Shared;
use super::{split_tables, table_schemas, OpenOptions, TX_END};

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast;
use tokio_postgres::Client;

use crate::event::{Event, SchemaConflict, TableName};
use crate::filter::FilteredView;
use crate::filter::{CompiledFilter, Decision, Filter};
use crate::initial::SnapshotRow;
use crate::log::jetstream::Follower;
use crate::log::pool::{Conn, Wake};
use crate::log::typed::TableTypes;
use crate::log::{EventLog, StoreError, Stored};

/// The pruned mark of `source` (retention deleted every event at or below it), and
/// whether the event at `cursor` is the last of its transaction (`None` when the log
/// does not hold it).
async fn pruned_mark_and_tx_end(
    store: &Conn,
    source: &str,
    cursor: Mark,
) -> Result<(Mark, Option<bool>), StoreError> {
    let statement = store
        .prepare_cached(
            "SELECT coalesce(max(pruned_lsn), 0), coalesce(max(pruned_ordinal), -1),
                    (SELECT tx_last FROM waltap.events
                     WHERE source = $1 AND commit_lsn = $2 AND ordinal = $3)
             FROM waltap.progress WHERE source = $1",
        )
        .await
        .map_err(StoreError::sql("read the pruned mark"))?;
    let row = store
        .query_one(&statement, &[&source, &cursor.lsn, &cursor.ordinal])
        .await
        .map_err(StoreError::sql("read the pruned mark"))?;
    let pruned = Mark {
        lsn: row.get(0),
        ordinal: row.get(1),
    };
    Ok((pruned, row.get(2)))
}

/// One page of the log after a mark, with the pruned mark read in the same snapshot.
pub(super) const PAGE: &str = "WITH mark AS (
                     SELECT coalesce(max(pruned_lsn), 0) AS lsn, coalesce(max(pruned_ordinal), -1) AS ord
                     FROM waltap.progress WHERE source = $1)
                 SELECT mark.lsn, mark.ord, e.commit_lsn, e.ordinal, e.tx_last, e.body
                 FROM mark LEFT JOIN LATERAL (
                     SELECT commit_lsn, ordinal, tx_last,
                            CASE WHEN (schema_name, table_name) IN
                                      (SELECT * FROM unnest($6::text[], $7::text[]))
                                 THEN event::text END AS body
                     FROM waltap.events
                     WHERE source = $1
                       AND (commit_lsn, ordinal) > ($2, $3)
                       AND (commit_lsn, ordinal) <= ($4, $5)
                     ORDER BY commit_lsn, ordinal
                     LIMIT $8) e ON true
                 ORDER BY e.commit_lsn, e.ordinal";

/// Where a reader's pages come from.
pub(super) enum Pages {
    /// `waltap.events`, woken by the appender's notifications.
    Postgres {
        source: String,
        /// The pool's append notifications.
        notifications: broadcast::Receiver<Wake>,
        notifications_open: bool,
        schemas: Vec<String>,
        tables: Vec<String>,
    },
    /// A JetStream log, followed from the reader's start.
    JetStream(Box<Follower>),
}

/// The reading side of a consumer: pages of the log through the stream's view.
pub(super) struct Reader {
    pub(super) shared: Arc<Shared>,
    pub(super) pages: Pages,
    pub(super) page_size: i64,
    pub(super) view: FilteredView<RawRow>,
    /// Column types per table, only when the stream has a filter.
    pub(super) types: Vec<TableTypes>,
    /// The last event read (the bound of the next page).
    pub(super) read_after: Mark,
    /// The last event the consumer is owed nothing up to: when retention pruned past it,
    /// the consumer would miss events.
    pub(super) needed_after: Mark,
    /// Events up to here were delivered before (the cursor at open); they are read again
    /// only for their transaction's numbering.
    pub(super) delivered_through: Mark,
    /// The last event this stream delivered belongs to a transaction of known size that
    /// has not ended yet.
    pub(super) counted_tx_open: bool,
    pub(super) decided: Vec<Event<RawRow>>,
    pub(super) out: VecDeque<Event<RawRow>>,
    /// `schemaChange` items, each to hand out before the first event at or after its mark,
    /// or the end of the consumer after the events before its mark.
    pub(super) reshapes: VecDeque<(Mark, Result<StreamItem, SchemaConflict>)>,
    pub(super) failed: bool,
    /// The initial state still to hand out, before the changes.
    pub(super) snapshot: Option<SnapshotPhase>,
}

/// Where a consumer is in its stream's copied initial state.
pub(super) struct SnapshotPhase {
    /// The last row read (rows are numbered from 1).
    pub(super) next: i64,
    pub(super) total: i64,
    pub(super) out: VecDeque<SnapshotRow<RawRow>>,
}

impl Reader {
    pub(super) async fn new(
        shared: Arc<Shared>,
        row: &tokio_postgres::Row,
        options: &OpenOptions,
        notifications: broadcast::Receiver<Wake>,
    ) -> Result<Reader, StoreError> {
        let source: String = row.get(0);
        let stored_tables: Vec<String> = row.get(1);
        let filter: Option<Filter> = row
            .get::<_, Option<String>>(2)
            .map(|f| {
                f.parse::<Filter>().map_err(|e| StoreError::Corrupt {
                    position: format!("stream {}", shared.name),
                    message: format!("stored filter: {e}"),
                })
            })
            .transpose()?;
        let cursor = shared.state().acked;
        let client = shared.pool.get().await?;
        // Whether the cursor's event ends its transaction, as the Postgres log tells here
        // (the JetStream log finds out while it seeks the cursor).
        let mut cursor_ends_tx = false;
        if let EventLog::Postgres = shared.pool.log() {
            let (pruned, tx_end) = pruned_mark_and_tx_end(&client, &source, cursor).await?;
            if pruned > cursor {
                return Err(stale(&shared.name, cursor, pruned));
            }
            cursor_ends_tx = tx_end == Some(true);
        }
        let tables: Vec<TableName> = stored_tables.iter().map(|t| TableName::parse(t)).collect();
        let (view, types) = match &filter {
            None => (
                FilteredView::for_tables(
                    tables
                        .iter()
                        .map(|t| (t.clone(), CompiledFilter::accept_all()))
                        .collect(),
                ),
                Vec::new(),
            ),
            Some(filter) => compile(&shared, &client, options, &tables, filter).await?,
        };
        drop(client);

        // Resuming inside a transaction: read it from its start, so that its numbering
        // is the one the consumer saw before. A cursor at a transaction's last event (where
        // a feed page usually ends) skips it whole: reading it again cost a page of 1,000
        // a second read and parse of the transaction before it.
        let (pages, read_after) = match shared.pool.log() {
            EventLog::Postgres => {
                let (schemas, tables) = split_tables(&stored_tables);
                let pages = Pages::Postgres {
                    source,
                    notifications,
                    notifications_open: true,
                    schemas,
                    tables,
                };
                (pages, cursor.read_after(cursor_ends_tx))
            }
            EventLog::JetStream(log) => {
                log.check_source(&source)?;
                let (follower, read_after) = log.follow_resuming(cursor, &tables).await?;
                (Pages::JetStream(Box::new(follower)), read_after)
            }
        };
        Ok(Reader {
            shared,
            pages,
            page_size: options.page_size.clamp(1, 100_000) as i64,
            view,
            types,
            read_after,
            needed_after: cursor,
            delivered_through: cursor,
            counted_tx_open: false,
            decided: Vec::new(),
            out: VecDeque::new(),
            reshapes: VecDeque::new(),
            failed: false,
            snapshot: None,
        })
    }

    /// The next row of the initial state, its end marker, or the next change.
    pub(super) async fn next_stream_item(&mut self) -> Option<Result<StreamItem, StoreError>> {
        if self.failed {
            return None;
        }
        if self.snapshot.is_none() {
            if let Some(item) = self.next_reshape().await {
                return Some(item);
            }
            return self.next_item().await.map(|r| r.map(StreamItem::Event));
        }
        match self.next_snapshot_row().await {
            Ok(Some(row)) => Some(Ok(StreamItem::Snapshot(row))),
            Ok(None) => {
                self.snapshot = None;
                let cursor = self.delivered_through;
                // Always a position, even before every change (LSN 0): it is the cursor
                // that acknowledges the marker.
                Some(Ok(StreamItem::SnapshotComplete {
                    position: Some(cursor.position()),
                }))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }

    pub(super) async fn next_snapshot_row(
        &mut self,
    ) -> Result<Option<SnapshotRow<RawRow>>, StoreError> {
        let Some(phase) = self.snapshot.as_mut() else {
            return Ok(None);
        };
        if phase.out.is_empty() && phase.next < phase.total {
            let client = self.shared.pool.get().await?;
            if self.shared.renewal_due() {
                self.shared.renew(&client).await?;
            }
            let rows = client
                .query(
                    "SELECT seq, row::text FROM waltap.snapshot_rows
                     WHERE stream = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&self.shared.name, &phase.next, &self.page_size],
                )
                .await
                .map_err(StoreError::sql("read an initial state"))?;
            // Back to the pool before recording below takes one: consumers that share a
            // pool would otherwise each hold one and wait for another, all of them.
            drop(client);
            for r in rows {
                let seq: i64 = r.get(0);
                let mut row: SnapshotRow<RawRow> =
                    serde_json::from_str(r.get(1)).map_err(|e| StoreError::Corrupt {
                        position: format!(
                            "initial state of stream {}, row {seq}",
                            self.shared.name
                        ),
                        message: e.to_string(),
                    })?;
                row.seq = Some(seq as u64);
                phase.next = seq;
                phase.out.push_back(row);
            }
            if phase.out.is_empty() {
                // Fewer rows than counted: the copy was deleted (stream reset or deleted).
                phase.next = phase.total;
            } else {
                let through = phase.next;
                self.shared.record_delivered(None, Some(through)).await?;
            }
        }
        Ok(phase.out.pop_front())
    }

    pub(super) async fn next_item(&mut self) -> Option<Result<Event<RawRow>, StoreError>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(ev) = self.out.pop_front() {
                self.shared.state().yielded = Some(Mark::of(ev.position));
                return Some(Ok(ev));
            }
            if let Err(e) = self.fill().await {
                self.failed = true;
                return Some(Err(e));
            }
        }
    }

    /// Reads until there is something to hand out, waiting for appends when caught up.
    pub(super) async fn fill(&mut self) -> Result<(), StoreError> {
        while self.out.is_empty() && !self.ending() {
            if self.shared.renewal_due() {
                let client = self.shared.pool.get().await?;
                self.shared.renew(&client).await?;
            }
            if let Pages::Postgres { notifications, .. } = &mut self.pages {
                // Wake-ups from before this read are answered by it.
                while matches!(
                    notifications.try_recv(),
                    Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_))
                ) {}
            }
            let last = self.fetch(self.page_size, None).await?;
            let Some(last) = last else {
                self.caught_up().await?;
                self.wait_for_appends().await?;
                continue;
            };
            if !last.tx_last && self.counted_tx_open {
                // Hand out the transaction whole, rather than hold it over pages.
                self.fetch(i64::MAX, Some(last.at.lsn)).await?;
            }
        }
        Ok(())
    }

    /// Reads the next events (at most `limit`; only of transaction `within` if given)
    /// into the view; returns the last one read.
    pub(super) async fn fetch(
        &mut self,
        limit: i64,
        within: Option<i64>,
    ) -> Result<Option<Stored>, StoreError> {
        let (pruned, stored) = match &mut self.pages {
            Pages::Postgres {
                source,
                schemas,
                tables,
                ..
            } => {
                let upto = Mark {
                    lsn: within.unwrap_or(i64::MAX),
                    ordinal: TX_END,
                };
                let client = self.shared.pool.get().await?;
                postgres_page(
                    &client,
                    source,
                    self.read_after,
                    upto,
                    schemas,
                    tables,
                    limit,
                )
                .await?
            }
            Pages::JetStream(follower) => {
                let limit = usize::try_from(limit).unwrap_or(usize::MAX);
                let page = follower.page(limit, within).await?;
                (page.gap_through, page.events)
            }
        };
        if let Some(pruned) = pruned.filter(|p| *p > self.needed_after) {
            return Err(stale(&self.shared.name, self.needed_after, pruned));
        }
        let mut last = None;
        for stored in stored {
            self.take(&stored)?;
            last = Some(stored);
        }
        if last.is_some() {
            self.shared.state().quiet_through = None;
        }
        for ev in self.decided.drain(..) {
            if Mark::of(ev.position) > self.delivered_through {
                self.out.push_back(ev);
            }
        }
        let handed = self.out.back().map(|ev| Mark::of(ev.position));
        self.shared.record_delivered(handed, None).await?;
        Ok(last)
    }

    pub(super) fn take(&mut self, stored: &Stored) -> Result<(), StoreError> {
        self.read_after = stored.at;
        self.needed_after = self.needed_after.max(stored.at);
        let mine = match &stored.body {
            // Nothing after a schema change that ends the consumer is handed out.
            Some(text) if !self.ending() => self.decide(text, stored.at)?,
            _ => None,
        };
        if let Some(ev) = &mine {
            self.counted_tx_open = ev.tx.total.is_some();
        }
        if stored.tx_last {
            self.counted_tx_open = false;
        }
        self.view
            .push_decided(mine, stored.tx_last, &mut self.decided);
        Ok(())
    }

    /// The event as this stream delivers it, or `None` when its filter skips it.
    pub(super) fn decide(
        &mut self,
        text: &str,
        at: Mark,
    ) -> Result<Option<Event<RawRow>>, StoreError> {
        let mut ev: Event<RawRow> =
            serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
                position: at.position().to_string(),
                message: e.to_string(),
            })?;
        if let Some(change) = ev.schema_change.take() {
            self.reshape(&change, at)?;
        }
        let Some(filter) = self.view.filter_for(&ev.schema, &ev.table) else {
            return Ok(None);
        };
        let types = self
            .types
            .iter()
            .find(|t| *t.table.schema == *ev.schema && *t.table.table == *ev.table);
        let Some(types) = types else {
            return Ok(Some(ev)); // no filter
        };
        Ok(match filter.evaluate(&types.typed_raw(&ev)) {
            Decision::Skip => None,
            Decision::Deliver { transition } => {
                ev.transition = transition;
                Some(ev)
            }
        })
    }

    /// Caught up with nothing held back: once the consumer has acknowledged all it got,
    /// the cursor may pass the events the filter skipped.
    pub(super) async fn caught_up(&mut self) -> Result<(), StoreError> {
        if self.view.holds_events() {
            return Ok(());
        }
        let through = self.read_after.max(self.delivered_through);
        let advance = {
            let mut state = self.shared.state();
            state.quiet_through = Some(through);
            // Not past the marker's position before the consumer acknowledged the marker.
            !state.snapshot_open
                && state.yielded.is_none_or(|y| state.acked >= y)
                && state.acked < through
        };
        if advance {
            let client = self.shared.pool.get().await?;
            self.shared.store_cursor(&client, through).await?;
        }
        Ok(())
    }

    /// Until the appender announces a commit of this source (a message arrives, on
    /// JetStream), or the lease needs renewing.
    pub(super) async fn wait_for_appends(&mut self) -> Result<(), StoreError> {
        let renew = tokio::time::sleep(self.shared.lease / 3);
        tokio::pin!(renew);
        let (source, notifications, notifications_open) = match &mut self.pages {
            Pages::JetStream(follower) => {
                tokio::select! {
                    _ = &mut renew => return Ok(()),
                    waited = follower.wait() => return waited,
                }
            }
            Pages::Postgres {
                source,
                notifications,
                notifications_open,
                ..
            } => (source, notifications, notifications_open),
        };
        loop {
            if !*notifications_open {
                // The connection is gone; the next query reports why.
                return Ok(());
            }
            tokio::select! {
                _ = &mut renew => return Ok(()),
                n = notifications.recv() => match n {
                    Ok(Some(s)) if *s == **source => return Ok(()),
                    Ok(Some(_)) => {}
                    // The listening connection was reopened, or this reader fell behind:
                    // appends may have been missed.
                    Ok(None) | Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                    Err(broadcast::error::RecvError::Closed) => *notifications_open = false,
                },
            }
        }
    }
}

/// One page of `waltap.events` after `after` and up to `upto`, with the pruned mark read
/// in the same statement.
async fn postgres_page(
    client: &crate::pg::PooledClient,
    source: &str,
    after: Mark,
    upto: Mark,
    schemas: &[String],
    tables: &[String],
    limit: i64,
) -> Result<(Option<Mark>, Vec<Stored>), StoreError> {
    let page = client
        .prepare_cached(PAGE)
        .await
        .map_err(StoreError::sql("prepare the page query"))?;
    let rows = client
        .query(
            &page,
            &[
                &source,
                &after.lsn,
                &after.ordinal,
                &upto.lsn,
                &upto.ordinal,
                &schemas,
                &tables,
                &limit,
            ],
        )
        .await
        .map_err(StoreError::sql("read the log"))?;
    let pruned = rows.first().map(|first| Mark {
        lsn: first.get(0),
        ordinal: first.get(1),
    });
    let stored = rows
        .iter()
        .filter_map(|row| {
            // The empty page's one row carries only the mark.
            let (lsn, ordinal, tx_last): (Option<i64>, Option<i32>, Option<bool>) =
                (row.get(2), row.get(3), row.get(4));
            Some(Stored {
                at: Mark {
                    lsn: lsn?,
                    ordinal: ordinal?,
                },
                tx_last: tx_last?,
                body: row.get(5),
            })
        })
        .collect();
    Ok((pruned, stored))
}

pub(super) fn stale(name: &str, cursor: Mark, pruned: Mark) -> StoreError {
    StoreError::StaleCursor {
        name: name.to_owned(),
        cursor: cursor.position().to_string(),
        pruned: pruned.position().to_string(),
    }
}

/// The view and column types of a filtered stream. A table that no longer exists gets
/// no filter (its events still in the log are delivered, never dropped unseen).
pub(super) async fn compile(
    shared: &Shared,
    client: &Client,
    options: &OpenOptions,
    tables: &[TableName],
    filter: &Filter,
) -> Result<(FilteredView<RawRow>, Vec<TableTypes>), StoreError> {
    let separate;
    let catalog_client = match &options.catalog {
        Some(c) => {
            separate = c.connect_sql().await?;
            &separate
        }
        None => client,
    };
    let mut view_tables = Vec::with_capacity(tables.len());
    let mut types = Vec::with_capacity(tables.len());
    for (t, schema) in tables
        .iter()
        .zip(table_schemas(catalog_client, tables).await?)
    {
        let Some(schema) = schema else {
            tracing::warn!(stream = %shared.name, table = %t, "table no longer exists: its events are delivered unfiltered");
            view_tables.push((t.clone(), CompiledFilter::accept_all()));
            continue;
        };
        view_tables.push((t.clone(), filter.compile(&schema)?));
        types.push(TableTypes::new(t.clone(), schema));
    }
    Ok((FilteredView::for_tables(view_tables), types))
}
