//! Hot reload: file edits take effect (plain writes and editor-style renames), bad edits
//! keep the running config, reloads under load drop nothing, live state survives, and
//! listeners follow `server.listen`.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

/// Writes `text` as `palisade.toml` in a directory of its own; hold the directory while
/// using it.
fn temp_config(tag: &str, text: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let path = dir.write("palisade.toml", text);
    (dir, path)
}

fn routes_to(backends: &[SocketAddr], prefix: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect();
    format!(
        "[[routes]]\nname = \"main\"\npath_prefix = \"{prefix}\"\nupstream = \"app\"\n\n[upstreams.app]\nbackends = [{}]\n",
        list.join(", ")
    )
}

/// Replaces the file the way editors do: write a temporary file, rename it over.
fn replace_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.swp");
    std::fs::write(&tmp, text).expect("write tmp");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test]
async fn editing_the_file_reloads_within_two_seconds_and_bad_edits_are_rejected() {
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let (_dir, path) = temp_config("watch", &routes_to(&[a.addr], "/"));
    let proxy = Proxy::start_file(&path).await;
    let _watcher = palisade::reload::watch_config_file(proxy.state.clone()).expect("watch");
    let generation = || proxy.state.snapshot().generation;
    assert_eq!(generation(), 1);

    // Add a backend and move the route, with a plain write.
    let edited = Instant::now();
    std::fs::write(&path, routes_to(&[a.addr, b.addr], "/v2")).expect("write");
    assert!(
        eventually(Duration::from_secs(2), async || generation() == 2).await,
        "no reload within 2 s"
    );
    eprintln!("reload took {:?}", edited.elapsed());
    assert_eq!(
        get(&proxy.url("/")).await.status,
        404,
        "the old route still matches"
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(get(&proxy.url("/v2/x")).await.backend());
    }
    assert_eq!(seen.len(), 2);

    // An editor-style replace.
    replace_by_rename(&path, &routes_to(&[b.addr], "/"));
    assert!(
        eventually(Duration::from_secs(2), async || generation() == 3).await,
        "rename not noticed"
    );
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "b");

    // A broken edit: the running config stays, the failure is counted.
    std::fs::write(&path, "[[routes]]\nupstream = \n").expect("write");
    let failed = eventually(Duration::from_secs(2), async || {
        proxy.state.reloads_failed.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert!(failed, "the broken edit was not noticed");
    assert_eq!(generation(), 3);
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "b");
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("palisade_config_reloads_total{result=\"failure\"}")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );

    // Saving the same content again is not a new generation.
    std::fs::write(&path, routes_to(&[b.addr], "/")).expect("write");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(generation(), 3);
}

#[tokio::test]
async fn a_broken_file_reloaded_by_hand_is_one_failure_not_two() {
    // POST /reload (or SIGHUP) of a broken save, then the watcher seeing that same save:
    // it was rejected twice, and failure alerts counted double.
    let a = Echo::start("a").await;
    let (_dir, path) = temp_config("rejected-once", &routes_to(&[a.addr], "/"));
    let proxy = Proxy::start_file(&path).await;
    let _watcher = palisade::reload::watch_config_file(proxy.state.clone()).expect("watch");
    let failed = || proxy.state.reloads_failed.load(Ordering::Relaxed);
    std::fs::write(&path, "[server\n").expect("write");
    let answer = send(
        http::Request::post(proxy.admin_url("/reload"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request"),
    )
    .await;
    assert_eq!(answer.status, 400);
    // The watcher's quiet period, and then some.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(failed(), 1);
    // Another broken save is another failure; the fixed file reloads.
    std::fs::write(&path, "[server]\nlisten = 1\n").expect("write");
    assert!(eventually(Duration::from_secs(2), async || failed() == 2).await);
    std::fs::write(&path, routes_to(&[a.addr], "/x")).expect("write");
    assert!(
        eventually(Duration::from_secs(2), async || proxy
            .state
            .snapshot()
            .generation
            == 2)
        .await
    );
    assert_eq!(failed(), 2);
}

#[tokio::test]
async fn a_file_written_in_place_is_read_once_its_writer_closes_it() {
    // `generate > palisade.toml` with a generator that pauses: the file is half written
    // for longer than the watcher's debounce. Its first half alone is a valid config (an
    // upstream, no routes: every request 404), which must never be served.
    use std::io::Write as _;
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let (_dir, path) = temp_config("half", &routes_to(&[a.addr], "/"));
    let proxy = Proxy::start_file(&path).await;
    let _watcher = palisade::reload::watch_config_file(proxy.state.clone()).expect("watch");
    let generation = || proxy.state.snapshot().generation;

    let mut file = std::fs::File::create(&path).expect("truncate");
    let whole = routes_to(&[b.addr], "/");
    let (routes, upstream) = whole.split_at(whole.find("[upstreams.app]").expect("upstream"));
    file.write_all(upstream.as_bytes()).expect("first half");
    file.flush().expect("flush");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(generation(), 1, "the half-written file was loaded");
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "a");

    file.write_all(format!("\n{routes}").as_bytes())
        .expect("second half");
    drop(file);
    assert!(
        eventually(Duration::from_secs(2), async || generation() == 2).await,
        "no reload once the file was closed"
    );
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "b");
}

/// A writer that keeps the config file open (an editor, a process that writes and
/// lingers) never closes it: what it wrote is read once nothing has changed for 5 s.
#[tokio::test]
async fn a_file_its_writer_keeps_open_is_read_after_five_quiet_seconds() {
    use std::io::Write as _;
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let (_dir, path) = temp_config("open", &routes_to(&[a.addr], "/"));
    let proxy = Proxy::start_file(&path).await;
    let _watcher = palisade::reload::watch_config_file(proxy.state.clone()).expect("watch");
    let generation = || proxy.state.snapshot().generation;

    let mut file = std::fs::File::create(&path).expect("truncate");
    file.write_all(routes_to(&[b.addr], "/").as_bytes())
        .expect("write");
    file.flush().expect("flush");
    // Still open: waiting for the writer to close it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        generation(),
        1,
        "read before the writer closed it or went quiet"
    );
    assert!(
        eventually(Duration::from_secs(8), async || generation() == 2).await,
        "a file left open was never read"
    );
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "b");
    drop(file);
}

#[tokio::test]
async fn a_kubernetes_configmap_update_reloads() {
    // A ConfigMap volume: `palisade.toml -> ..data/palisade.toml`, `..data -> ..v1`; an
    // update writes `..v2`, points `..data_tmp` at it, renames that over `..data` and
    // removes `..v1`. The file named on the command line is never written.
    use std::os::unix::fs::symlink;
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let dir = TempDir::new("configmap");
    let version = |name: &str, text: &str| {
        std::fs::create_dir(dir.join(name)).expect("version dir");
        std::fs::write(dir.join(name).join("palisade.toml"), text).expect("write");
    };
    let swap_to = |name: &str, old: &str| {
        let _ = std::fs::remove_file(dir.join("..data_tmp"));
        symlink(name, dir.join("..data_tmp")).expect("link");
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
        std::fs::remove_dir_all(dir.join(old)).expect("remove old version");
    };
    version("..v1", &routes_to(&[a.addr], "/"));
    symlink("..v1", dir.join("..data")).expect("link");
    symlink("..data/palisade.toml", dir.join("palisade.toml")).expect("link");
    let proxy = Proxy::start_file(&dir.join("palisade.toml")).await;
    let _watcher = palisade::reload::watch_config_file(proxy.state.clone()).expect("watch");
    let generation = || proxy.state.snapshot().generation;

    version("..v2", &routes_to(&[b.addr], "/"));
    swap_to("..v2", "..v1");
    assert!(
        eventually(Duration::from_secs(3), async || generation() == 2).await,
        "the ConfigMap update was not noticed"
    );
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "b");

    // And the next one: the watch followed the links to the new version.
    version("..v3", &routes_to(&[a.addr], "/"));
    swap_to("..v3", "..v2");
    assert!(
        eventually(Duration::from_secs(3), async || generation() == 3).await,
        "the second update was not noticed"
    );
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "a");
}

#[tokio::test]
async fn a_config_under_a_deploy_link_follows_edits_and_the_link() {
    // `-c current/palisade.toml` with `current -> releases/1`: an edit of the release's
    // file (in another directory than the link) reloads, and so does moving `current`.
    use std::os::unix::fs::symlink;
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let dir = TempDir::new("deploy");
    for release in ["1", "2"] {
        std::fs::create_dir_all(dir.join("releases").join(release)).expect("release dir");
    }
    let file = |release: &str| dir.join("releases").join(release).join("palisade.toml");
    std::fs::write(file("1"), routes_to(&[a.addr], "/")).expect("write");
    symlink("releases/1", dir.join("current")).expect("link");
    let proxy = Proxy::start_file(&dir.join("current").join("palisade.toml")).await;
    let _watcher = palisade::reload::watch_config_file(proxy.state.clone()).expect("watch");
    let generation = || proxy.state.snapshot().generation;

    std::fs::write(file("1"), routes_to(&[b.addr], "/")).expect("edit");
    assert!(
        eventually(Duration::from_secs(3), async || generation() == 2).await,
        "the edit behind the link was not noticed"
    );
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "b");

    std::fs::write(file("2"), routes_to(&[a.addr], "/")).expect("write");
    symlink("releases/2", dir.join("current.new")).expect("link");
    std::fs::rename(dir.join("current.new"), dir.join("current")).expect("move link");
    assert!(
        eventually(Duration::from_secs(3), async || generation() == 3).await,
        "moving the link was not noticed"
    );
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "a");
}

#[tokio::test]
async fn a_burst_of_writes_reloads_once_it_is_over() {
    // A script rewriting the file 15 times, 40 ms apart: each intermediate config would
    // be a reload of its own if events were debounced one by one; one reload (a few if
    // the machine stalls the writer) once the writes stop, with the last content.
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let (_dir, path) = temp_config("burst", &routes_to(&[a.addr], "/"));
    let proxy = Proxy::start_file(&path).await;
    let _watcher = palisade::reload::watch_config_file(proxy.state.clone()).expect("watch");
    for i in 0..15 {
        let prefix = format!("/v{i}");
        std::fs::write(&path, routes_to(&[b.addr], &prefix)).expect("write");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let settled = eventually(Duration::from_secs(3), async || {
        get(&proxy.url("/v14/x")).await.status == 200
    })
    .await;
    assert!(settled, "the last write was not applied");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reloads = proxy.state.reloads_ok.load(Ordering::Relaxed);
    assert!(
        (1..=3).contains(&reloads),
        "{reloads} reloads for one burst of writes"
    );
}

#[tokio::test]
async fn an_empty_config_file_is_never_applied_by_a_reload() {
    // A generator that failed, or a file caught between its truncation and its first
    // write: the defaults (no routes, other listen addresses) must not replace the
    // running config.
    let a = Echo::start("a").await;
    let (_dir, path) = temp_config("empty", &routes_to(&[a.addr], "/"));
    let proxy = Proxy::start_file(&path).await;
    let _watcher = palisade::reload::watch_config_file(proxy.state.clone()).expect("watch");
    std::fs::write(&path, "# nothing yet\n\n").expect("write");
    let failed = eventually(Duration::from_secs(2), async || {
        proxy.state.reloads_failed.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert!(failed, "the emptied file was not refused");
    let errors = palisade::reload::reload(&proxy.state).expect_err("an empty file reloads");
    assert!(errors[0].message.contains("empty"), "{errors:?}");
    assert_eq!(proxy.state.snapshot().generation, 1);
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_every_200ms_under_load_drops_no_request() {
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let (_dir, path) = temp_config("churn", &routes_to(&[a.addr], "/"));
    let proxy = Proxy::start_file(&path).await;
    let deadline = Instant::now() + Duration::from_secs(4);
    let load = Load::start(
        &proxy.url("/x"),
        4,
        Duration::from_secs(4),
        5000,
        Duration::ZERO,
    );
    let mut reloads = 0;
    while Instant::now() < deadline {
        // Alternate between one and two backends.
        let backends = if reloads % 2 == 0 {
            vec![a.addr, b.addr]
        } else {
            vec![b.addr]
        };
        std::fs::write(&path, routes_to(&backends, "/")).expect("write");
        let answer = send(
            http::Request::post(proxy.admin_url("/reload"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("req"),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        reloads += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, failed) = load.finish().await;
    eprintln!("{reloads} reloads, {ok} ok, {failed} failed");
    assert!(reloads >= 15, "only {reloads} reloads");
    assert!(ok >= 1000, "only {ok} requests");
    assert_eq!(failed, 0);
    assert_eq!(proxy.state.snapshot().generation, 1 + reloads as u64);
}

#[tokio::test]
async fn an_unhealthy_backend_kept_by_a_reload_is_still_unhealthy_right_after() {
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let health = "[upstreams.app.health]\ninterval = \"100ms\"\ntimeout = \"50ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 3\n";
    let (_dir, path) = temp_config(
        "keep",
        &format!("{}{health}", routes_to(&[a.addr, b.addr], "/")),
    );
    let proxy = Proxy::start_file(&path).await;
    post(&format!("http://{}/health/down", b.addr), vec![]).await;
    let b_healthy = || {
        let snapshot = proxy.state.snapshot();
        let addr = b.addr.to_string();
        snapshot.upstreams[0]
            .backends
            .iter()
            .find(|x| *x.addr == addr)
            .map(|x| x.is_healthy())
    };
    assert!(eventually(Duration::from_secs(3), async || b_healthy() == Some(false)).await);
    // Change something else (the route prefix) and reload.
    std::fs::write(
        &path,
        format!("{}{health}", routes_to(&[a.addr, b.addr], "/app")),
    )
    .expect("write");
    let generation = palisade::reload::reload(&proxy.state).expect("reload");
    assert_eq!(generation, 2);
    assert_eq!(b_healthy(), Some(false), "the reload forgot that b is down");
    for _ in 0..10 {
        assert_eq!(get(&proxy.url("/app/x")).await.json()["backend"], "a");
    }
}

#[tokio::test]
async fn listeners_open_and_close_as_server_listen_changes() {
    let a = Echo::start("a").await;
    let (p1, p2, admin) = (free_port(), free_port(), free_port());
    let config = |ports: &[u16]| {
        let listen: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        format!(
            "[server]\nlisten = [{}]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
            listen.join(", "),
            routes_to(&[a.addr], "/")
        )
    };
    let (_dir, path) = temp_config("listen", &config(&[p1]));
    let _child = spawn_palisade(&["run", "-c", &path.to_string_lossy()]);
    let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().expect("addr") };
    wait_listening(addr(p1)).await;
    assert_eq!(get(&format!("http://{}/", addr(p1))).await.status, 200);
    // The admin API answers once the config file is watched (it starts after the watcher).
    assert_eq!(
        get(&format!("http://{}/healthz", addr(admin))).await.status,
        200
    );

    std::fs::write(&path, config(&[p1, p2])).expect("write");
    wait_listening(addr(p2)).await;
    assert_eq!(get(&format!("http://{}/", addr(p2))).await.status, 200);

    std::fs::write(&path, config(&[p2])).expect("write");
    let closed = eventually(Duration::from_secs(3), async || {
        tokio::net::TcpStream::connect(addr(p1)).await.is_err()
    })
    .await;
    assert!(
        closed,
        "the removed listen address still accepts connections"
    );
    assert_eq!(get(&format!("http://{}/", addr(p2))).await.status, 200);
}

#[tokio::test]
async fn the_admin_api_moves_when_admin_listen_changes() {
    let a = Echo::start("a").await;
    let (port, admin1, admin2) = (free_port(), free_port(), free_port());
    let config = |admin: u16| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
            routes_to(&[a.addr], "/")
        )
    };
    let (_dir, path) = temp_config("admin-listen", &config(admin1));
    let _child = spawn_palisade(&["run", "-c", &path.to_string_lossy()]);
    let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().expect("addr") };
    wait_listening(addr(admin1)).await;
    assert_eq!(
        get(&format!("http://{}/healthz", addr(admin1)))
            .await
            .status,
        200
    );

    std::fs::write(&path, config(admin2)).expect("write");
    wait_listening(addr(admin2)).await;
    let status = get(&format!("http://{}/status", addr(admin2))).await;
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["generation"], 2);
    let closed = eventually(Duration::from_secs(3), async || {
        tokio::net::TcpStream::connect(addr(admin1)).await.is_err()
    })
    .await;
    assert!(closed, "the old admin address still accepts connections");
    // The proxy itself was not disturbed.
    assert_eq!(get(&format!("http://{}/", addr(port))).await.status, 200);
}

#[tokio::test]
async fn addresses_that_cannot_be_bound_yet_are_taken_once_they_are_free() {
    let a = Echo::start("a").await;
    let (port, admin1) = (free_port(), free_port());
    // Held without SO_REUSEPORT: palisade's bind there fails.
    let admin_blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("bind blocker");
    let listen_blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("bind blocker");
    let admin2 = admin_blocker.local_addr().expect("addr").port();
    let port2 = listen_blocker.local_addr().expect("addr").port();
    let config = |admin: u16, ports: &[u16]| {
        let listen: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        format!(
            "[server]\nlisten = [{}]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
            listen.join(", "),
            routes_to(&[a.addr], "/")
        )
    };
    let (_dir, path) = temp_config("taken", &config(admin1, &[port]));
    let _child = spawn_palisade(&["run", "-c", &path.to_string_lossy()]);
    let url = |p: u16, what: &str| format!("http://127.0.0.1:{p}/{what}");
    wait_listening(format!("127.0.0.1:{admin1}").parse().expect("addr")).await;
    assert_eq!(get(&url(admin1, "healthz")).await.status, 200);

    // The reload itself succeeds; the admin API stays where it was, the proxy keeps its
    // other listener.
    std::fs::write(&path, config(admin2, &[port, port2])).expect("write");
    let reloaded = eventually(Duration::from_secs(5), async || {
        get(&url(admin1, "status")).await.json()["generation"] == 2
    })
    .await;
    assert!(
        reloaded,
        "the reload did not happen, or the admin API left its port"
    );
    assert_eq!(get(&url(port, "")).await.status, 200);

    // Once the ports are free, both are taken without another reload (a reload that
    // changes nothing is skipped, so it could not be what retries).
    drop(admin_blocker);
    drop(listen_blocker);
    wait_listening(format!("127.0.0.1:{admin2}").parse().expect("addr")).await;
    let status = get(&url(admin2, "status")).await;
    assert_eq!(status.json()["generation"], 2);
    wait_listening(format!("127.0.0.1:{port2}").parse().expect("addr")).await;
    assert_eq!(get(&url(port2, "")).await.status, 200);
    let closed = eventually(Duration::from_secs(3), async || {
        tokio::net::TcpStream::connect(format!("127.0.0.1:{admin1}"))
            .await
            .is_err()
    })
    .await;
    assert!(closed, "the old admin address still accepts connections");
}

#[tokio::test]
async fn connection_settings_follow_a_reload() {
    let a = Echo::start("a").await;
    let (_dir, path) = temp_config("limits", &routes_to(&[a.addr], "/"));
    let proxy = Proxy::start_file(&path).await;
    let big_head = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: {}\r\n\r\n",
        "h".repeat(20_000)
    );
    let (text, _) = raw_exchange(proxy.addr, big_head.as_bytes(), Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "default limit: {text}");

    std::fs::write(
        &path,
        format!(
            "[server.limits]\nmax_header_bytes = 8192\n{}",
            routes_to(&[a.addr], "/")
        ),
    )
    .expect("write");
    palisade::reload::reload(&proxy.state).expect("reload");
    let (text, _) = raw_exchange(proxy.addr, big_head.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "the reloaded limit was not applied: {text}"
    );
}

#[tokio::test]
async fn metric_series_of_renamed_routes_and_removed_backends_go_away() {
    // Without this, every reload that renames a route or moves a backend adds series for
    // ever (an audit saw 2,144 series for one configured route).
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let config = |route: &str, backend: SocketAddr| {
        format!(
            "[[routes]]\nname = \"{route}\"\nupstream = \"app\"\n\n[upstreams.app]\nbackends = [{{ addr = \"{backend}\" }}]\n"
        )
    };
    let (_dir, path) = temp_config("series", &config("old-route", a.addr));
    let proxy = Proxy::start_file(&path).await;
    assert_eq!(get(&proxy.url("/")).await.status, 200);
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert!(metrics.contains("route=\"old-route\""), "{metrics}");
    assert!(
        metrics.contains(&format!("backend=\"{}\"", a.addr)),
        "{metrics}"
    );

    std::fs::write(&path, config("new-route", b.addr)).expect("write");
    palisade::reload::reload(&proxy.state).expect("reload");
    assert_eq!(get(&proxy.url("/")).await.json()["backend"], "b");
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert!(metrics.contains("route=\"new-route\""), "{metrics}");
    assert!(!metrics.contains("route=\"old-route\""), "{metrics}");
    assert!(
        !metrics.contains(&format!("backend=\"{}\"", a.addr)),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("backend=\"{}\"", b.addr)),
        "{metrics}"
    );
}

/// The inotify watches of process `pid`: the mask of each, from /proc/PID/fdinfo of its
/// inotify descriptors.
fn inotify_watches(pid: u32) -> Vec<u32> {
    let mut watches = Vec::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd");
    for fd in fds.flatten() {
        let is_inotify = std::fs::read_link(fd.path())
            .is_ok_and(|target| target.to_string_lossy().contains("inotify"));
        if !is_inotify {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        for line in info.lines().filter(|l| l.starts_with("inotify ")) {
            let mask = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("mask:"))
                .and_then(|v| u32::from_str_radix(v, 16).ok())
                .unwrap_or_else(|| panic!("no mask in {line}"));
            watches.push(mask);
        }
    }
    watches
}

/// palisade run on a config file of its own directory (its JSON log elsewhere), routing
/// `/` to one echo backend; for the watcher's tests.
struct Watched {
    dir: TempDir,
    path: PathBuf,
    _logs: TempDir,
    log: PathBuf,
    child: ChildGuard,
    proxy: SocketAddr,
    admin: u16,
}

impl Watched {
    async fn start(tag: &str, echo: &Echo) -> Watched {
        let (port, admin) = (free_port(), free_port());
        let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let logs = TempDir::new(&format!("{tag}-log"));
        let log = logs.write("palisade.log", "");
        let (dir, path) = temp_config(tag, &Watched::text(proxy, admin, echo));
        let child = spawn_logged(&path, &log, "info");
        wait_listening(proxy).await;
        Watched {
            dir,
            path,
            _logs: logs,
            log,
            child,
            proxy,
            admin,
        }
    }

    fn text(proxy: SocketAddr, admin: u16, echo: &Echo) -> String {
        format!(
            "[server]\nlisten = [\"{proxy}\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
            routes_to(&[echo.addr], "/")
        )
    }

    /// The config routing `/` to `echo` instead.
    fn config_for(&self, echo: &Echo) -> String {
        Watched::text(self.proxy, self.admin, echo)
    }

    /// Whether `/` comes to be answered by the backend named `name` (10 s at most).
    async fn comes_to(&self, name: &str) -> bool {
        let url = format!("http://{}/", self.proxy);
        eventually(Duration::from_secs(10), async || {
            get(&url).await.json()["backend"] == name
        })
        .await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test]
async fn writes_and_opens_beside_the_config_do_not_wake_the_watcher() {
    // A log another program appends to in the config's directory used to cost palisade
    // half a core: the directory's watch reported every write and every open. It now
    // reports only creations, renames, removals, closes after writing and attribute
    // changes; only the config file's own watch reports writes. Checked on the kernel's
    // list of the process's watches (one on the directory, one on the config file), then
    // by a real edit still reloading.
    const IN_MODIFY: u32 = 0x2;
    const IN_CLOSE_WRITE: u32 = 0x8;
    const IN_OPEN: u32 = 0x20;
    const IN_MOVED_TO: u32 = 0x80;
    const IN_CREATE: u32 = 0x100;
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let palisade = Watched::start("busy-dir", &a).await;
    let pid = palisade.child.0.id();
    let is_dir = |mask: &u32| mask & IN_CREATE != 0;
    let mut watches = Vec::new();
    let found = eventually(Duration::from_secs(10), async || {
        watches = inotify_watches(pid);
        watches.iter().filter(|m| is_dir(m)).count() == 1
            && watches.iter().filter(|m| !is_dir(m)).count() == 1
    })
    .await;
    assert!(
        found,
        "not one directory watch and one file watch: {watches:x?}"
    );
    for mask in &watches {
        assert_eq!(mask & IN_OPEN, 0, "a watch reports opens: {watches:x?}");
        assert_ne!(mask & IN_CLOSE_WRITE, 0, "{watches:x?}");
        if is_dir(mask) {
            assert_eq!(mask & IN_MODIFY, 0, "the directory's watch reports writes");
            assert_ne!(mask & IN_MOVED_TO, 0, "{watches:x?}");
        } else {
            assert_ne!(
                mask & IN_MODIFY,
                0,
                "the config file's writes are not watched"
            );
        }
    }

    // A busy neighbour, then a real edit in place: the edit still reloads.
    let busy = palisade.dir.write("app.log", "");
    {
        use std::io::Write;
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(&busy)
            .expect("app.log");
        for i in 0..2000 {
            writeln!(out, "line {i}").expect("append");
            out.flush().expect("flush");
        }
    }
    std::fs::write(&palisade.path, palisade.config_for(&b)).expect("edit");
    assert!(
        palisade.comes_to("b").await,
        "the edit beside a busy log was not reloaded"
    );
    stop_gracefully(palisade.child);
}

#[tokio::test]
async fn a_config_written_through_another_name_reloads_when_closed() {
    // A hard link, or the host's side of a single-file bind mount: the write and its close
    // are seen by the file's own watch, not by its directory's. The close ends the wait
    // for the writer: no 5 s wait and no "still open" warning.
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let palisade = Watched::start("hard-link", &a).await;
    let elsewhere = TempDir::new("hard-link-other");
    let other = elsewhere.join("other-name.toml");
    std::fs::hard_link(&palisade.path, &other).expect("hard link");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Written in place through the other name (truncate, write, close).
    std::fs::write(&other, palisade.config_for(&b)).expect("write through the link");
    let moved = palisade.comes_to("b").await;
    let logged = palisade.log();
    assert!(
        moved,
        "the write through the other name was not reloaded: {logged}"
    );
    assert!(
        !logged.contains("still open for writing"),
        "the close was not seen: {logged}"
    );
    stop_gracefully(palisade.child);
}

#[tokio::test]
async fn a_config_directory_removed_and_made_again_is_watched_again() {
    // No event says that a watched directory came back: palisade looks every second, and
    // reloads what the new one holds.
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let palisade = Watched::start("dir-again", &a).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    std::fs::remove_dir_all(&*palisade.dir).expect("remove the config's directory");
    // Gone for a while (the failed reload keeps the running config)...
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let answer = get(&format!("http://{}/", palisade.proxy)).await;
    assert_eq!(answer.json()["backend"], "a");
    // ... then back, with another config in it.
    std::fs::create_dir_all(&*palisade.dir).expect("make the directory again");
    std::fs::write(&palisade.path, palisade.config_for(&b)).expect("write");
    assert!(
        palisade.comes_to("b").await,
        "the directory made again was not watched: {}",
        palisade.log()
    );
    stop_gracefully(palisade.child);
}

impl Watched {
    /// `palisade_config_reloads_total{result="failure"}` from the admin API.
    async fn failed_reloads(&self) -> u64 {
        let metrics = get(&format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .text();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("palisade_config_reloads_total{result=\"failure\"} "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Whether the log comes to hold `text` (10 s at most).
    async fn logs(&self, text: &str) -> bool {
        eventually(Duration::from_secs(10), async || self.log().contains(text)).await
    }
}

#[tokio::test]
async fn a_config_broken_again_after_a_fix_is_rejected_and_counted_again() {
    // The same broken text is not rejected twice in a row (a SIGHUP and the watcher
    // seeing one write), but once the file was fixed, breaking it again is news.
    let a = Echo::start("a").await;
    let palisade = Watched::start("broken-again", &a).await;
    let good = palisade.config_for(&a);
    let bad = format!("{good}\n[[routes]]\nupstream = \n");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    std::fs::write(&palisade.path, &bad).expect("break");
    let once = eventually(Duration::from_secs(10), async || {
        palisade.failed_reloads().await == 1
    })
    .await;
    assert!(
        once,
        "the first breakage was not counted: {}",
        palisade.log()
    );
    std::fs::write(&palisade.path, &good).expect("fix");
    assert!(
        palisade.logs("unchanged in meaning").await,
        "{}",
        palisade.log()
    );
    std::fs::write(&palisade.path, &bad).expect("break again");
    let twice = eventually(Duration::from_secs(10), async || {
        palisade.failed_reloads().await == 2
    })
    .await;
    assert!(
        twice,
        "the second breakage was swallowed: {}",
        palisade.log()
    );
    stop_gracefully(palisade.child);
}

#[tokio::test]
async fn a_config_made_anew_and_written_slowly_is_not_read_half_written() {
    // After the file was removed, a writer makes it anew and writes it in three parts,
    // 3 s apart (each pause shorter than the 5 s a writer is waited for, the whole
    // longer). Its writes are watched from its creation: it is read once, whole.
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let palisade = Watched::start("made-anew", &a).await;
    let whole = palisade.config_for(&b);
    let cut = whole.find("addr = ").expect("a backend address") + 10;
    let (first, rest) = whole.split_at(cut);
    let (second, third) = rest.split_at(rest.len() / 2);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    std::fs::remove_file(&palisade.path).expect("remove");
    // The removal is read (and rejected) first, on its own.
    let read = eventually(Duration::from_secs(10), async || {
        palisade.failed_reloads().await == 1
    })
    .await;
    assert!(read, "the removal was not noticed: {}", palisade.log());
    {
        use std::io::Write;
        let mut out = std::fs::File::create(&palisade.path).expect("create");
        for part in [first, second, third] {
            out.write_all(part.as_bytes()).expect("write");
            out.flush().expect("flush");
            if part != third {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
    }
    assert!(palisade.comes_to("b").await, "{}", palisade.log());
    let log = palisade.log();
    assert!(!log.contains("still open for writing"), "{log}");
    // The removal's failed read is the only rejection.
    assert_eq!(palisade.failed_reloads().await, 1, "{log}");
    stop_gracefully(palisade.child);
}

#[tokio::test]
async fn lost_file_events_are_said_and_everything_is_reloaded() {
    // More events than the kernel queues for the watcher (palisade stopped meanwhile):
    // the overflow is logged as such, and the config is read again.
    let a = Echo::start("a").await;
    let palisade = Watched::start("overflow", &a).await;
    let limit: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(16384);
    assert!(
        limit <= 1 << 20,
        "max_queued_events {limit} is too many to overflow"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pid = palisade.child.0.id().to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    signal("-STOP");
    // Closes after writing, alternating between two files: the kernel merges only
    // repeats of the same event.
    let names = [palisade.dir.join("one.log"), palisade.dir.join("two.log")];
    for i in 0..limit + 1000 {
        std::fs::write(&names[i % 2], "x").expect("write");
    }
    signal("-CONT");
    assert!(
        palisade.logs("file events were lost").await,
        "{}",
        palisade.log()
    );
    assert!(
        palisade.logs("configuration reloaded").await,
        "{}",
        palisade.log()
    );
    stop_gracefully(palisade.child);
}

#[tokio::test]
async fn a_save_that_changes_nothing_is_logged_as_not_reloaded() {
    let echo = Echo::start("a").await;
    let (port, admin) = (free_port(), free_port());
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
        routes_to(&[echo.addr], "/")
    );
    let (dir, path) = temp_config("unchanged-log", &text);
    let log = dir.write("palisade.log", "");
    let child = spawn_logged(&path, &log, "info");
    wait_listening(format!("127.0.0.1:{port}").parse().expect("addr")).await;
    // The watcher starts after the listeners: give it a moment. A comment changes the
    // text, not the meaning.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    std::fs::write(&path, format!("# saved again\n{text}")).expect("write");
    let messages = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["message"].as_str().map(str::to_owned))
            .collect()
    };
    let said = eventually(Duration::from_secs(10), async || {
        messages()
            .iter()
            .any(|m| m == "config file unchanged in meaning: not reloaded")
    })
    .await;
    assert!(said, "{:?}", messages());
    let status = get(&format!("http://127.0.0.1:{admin}/status"))
        .await
        .json();
    assert_eq!(status["generation"], 1, "{status}");
    // Nothing claims a reload that did not happen.
    assert!(
        !messages().iter().any(|m| m.contains("reloading")),
        "{:?}",
        messages()
    );
    stop_gracefully(child);
}

/// A reload that changes only a backend's weight keeps the backend: its counters, its
/// health and its requests in flight (SPEC: backends that stay keep their state). Once,
/// a new weight made a new backend: `/status` counted from 0, a backend held out by its
/// health checks was back in rotation, and least_conn lost sight of requests in flight.
#[tokio::test]
async fn a_backend_whose_weight_alone_changes_keeps_its_state() {
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let toml = |wa: u32, wb: u32| {
        format!(
            "[[routes]]\nname = \"all\"\nupstream = \"app\"\n[upstreams.app]\nbalance = \"least_conn\"\n\
             backends = [{{ addr = \"{}\", weight = {wa} }}, {{ addr = \"{}\", weight = {wb} }}]\n\
             [upstreams.app.health]\ninterval = \"100ms\"\ntimeout = \"50ms\"\nunhealthy_threshold = 1\n",
            a.addr, b.addr
        )
    };
    let proxy = Proxy::start(&toml(1, 1)).await;
    for _ in 0..4 {
        assert_eq!(get(&proxy.url("/")).await.status, 200);
    }
    // b fails its checks and is held out; a has a request in flight.
    post(&format!("http://{}/health/down", b.addr), vec![]).await;
    let backends = async || {
        get(&proxy.admin_url("/status")).await.json()["upstreams"]["app"]["backends"].clone()
    };
    assert!(
        eventually(Duration::from_secs(3), async || backends().await[1]
            ["healthy"]
            == false)
        .await,
        "b never showed unhealthy"
    );
    let slow_url = proxy.url("/delay/1500");
    let slow = tokio::spawn(async move { get(&slow_url).await.status });
    assert!(
        eventually(Duration::from_secs(3), async || backends().await[0]
            ["in_flight"]
            == 1)
        .await,
        "the slow request never showed in flight"
    );
    let before = backends().await;

    let config =
        palisade::config::parse(&toml(3, 2), std::path::Path::new("test.toml")).expect("config");
    proxy.state.apply(config);
    let after = backends().await;
    assert_eq!(
        (&after[0]["weight"], &after[1]["weight"]),
        (&3.into(), &2.into())
    );
    for field in ["requests", "failures", "in_flight"] {
        assert_eq!(after[0][field], before[0][field], "a's {field}: {after}");
    }
    assert_eq!(after[1]["requests"], before[1]["requests"], "{after}");
    assert_eq!(
        after[1]["healthy"], false,
        "b came back with the new weight: {after}"
    );
    assert_eq!(slow.await.expect("slow request"), 200);
}
