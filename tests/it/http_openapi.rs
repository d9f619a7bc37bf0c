//! `docs/openapi.json` describes exactly the routes the router serves: the
//! list the router is built from equals the document's, and each route
//! the document names is answered by a handler of the real daemon (not the
//! unknown-URL fallback).

use std::collections::BTreeSet;

use crate::common::*;

fn documented() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete", "head", "options"]
                .contains(&method.as_str())
            {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn every_served_route_is_documented_and_every_documented_route_is_served() {
    let served: BTreeSet<(String, String)> = nightshift::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        served.len(),
        nightshift::api::ROUTES.len(),
        "a route is listed twice"
    );
    let documented = documented();
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "served but not in docs/openapi.json: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "in docs/openapi.json but not served: {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_answers_every_documented_route_with_a_handler() {
    let provider = LoopbackProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = ProviderSpec {
        name: "alpha",
        base_url: provider.base_url(),
        model: "alpha-chat",
        input_per_mtok: 0.1,
        output_per_mtok: 0.4,
        extra: "",
    };
    let daemon = Daemon::start(dir.path(), &config_toml(dir.path(), &[spec]));
    let client = daemon.unix_client().await;
    for (method, path) in documented() {
        let path = path.replace("{id}", "x1");
        let method = hyper::Method::from_bytes(method.as_bytes()).unwrap();
        let (status, body) = client
            .send(method.clone(), &path, None, Vec::new())
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let code = body["error"]["code"].as_str().unwrap_or_default();
        assert!(
            code != "unknown_url" && code != "method_not_allowed",
            "{method} {path}: {status} {body}"
        );
    }
}
