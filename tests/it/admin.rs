//! The admin API: liveness and readiness (also while draining), status, config with
//! secrets redacted, token protection, and reloads through `POST /reload`.

use crate::common;

use std::time::Duration;

use common::*;

fn upstream_toml(addrs: &[std::net::SocketAddr]) -> String {
    let list: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect();
    format!(
        "[[routes]]\nname = \"all\"\nupstream = \"app\"\n\n[upstreams.app]\nbackends = [{}]\n",
        list.join(", ")
    )
}

#[tokio::test]
async fn health_readiness_and_status_describe_the_running_proxy() {
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let proxy = Proxy::start(&format!(
        "{}[upstreams.app.health]\ninterval = \"100ms\"\ntimeout = \"50ms\"\nunhealthy_threshold = 1\n",
        upstream_toml(&[a.addr, b.addr])
    ))
    .await;
    assert_eq!(get(&proxy.admin_url("/healthz")).await.status, 200);
    assert_eq!(get(&proxy.admin_url("/readyz")).await.status, 200);
    for _ in 0..4 {
        get(&proxy.url("/")).await;
    }
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["pid"], std::process::id());
    assert_eq!(status["generation"], 1);
    assert!(status["uptime_seconds"].as_f64().is_some());
    let backends = status["upstreams"]["app"]["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(backends.len(), 2);
    for backend in &backends {
        for field in [
            "addr",
            "healthy",
            "ejected",
            "in_flight",
            "weight",
            "requests",
            "failures",
        ] {
            assert!(backend.get(field).is_some(), "{field} missing in {backend}");
        }
        assert_eq!(backend["requests"], 2);
    }

    // A backend failing its checks shows up as unhealthy.
    post(&format!("http://{}/health/down", b.addr), vec![]).await;
    let shows = eventually(Duration::from_secs(3), async || {
        let status = get(&proxy.admin_url("/status")).await.json();
        status["upstreams"]["app"]["backends"][1]["healthy"] == false
    })
    .await;
    assert!(shows, "/status never showed the backend as unhealthy");
}

#[tokio::test]
async fn readyz_turns_503_while_draining() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&upstream_toml(&[a.addr])).await;
    let admin = proxy.admin_url("/readyz");
    let slow_url = proxy.url("/delay/800");
    let slow = tokio::spawn(async move { get(&slow_url).await.status });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let state = proxy.state.clone();
    let drained = tokio::spawn(proxy.shutdown());
    let draining = eventually(Duration::from_secs(2), async || state.is_draining()).await;
    assert!(draining);
    assert_eq!(get(&admin).await.status, 503);
    assert_eq!(slow.await.expect("slow"), 200);
    drained.await.expect("drained");
}

#[tokio::test]
async fn a_token_guards_everything_but_liveness_and_readiness() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&format!(
        "[admin]\ntoken = \"hunter2\"\n{}",
        upstream_toml(&[a.addr])
    ))
    .await;
    assert_eq!(get(&proxy.admin_url("/healthz")).await.status, 200);
    assert_eq!(get(&proxy.admin_url("/readyz")).await.status, 200);
    for path in ["/status", "/config", "/"] {
        assert_eq!(
            get(&proxy.admin_url(path)).await.status,
            401,
            "{path} without a token"
        );
        let wrong = get_with(
            &proxy.admin_url(path),
            &[("authorization", "Bearer hunter3")],
        )
        .await;
        assert_eq!(wrong.status, 401, "{path} with a wrong token");
        let right = get_with(
            &proxy.admin_url(path),
            &[("authorization", "Bearer hunter2")],
        )
        .await;
        assert_eq!(right.status, 200, "{path} with the token");
        // The scheme's case does not matter (RFC 9110 11.1).
        let lower = get_with(
            &proxy.admin_url(path),
            &[("authorization", "bearer hunter2")],
        )
        .await;
        assert_eq!(lower.status, 200, "{path} with `bearer`");
    }
    let config = get_with(
        &proxy.admin_url("/config"),
        &[("authorization", "Bearer hunter2")],
    )
    .await;
    assert!(
        !config.text().contains("hunter2"),
        "the token leaked: {}",
        config.text()
    );
    assert_eq!(config.json()["admin"]["token"], "<redacted>");
}

#[tokio::test]
async fn head_is_served_where_get_is_and_a_405_names_the_methods() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&upstream_toml(&[a.addr])).await;
    for path in ["/status", "/metrics", "/config", "/", "/healthz"] {
        let (answer, _) = raw_exchange(
            proxy.admin,
            format!("HEAD {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "HEAD {path}: {answer}");
        assert!(
            answer.ends_with("\r\n\r\n"),
            "HEAD {path} has a body: {answer}"
        );
    }
    for (method, path, allow) in [
        ("DELETE", "/status", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
        ("GET", "/reload", "POST"),
    ] {
        let (answer, _) = raw_exchange(
            proxy.admin,
            format!("{method} {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 405"),
            "{method} {path}: {answer}"
        );
        assert!(
            answer
                .to_ascii_lowercase()
                .contains(&format!("allow: {}", allow.to_ascii_lowercase())),
            "{method} {path}: {answer}"
        );
    }
}

#[tokio::test]
async fn post_reload_applies_a_valid_file_and_rejects_an_invalid_one() {
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let dir = TempDir::new("reload");
    let path = dir.join("palisade.toml");
    std::fs::write(&path, upstream_toml(&[a.addr])).expect("write");
    let proxy = Proxy::start_file(&path).await;
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "a");

    // Add a backend.
    std::fs::write(&path, upstream_toml(&[a.addr, b.addr])).expect("write");
    let reloaded = send(
        http::Request::post(proxy.admin_url("/reload"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    assert_eq!(reloaded.json()["generation"], 2);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(get(&proxy.url("/")).await.backend());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // A broken file: 400 with the position, the running config stays.
    std::fs::write(
        &path,
        format!(
            "{}\n[server.timeouts]\nidle = \"soon\"\n",
            upstream_toml(&[a.addr])
        ),
    )
    .expect("write");
    let rejected = send(
        http::Request::post(proxy.admin_url("/reload"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_eq!(rejected.status, 400);
    let error = rejected.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.starts_with(&format!("{}:", path.display())),
        "{error}"
    );
    assert!(error.contains(":9:8: invalid duration"), "{error}");
    let last = get(&proxy.admin_url("/status")).await.json()["reloads"]["last"].clone();
    assert_eq!(last["ok"], false, "{last}");
    assert_eq!(last["error"], error.as_str());
    assert_eq!(proxy.state.snapshot().generation, 2);
    assert_eq!(proxy.state.snapshot().upstreams[0].backends.len(), 2);
    assert_eq!(get(&proxy.url("/")).await.status, 200);
}

#[tokio::test]
async fn the_dashboard_is_served_without_external_resources() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&upstream_toml(&[a.addr])).await;
    let page = get(&proxy.admin_url("/")).await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/html"));
    let html = page.text();
    assert!(html.contains("fetch(\"/status\""));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the dashboard loads something external"
    );
}

#[tokio::test]
async fn metrics_carry_every_spec_name_and_count_the_traffic() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nstrip_prefix = true\nupstream = \"app\"\n\n[upstreams.app]\nbackends = [{{ addr = \"{}\" }}]\n[upstreams.app.health]\ninterval = \"100ms\"\ntimeout = \"50ms\"\n",
        a.addr
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(get(&proxy.url("/api/x")).await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("/api/status/503")).await.status, 503);
    }
    assert_eq!(get(&proxy.url("/elsewhere")).await.status, 404);
    // Let a health probe or two happen.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let text = get(&proxy.admin_url("/metrics")).await.text();
    for name in [
        "palisade_requests_total",
        "palisade_request_duration_seconds_bucket",
        "palisade_upstream_requests_total",
        "palisade_backend_healthy",
        "palisade_backend_in_flight",
        "palisade_retries_total",
        "palisade_rate_limited_total",
        "palisade_denied_total",
        "palisade_config_reloads_total",
        "palisade_config_generation",
        "palisade_connections_active",
        "palisade_health_checks_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics:\n{text}"
        );
    }
    let route = [("route", "api"), ("upstream", "app")];
    assert_eq!(
        sample(
            &text,
            "palisade_requests_total",
            &[route[0], route[1], ("code", "200")]
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "palisade_requests_total",
            &[route[0], route[1], ("code", "503")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "palisade_requests_total",
            &[("route", ""), ("code", "404")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "palisade_request_duration_seconds_count", &route),
        Some(7.0)
    );
    let backend = a.addr.to_string();
    let b = [("upstream", "app"), ("backend", backend.as_str())];
    assert_eq!(
        sample(
            &text,
            "palisade_upstream_requests_total",
            &[b[0], b[1], ("code", "200")]
        ),
        Some(5.0)
    );
    assert_eq!(sample(&text, "palisade_backend_healthy", &b), Some(1.0));
    assert_eq!(sample(&text, "palisade_backend_in_flight", &b), Some(0.0));
    assert_eq!(sample(&text, "palisade_config_generation", &[]), Some(1.0));
    assert_eq!(
        sample(&text, "palisade_rate_limited_total", &[("route", "api")]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "palisade_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(0.0)
    );
    let probes = sample(
        &text,
        "palisade_health_checks_total",
        &[b[0], b[1], ("result", "pass")],
    )
    .unwrap_or(0.0);
    assert!(probes >= 1.0, "no health check counted");
    // The 503s were not retried: the one backend answered them, and a request it may
    // have seen is not asked of it again (failover.rs counts retries with two).
    assert_eq!(
        sample(&text, "palisade_retries_total", &[("upstream", "app")]),
        Some(0.0)
    );
}

/// The `route` label values of the series of `name` in the exposition `text`.
fn routes_of(text: &str, name: &str) -> Vec<String> {
    let prefix = format!("{name}{{");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let start = rest.find("route=\"")? + "route=\"".len();
            let len = rest[start..].find('"')?;
            Some(rest[start..start + len].to_owned())
        })
        .collect()
}

#[tokio::test]
async fn refusal_counters_have_series_for_configured_routes_only() {
    // Requests that match no route count under route "" in palisade_requests_total; only
    // routes refuse, so the refusal counters have no route "" (it was there, at 0).
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"app\"\n\
         [[routes]]\nname = \"web\"\npath_prefix = \"/web\"\nupstream = \"app\"\n\
         [upstreams.app]\nbackends = [{{ addr = \"{}\" }}]\n",
        a.addr
    ))
    .await;
    assert_eq!(get(&proxy.url("/elsewhere")).await.status, 404);
    assert_eq!(get(&proxy.url("/api/x")).await.status, 200);
    let text = get(&proxy.admin_url("/metrics")).await.text();
    // The 404 is counted, under route "".
    assert!(
        routes_of(&text, "palisade_requests_total")
            .iter()
            .any(String::is_empty),
        "{text}"
    );
    for name in ["palisade_rate_limited_total", "palisade_denied_total"] {
        let mut routes = routes_of(&text, name);
        routes.sort();
        assert_eq!(routes, ["api", "web"], "{name}:\n{text}");
        for route in ["api", "web"] {
            assert_eq!(
                sample(&text, name, &[("route", route)]),
                Some(0.0),
                "{text}"
            );
        }
    }
}

#[tokio::test]
async fn an_admin_request_head_that_never_finishes_is_cut_off_by_header_read() {
    let a = Echo::start("a").await;
    let proxy = Proxy::start(&format!(
        "[server.timeouts]\nheader_read = \"300ms\"\n{}",
        upstream_toml(&[a.addr])
    ))
    .await;
    let started = std::time::Instant::now();
    let (_, closed) = raw_exchange(
        proxy.admin,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(closed, "a half-sent head held an admin connection open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // A whole request still gets its answer.
    assert_eq!(get(&proxy.admin_url("/healthz")).await.status, 200);
}
