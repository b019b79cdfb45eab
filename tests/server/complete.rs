//! Subscriptions that pin one row by its primary key complete over SSE and WebSocket: the
//! `completed` item, then a normal end of the connection, with and without initial state.

use futures::StreamExt;
use serde_json::{json, Value as Json};
use tokio_tungstenite::tungstenite::Message;

use super::delivery::{urlencode, ws, Ws};
use super::{insert_orders, start, Server, Sse, ORDERS, TIMEOUT};
use crate::support::TestDb;

/// One subscription over either transport.
enum Client {
    Sse(Sse),
    Ws(Box<Ws>),
}

impl Client {
    async fn open(s: &Server, websocket: bool, id: i32, initial_state: bool) -> Client {
        let filter = urlencode(&json!({"where": {"id": id}}).to_string());
        let path =
            format!("/v1/subscribe?table=orders&filter={filter}&initialState={initial_state}");
        match websocket {
            true => Client::Ws(Box::new(ws(s, &path, ORDERS).await)),
            false => Client::Sse(Sse::open(s.get(&path, ORDERS)).await),
        }
    }

    /// The next item's kind (the SSE event: `change`, `snapshot` or the control item's
    /// type) and data; `None` once the server ended the connection normally.
    async fn next(&mut self) -> Option<(String, Json)> {
        let sock = match self {
            Client::Sse(sse) => return sse.next().await.map(|f| (f.event, f.data)),
            Client::Ws(sock) => sock,
        };
        loop {
            match tokio::time::timeout(TIMEOUT, sock.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let data: Json = serde_json::from_str(&t).unwrap();
                    let kind = match (&data["type"], &data["action"]) {
                        (Json::String(t), _) => t.clone(),
                        (_, a) if a == "snapshot" => "snapshot".into(),
                        _ => "change".into(),
                    };
                    return Some((kind, data));
                }
                Ok(Some(Ok(Message::Close(_)))) => {
                    let rest = tokio::time::timeout(TIMEOUT, sock.next()).await.unwrap();
                    assert!(rest.is_none(), "nothing after the close frame: {rest:?}");
                    return None;
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                other => panic!("expected a message or a close frame, got {other:?}"),
            }
        }
    }

    async fn expect(&mut self, kind: &str) -> Json {
        match self.next().await {
            Some((k, data)) if k == kind => data,
            other => panic!("expected {kind}, got {other:?}"),
        }
    }

    /// `completed` for `reason`, then the end of the connection.
    async fn completes(&mut self, reason: &str) -> Json {
        let done = self.expect("completed").await;
        assert_eq!(done["reason"], reason, "{done}");
        assert!(done["position"].is_string(), "{done}");
        let end = self.next().await;
        assert!(
            end.is_none(),
            "the connection ends after completed: {end:?}"
        );
        done
    }
}

#[tokio::test]
async fn one_row_subscriptions_complete_over_sse_and_websocket() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    let c = db.client().await;
    for websocket in [false, true] {
        let base = if websocket { 100 } else { 0 };
        insert_orders(&db, base + 2..base + 3).await;

        // Live: the row's changes, then completed after its delete.
        let mut live = Client::open(&s, websocket, base + 1, false).await;
        assert!(live.expect("initialized").await["position"].is_string());
        insert_orders(&db, base + 1..base + 2).await;
        c.execute("DELETE FROM orders WHERE id = $1", &[&(base + 1)])
            .await
            .unwrap();
        assert_eq!(live.expect("change").await["created"]["id"], base + 1);
        let delete = live.expect("change").await;
        assert_eq!(delete["action"], "delete");
        assert_eq!(
            live.completes("deleted").await["position"],
            delete["position"]
        );

        // Initial state with the row: the row, the marker, its delete, completed.
        let mut there = Client::open(&s, websocket, base + 2, true).await;
        assert!(there.expect("initialized").await["position"].is_string());
        assert_eq!(there.expect("snapshot").await["row"]["id"], base + 2);
        assert!(there.expect("snapshotComplete").await["position"].is_string());
        c.execute("DELETE FROM orders WHERE id = $1", &[&(base + 2)])
            .await
            .unwrap();
        assert_eq!(there.expect("change").await["action"], "delete");
        there.completes("deleted").await;

        // Initial state without the row: completed right after the marker.
        let mut missing = Client::open(&s, websocket, base + 99, true).await;
        missing.expect("initialized").await;
        let marker = missing.expect("snapshotComplete").await;
        let done = missing.completes("notFound").await;
        assert_eq!(
            done["position"], marker["position"],
            "transport {websocket}"
        );
    }
    s.stop().await;
    db.teardown().await;
}
