//! The admin dashboard in a real browser: headless Chromium loads `/`, runs its script
//! against `/status`, and the rendered page shows the backends and their health.
//! `.ci/run` installs Debian's chromium; without it the test fails in CI (CI=true) and is
//! skipped, saying so, elsewhere.

use crate::common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn find_chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("which").arg(name).output().ok()?;
            let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
        })
}

/// Runs headless Chromium with `args` + `url`, bounded in time; returns its stdout.
fn chromium(binary: &PathBuf, args: &[&str], url: &str) -> String {
    let profile = std::env::temp_dir().join(format!(
        "palisade-chromium-{}-{}",
        std::process::id(),
        free_port()
    ));
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=4000",
            "--window-size=1200,700",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let _ = std::fs::remove_dir_all(&profile);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_backends_and_their_health_in_a_real_browser() {
    let Some(binary) = find_chromium() else {
        if std::env::var_os("CI").is_some() {
            panic!("chromium is not installed; .ci/run installs it with apt-get");
        }
        eprintln!("SKIPPED: chromium is not installed (apt-get install -y chromium)");
        return;
    };
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let proxy = Proxy::start(&format!(
        "[[routes]]\nupstream = \"shop\"\n[upstreams.shop]\nbackends = [{{ addr = \"{}\" }}, {{ addr = \"{}\" }}]\n[upstreams.shop.health]\ninterval = \"100ms\"\ntimeout = \"50ms\"\nunhealthy_threshold = 1\n",
        a.addr, b.addr
    ))
    .await;
    for _ in 0..6 {
        get(&proxy.url("/")).await;
    }
    post(&format!("http://{}/health/down", b.addr), vec![]).await;
    let b_down = eventually(Duration::from_secs(3), async || {
        !proxy.state.snapshot().upstreams[0].backends[1].is_healthy()
    })
    .await;
    assert!(b_down);

    let url = proxy.admin_url("/");
    let dom = {
        let (binary, url) = (binary.clone(), url.clone());
        tokio::task::spawn_blocking(move || chromium(&binary, &["--dump-dom"], &url))
            .await
            .expect("chromium task")
    };
    assert!(
        dom.contains("data-upstream=\"shop\""),
        "upstream not rendered:\n{dom}"
    );
    for (addr, state) in [(a.addr, "healthy"), (b.addr, "unhealthy")] {
        let row = dom
            .split("<tr ")
            .find(|row| row.contains(&format!("data-backend=\"{addr}\"")))
            .unwrap_or_else(|| panic!("backend {addr} not rendered:\n{dom}"));
        assert!(
            row.contains(&format!(">{state}<")),
            "backend {addr} not shown as {state}: {row}"
        );
    }
    assert!(dom.contains("generation 1"), "{dom}");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || chromium(&binary, &[arg.as_str()], &url))
        .await
        .expect("chromium task");
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 1000, "no screenshot at {}", shot.display());
    eprintln!("dashboard screenshot: {}", shot.display());
}
