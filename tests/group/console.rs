//! The console of a group: any member lists every member and the leader, from the store.

use serde_json::Value as Json;

use super::takeover::{finish, start};
use super::{Member, PATIENCE};
use crate::server::ADMIN;
use crate::support;

async fn console(m: &Member, key: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(format!("{}/v1/console", m.url));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn a_follower_lists_the_group_and_its_leader() {
    let (db, g, _c, members) = start(2).await;
    let leader = g.leader(&members).await;
    let follower = &members[1 - leader];
    support::wait_for("both members listed", PATIENCE, || async {
        let j: Json = console(follower, Some(ADMIN)).await.json().await.unwrap();
        j["group"]["members"]
            .as_array()
            .is_some_and(|m| m.len() == 2)
    })
    .await;
    let j: Json = console(follower, Some(ADMIN)).await.json().await.unwrap();
    assert_eq!(j["server"]["role"], "follower", "{j}");
    let listed = &j["group"]["members"];
    assert_eq!(listed[0]["leader"], true, "{j}");
    assert_eq!(listed[1]["leader"], false, "{j}");
    let pid = members[leader].child.id().unwrap();
    assert!(
        listed[0]["member"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{pid}")),
        "{j}"
    );
    assert_eq!(j["group"]["leader"]["member"], listed[0]["member"], "{j}");
    assert_eq!(j["group"]["leader"]["active"], true, "{j}");

    // The figures need a key; the page that asks for it does not.
    assert_eq!(console(follower, None).await.status(), 401);
    let page = reqwest::get(format!("{}/", follower.url)).await.unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    assert!(page.text().await.unwrap().contains("id=\"key-form\""));
    finish(db, members).await;
}
