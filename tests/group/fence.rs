//! Fencing at the log: a commit under a term that is no longer the source's current one
//! fails with `Fenced` and changes nothing.

use std::time::Duration;

use waltap::log::{LogWriter, PgLog, StoreError};
use waltap::SourceConfig;

use crate::support::TestDb;

#[tokio::test]
async fn a_commit_under_an_old_term_is_fenced() {
    let db = TestDb::new().await;
    let store = SourceConfig::parse(&db.url()).unwrap();
    let source = db.unique_name("fenced");
    let mut log = PgLog::open(&store, &source).await.unwrap();
    log.record_publication("p").await.unwrap();
    let c = db.client().await;
    let set_term = |term: i64| {
        let (c, source) = (&c, &source);
        async move {
            c.execute(
                "UPDATE waltap.progress SET term = $2 WHERE source = $1",
                &[source, &term],
            )
            .await
            .unwrap();
        }
    };
    set_term(1).await;
    log.fence(1, Duration::from_secs(5)).await.unwrap();
    let mark = log.progress().await.unwrap().expect("a progress row");
    log.commit(mark).await.expect("the current term commits");

    // Another member took over.
    set_term(2).await;
    match log.commit(mark).await {
        Err(StoreError::Fenced { term: 1, .. }) => {}
        other => panic!("expected Fenced, got {other:?}"),
    }
    // The connection is usable afterwards (the transaction was rolled back).
    assert_eq!(log.progress().await.unwrap(), Some(mark));
    db.teardown().await;
}
