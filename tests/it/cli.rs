//! The command line: `check` output and exit codes, usage errors, `run` with a bad config,
//! and `demo` answering on its documented ports.

use crate::common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;

fn palisade(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("PALISADE_CONFIG")
        .output()
        .expect("run palisade");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `text` to `name` in a directory of its own; hold the directory while using it.
fn write_config(name: &str, text: &str) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new("cli");
    let path = dir.write(name, text);
    (dir, path)
}

#[test]
fn check_accepts_the_example_config() {
    let (code, out, err) = palisade(&["check", "-c", "config/palisade.toml"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.starts_with("config OK: "), "{out}");
    assert!(
        out.contains(" routes, ") && out.contains(" upstreams, ") && out.contains(" backends"),
        "{out}"
    );
}

#[test]
fn check_accepts_the_spec_example_from_the_repository() {
    // Saved anywhere and checked from the repository's root, as SPEC's example is meant
    // to be used: its two keys that apply elsewhere are warnings, its certificate
    // paths are the repository's.
    let (_dir, path) = write_config("spec.toml", include_str!("../fixtures/spec_example.toml"));
    let path = path.to_string_lossy().into_owned();
    let (code, out, err) = palisade(&["check", "-c", &path]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    // The two keys that apply elsewhere, and the certificate and key found from the
    // working directory rather than beside the file.
    assert_eq!(
        err.lines().filter(|l| l.starts_with("warning: ")).count(),
        4,
        "{err}"
    );
    assert_eq!(
        err.lines()
            .filter(|l| l.ends_with("from the working directory"))
            .count(),
        2,
        "{err}"
    );
    assert!(!err.contains("error"), "{err}");
}

#[test]
fn a_ca_file_is_never_taken_from_the_working_directory() {
    // Trusting a stray CA file that happens to be in the working directory would fail
    // open: a ca_file must be where the config says.
    let (dir, path) = write_config(
        "ca.toml",
        "[[routes]]\nupstream = \"app\"\n[upstreams.app]\ntls = true\nca_file = \"config/certs/localhost.pem\"\nbackends = [{ addr = \"127.0.0.1:9443\" }]\n",
    );
    let path = path.to_string_lossy().into_owned();
    let (code, out, err) = palisade(&["check", "-c", &path]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    let beside = dir.join("config/certs/localhost.pem");
    assert!(err.contains(&*beside.to_string_lossy()), "{err}");
}

#[test]
fn check_reports_every_mistake_with_its_position() {
    let (_dir, path) = write_config(
        "three-mistakes.toml",
        r#"[server.timeouts]
idle = "5 sec"

[[routes]]
name = "api"
upstream = "missing"

[upstreams.app]
backends = [{ addr = "127.0.0.1:9001", weight = 0 }]
"#,
    );
    let p = path.to_string_lossy().into_owned();
    let (code, out, err) = palisade(&["check", "-c", &p]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(lines.len(), 3, "{err}");
    for (line, position) in lines.iter().zip(["2:8", "6:12", "9:"]) {
        assert!(
            line.starts_with(&format!("error: {p}:{position}")),
            "{line} (want {position})"
        );
    }
}

#[test]
fn check_rejects_unknown_keys() {
    let (_dir, path) = write_config(
        "typo.toml",
        "[server]\nlisten = [\"127.0.0.1:8080\"]\nlsten = 1\n",
    );
    let p = path.to_string_lossy().into_owned();
    let (code, _, err) = palisade(&["check", "-c", &p]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("error: {p}:3:1")), "{err}");
}

#[test]
fn check_warns_about_a_file_with_no_setting() {
    // Startup takes it (the defaults), a reload refuses it: `check` passes it, and says so.
    let (_dir, path) = write_config("blank.toml", "# to be generated\n\n");
    let p = path.to_string_lossy().into_owned();
    let (code, out, err) = palisade(&["check", "-c", &p]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("warning: ") && err.contains("holds no setting"),
        "{err}"
    );
}

#[test]
fn a_missing_config_file_is_a_config_error() {
    let (code, _, err) = palisade(&["check", "-c", "/nonexistent/palisade.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/palisade.toml"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(palisade(&["frobnicate"]).0, 2);
    assert_eq!(palisade(&["echo"]).0, 2, "echo without --listen");
    assert_eq!(palisade(&["check", "--log-format", "xml"]).0, 2);
    assert_eq!(palisade(&["--help"]).0, 0);
}

/// Runs palisade with `args` and `env` set, killed after 10 s: (exit code, stderr), or
/// None when it had to be killed.
fn palisade_within(args: &[&str], env: &[(&str, &str)]) -> Option<(i32, String)> {
    use std::io::Read as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("PALISADE_CONFIG")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run palisade");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            return Some((status.code().unwrap_or(-1), err));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_log_level_that_tracing_would_read_as_a_target_is_a_usage_error() {
    // A bare word is a target name to tracing: `--log-level garbage` logged nothing at
    // all, errors included, and exited 0 at the end.
    for level in ["garbage", "", "7", "info,", "palisade::proxy"] {
        let (code, _, err) = palisade(&["check", "--log-level", level]);
        assert_eq!(code, 2, "{level:?}: {err}");
        assert!(err.contains("invalid --log-level"), "{err}");
    }
    for level in [
        "debug",
        "WARN",
        "palisade=debug,hyper=info",
        "info,rustls=warn",
    ] {
        let (code, out, err) = palisade(&["check", "--log-level", level]);
        assert_eq!(code, 0, "{level:?}: {out}{err}");
    }
}

#[test]
fn a_config_that_is_not_a_regular_utf8_file_is_an_error_not_a_hang() {
    let dir = TempDir::new("cli-files");
    let fifo = dir.join("fifo.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let fifo = fifo.to_string_lossy().into_owned();
    for (path, why) in [
        ("/dev/zero", "not a regular file"),
        (fifo.as_str(), "not a regular file"),
        ("/tmp", "directory"),
    ] {
        let (code, err) = palisade_within(&["check", "-c", path], &[])
            .unwrap_or_else(|| panic!("check -c {path} did not end"));
        assert_eq!(code, 1, "{path}: {err}");
        assert!(err.contains(path) && err.contains(why), "{path}: {err}");
    }
    // A certificate that never ends, the same.
    let tls = dir.write(
        "tls.toml",
        "[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"/dev/zero\"\nkey = \"/dev/zero\"\n",
    );
    let tls = tls.to_string_lossy().into_owned();
    let (code, err) =
        palisade_within(&["check", "-c", &tls], &[]).expect("check with a /dev/zero cert ended");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "{tls}:3:8: server.tls[0]: cannot read certificate /dev/zero: not a regular file"
        )),
        "{err}"
    );
    // Not UTF-8: the position of the first bad byte.
    let latin1 = dir.join("latin1.toml");
    std::fs::write(&latin1, b"# caf\xe9\n").expect("write");
    let latin1 = latin1.to_string_lossy().into_owned();
    let (code, _, err) = palisade(&["check", "-c", &latin1]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("{latin1}:1:6: the config file is not UTF-8 text")),
        "{err}"
    );
}

#[test]
fn an_empty_palisade_config_is_as_if_unset() {
    // `PALISADE_CONFIG= palisade check` said `a value is required for '--config'`.
    let (code, err) = palisade_within(&["check"], &[("PALISADE_CONFIG", "")]).expect("ended");
    assert_eq!(code, 0, "{err}");
    let (code, err) =
        palisade_within(&["check"], &[("PALISADE_CONFIG", "/nonexistent/p.toml")]).expect("ended");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/p.toml"), "{err}");
}

#[test]
fn text_logs_carry_no_colour_codes_into_a_file_or_pipe() {
    // A port held without SO_REUSEPORT: run logs its warnings, then cannot listen.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr");
    let (_dir, path) = write_config(
        "warned.toml",
        &format!("[server]\nlisten = [\"{addr}\"]\n[upstreams.spare]\nbackends = [{{ addr = \"127.0.0.1:9\" }}]\n"),
    );
    let p = path.to_string_lossy().into_owned();
    let (code, err) =
        palisade_within(&["run", "-c", &p, "--log-format", "text"], &[]).expect("run ended");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("WARN") && err.contains("not used by any route"),
        "{err}"
    );
    assert!(!err.contains('\x1b'), "{err:?}");
}

#[test]
fn run_with_an_invalid_config_exits_1_without_serving() {
    let (_dir, path) = write_config("bad-run.toml", "[[routes]]\nupstream = \"nowhere\"\n");
    let p = path.to_string_lossy().into_owned();
    let (code, _, err) = palisade(&["run", "-c", &p]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nowhere"), "{err}");
}

#[test]
fn a_listen_address_in_use_is_named_with_its_setting() {
    // Held without SO_REUSEPORT, so palisade's bind fails.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr");
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let free = || format!("127.0.0.1:{}", common::free_port());
    let cases = [
        (
            format!("[server]\nlisten = [\"{taken}\"]\n[admin]\nlisten = \"{}\"\n", free()),
            "server.listen",
        ),
        (
            format!("[server]\nlisten = [\"{}\"]\n[admin]\nlisten = \"{taken}\"\n", free()),
            "admin.listen",
        ),
        (
            format!(
                "[server]\nlisten = [\"{}\"]\n[admin]\nlisten = \"{}\"\n[[server.tls]]\nlisten = \"{taken}\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
                free(),
                free()
            ),
            "server.tls",
        ),
    ];
    for (config, setting) in cases {
        let (dir, path) = write_config("taken.toml", &config);
        dir.write("c.pem", &pair.cert.pem());
        dir.write("k.pem", &pair.signing_key.serialize_pem());
        let p = path.to_string_lossy().into_owned();
        let outcome = palisade_within(&["run", "-c", &p], &[]);
        let Some((code, err)) = outcome else {
            panic!("palisade served with {taken} taken:\n{config}");
        };
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!("error: cannot listen on {taken} ({setting}): ")),
            "{config}\n{err}"
        );
    }
}

#[tokio::test]
async fn demo_serves_round_robin_over_three_echo_backends() {
    // The demo's ports are fixed by the SPEC (8080, 9001-9003).
    let dir = TempDir::new("demo");
    let log = dir.join("demo.log");
    let child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(["demo", "--log-format", "json", "--log-level", "info"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn palisade demo"),
    );
    wait_listening("127.0.0.1:8080".parse().expect("addr")).await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..6 {
        let answer = get("http://127.0.0.1:8080/").await;
        assert_eq!(answer.status, 200);
        *seen.entry(answer.backend()).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&n| n == 2), "{seen:?}");

    // What the banner says of /status/503: retried on the other two backends (the six
    // requests above earned the retry budget that), the last 503 passed on, the retries
    // in /metrics.
    assert_eq!(get("http://127.0.0.1:8080/status/503").await.status, 503);
    let text = get("http://127.0.0.1:9901/metrics").await.text();
    assert_eq!(
        sample(&text, "palisade_retries_total", &[("upstream", "echo")]),
        Some(2.0),
        "{text}"
    );
    for port in 9001..=9003 {
        let backend = format!("127.0.0.1:{port}");
        assert_eq!(
            sample(
                &text,
                "palisade_upstream_requests_total",
                &[("backend", backend.as_str()), ("code", "503")]
            ),
            Some(1.0),
            "{text}"
        );
    }

    stop_gracefully(child);
    // It drained, without the advice for restarting `run` under load (README, Running
    // several instances): the demo is never replaced by another instance.
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains(": draining"), "{logged}");
    assert!(!logged.contains("tcp_migrate_req"), "{logged}");
}

#[tokio::test]
async fn run_gives_the_tcp_migrate_req_advice_at_drain_where_it_is_off() {
    // The advice the demo leaves out stays for `run`, whose listeners a replacing
    // instance shares (where the sysctl is 1, or absent, there is nothing to advise).
    let echo = Echo::start("a").await;
    // A port of its own, not 0: the advice is left out once another process has taken
    // the listeners over, so no other test's palisade may share this address.
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (_dir, file) = write_config(
        "advice.toml",
        &format!(
            "[server]\nlisten = [\"{listen}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
            single_upstream(&[(echo.addr, 1)], "")
        ),
    );
    let log = file.with_extension("log");
    let child = spawn_logged(&file, &log, "info");
    wait_listening(listen).await;
    assert_eq!(get(&format!("http://{listen}/")).await.status, 200);
    stop_gracefully(child);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let off = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .is_ok_and(|v| v.trim() == "0");
    assert_eq!(
        logged.contains("net.ipv4.tcp_migrate_req = 0"),
        off,
        "{logged}"
    );
}

#[tokio::test]
async fn listening_lines_name_the_port_the_kernel_chose_for_port_0() {
    let echo = Echo::start("a").await;
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"app\"\n[upstreams.app]\nbackends = [{{ addr = \"{}\" }}]\n",
        echo.addr
    );
    let (_dir, file) = write_config("port-0.toml", &config);
    let log = file.with_extension("log");
    let child = spawn_logged(&file, &log, "info");
    // The address in the log line whose message is `message`.
    let logged = |message: &str| -> Option<std::net::SocketAddr> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == message)
            .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()))
    };
    let both = eventually(Duration::from_secs(20), async || {
        logged("listening").is_some() && logged("admin API listening").is_some()
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(both, "no listening lines: {text}");
    let (proxy, admin) = (
        logged("listening").expect("logged"),
        logged("admin API listening").expect("logged"),
    );
    assert!(proxy.port() != 0 && admin.port() != 0, "{text}");
    // And they are where palisade answers.
    assert_eq!(get(&format!("http://{proxy}/")).await.status, 200);
    assert_eq!(get(&format!("http://{admin}/healthz")).await.status, 200);
    stop_gracefully(child);
}

/// Runs palisade with `config`, sends one request to `path`, stops it, and returns its
/// stderr.
async fn run_and_capture(config: &str, path: &str) -> String {
    run_and_capture_n(config, path, 1).await
}

/// As [`run_and_capture`], with `n` requests, the stop sent right after the last answer.
async fn run_and_capture_n(config: &str, path: &str, n: usize) -> String {
    let (_dir, file) = write_config(&format!("access-{}.toml", common::free_port()), config);
    let log = file.with_extension("log");
    let child = spawn_logged(&file, &log, "info");
    let port: u16 = config
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|p| p.parse().ok())
        .expect("port in config");
    let addr = format!("127.0.0.1:{port}");
    wait_listening(addr.parse().expect("addr")).await;
    for _ in 0..n {
        let answer = get_with(
            &format!("http://{addr}{path}"),
            &[("x-request-id", "trace-me-1")],
        )
        .await;
        assert_eq!(answer.status, 200);
    }
    stop_gracefully(child);
    std::fs::read_to_string(&log).expect("read log")
}

/// palisade run with `config` (from [`access_config`]), logging JSON at info to a file,
/// serving on the config's listen address.
struct Logged {
    _dir: TempDir,
    log: std::path::PathBuf,
    child: ChildGuard,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Logged {
    async fn start(config: &str) -> Logged {
        let (dir, file) = write_config(&format!("logged-{}.toml", common::free_port()), config);
        let log = file.with_extension("log");
        let child = spawn_logged(&file, &log, "info");
        let address = |key: &str| -> std::net::SocketAddr {
            config
                .split(key)
                .nth(1)
                .and_then(|rest| rest.split('"').nth(1))
                .and_then(|a| a.parse().ok())
                .expect("address in config")
        };
        let (addr, admin) = (address("listen = ["), address("[admin]\nlisten ="));
        let up = eventually(Duration::from_secs(20), async || {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        assert!(
            up,
            "palisade never listened on {addr}; its log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Logged {
            _dir: dir,
            log,
            child,
            addr,
            admin,
        }
    }

    /// Stops palisade; its log.
    fn stop(self) -> String {
        stop_gracefully(self.child);
        std::fs::read_to_string(&self.log).expect("read log")
    }
}

/// The access lines of a JSON log.
fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "palisade::access")
        .collect()
}

/// The access line for `path` (the whole log in the panic when there is none).
fn access_line<'a>(lines: &'a [serde_json::Value], path: &str, log: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["path"] == path)
        .unwrap_or_else(|| panic!("no access line for {path}: {log}"))
}

fn access_config(access_log: bool, echo: std::net::SocketAddr) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\naccess_log = {access_log}\n[admin]\nlisten = \"127.0.0.1:{}\"\n[[routes]]\nname = \"web\"\nupstream = \"app\"\n[upstreams.app]\nbackends = [{{ addr = \"{echo}\" }}]\n",
        common::free_port(),
        common::free_port()
    )
}

#[tokio::test]
async fn the_access_log_writes_one_json_line_per_request_in_utc() {
    let echo = Echo::start("a").await;
    let log = run_and_capture(&access_config(true, echo.addr), "/shop?item=3").await;
    let lines = access_lines(&log);
    assert_eq!(lines.len(), 1, "{log}");
    let line = &lines[0];
    let time = line["timestamp"].as_str().unwrap_or_default();
    assert!(
        time.ends_with('Z') && time.contains('T'),
        "not RFC 3339 UTC: {time}"
    );
    assert_eq!(line["request_id"], "trace-me-1");
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/shop?item=3");
    assert_eq!(line["status"], 200);
    assert_eq!(line["route"], "web");
    assert_eq!(line["upstream"], "app");
    assert_eq!(line["backend"], echo.addr.to_string());
    assert_eq!(line["attempts"], 1);
    assert!(line["host"]
        .as_str()
        .is_some_and(|h| h.starts_with("127.0.0.1:")));
    assert!(line["bytes_out"].as_i64().is_some_and(|b| b > 0));
    assert!(line["duration_ms"].as_f64().is_some());
}

/// Voluntary context switches of process `pid`'s thread named `name` (0 when it has none).
fn thread_switches(pid: u32, name: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

#[tokio::test]
async fn the_access_log_flusher_sleeps_while_idle_and_wakes_for_the_next_line() {
    // The flusher thread wrote the batches every 20 ms whether or not a line had come: 50
    // wake-ups a second on an idle proxy, or one with the access log off. It now sleeps
    // after a second without a line, and a line wakes it.
    let echo = Echo::start("a").await;
    let palisade = Logged::start(&access_config(true, echo.addr)).await;
    let pid = palisade.child.0.id();
    let answer = get(&format!("http://{}/before", palisade.addr)).await;
    assert_eq!(answer.status, 200);
    let logged = |path: &'static str| {
        let log = palisade.log.clone();
        async move || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            access_lines(&text).iter().any(|l| l["path"] == path)
        }
    };
    assert!(eventually(Duration::from_secs(5), logged("/before")).await);
    // Idle: after its second of grace (longer on a busy machine) the thread falls asleep
    // and stays asleep (at 50 a second it would switch about 100 times in these 2 s).
    let mut before = thread_switches(pid, "palisade-access");
    let asleep = eventually(Duration::from_secs(10), async || {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = thread_switches(pid, "palisade-access");
        std::mem::replace(&mut before, now) == now
    })
    .await;
    assert!(asleep, "the idle flusher never fell asleep");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let woke = thread_switches(pid, "palisade-access") - before;
    assert!(before > 0, "no palisade-access thread in /proc/{pid}/task");
    assert!(woke <= 5, "the idle flusher woke {woke} times in 2 s");
    // The next line wakes it and is written.
    let answer = get(&format!("http://{}/after", palisade.addr)).await;
    assert_eq!(answer.status, 200);
    assert!(
        eventually(Duration::from_secs(5), logged("/after")).await,
        "the line after the idle spell was not written: {}",
        std::fs::read_to_string(&palisade.log).unwrap_or_default()
    );
    palisade.stop();
}

#[tokio::test]
async fn the_access_line_names_the_host_of_refused_requests_and_of_hosts_that_are_not_utf8() {
    let echo = Echo::start("a").await;
    let palisade = Logged::start(&access_config(true, echo.addr)).await;
    let addr = palisade.addr;
    // Refused by the framing check, before routing: its Host is still in its line.
    let (answer, _) = raw_exchange(
        addr,
        b"POST /smuggle HTTP/1.1\r\nHost: refused.test\r\nX-Request-Id: refused-1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    // obs-text in Host: logged with U+FFFD where it is not UTF-8, the line still JSON.
    let (answer, _) = raw_exchange(
        addr,
        b"GET /caf HTTP/1.1\r\nHost: caf\xe9\"q\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    let log = palisade.stop();
    let lines = access_lines(&log);
    let line = |path: &str| access_line(&lines, path, &log);
    assert_eq!(line("/smuggle")["host"], "refused.test");
    assert_eq!(line("/smuggle")["status"], 400);
    // Refused before it was forwarded, it still has its id: the client's, or a new one.
    assert_eq!(line("/smuggle")["request_id"], "refused-1");
    let made = line("/caf")["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        made.len() == 32 && made.bytes().all(|b| b.is_ascii_hexdigit()),
        "{made:?}"
    );
    assert_eq!(line("/caf")["host"], "caf\u{fffd}\"q");
}

/// Heads the HTTP/1.1 codec refuses (431 over the limit; 400 for obs-fold, for bytes that
/// are not HTTP) were answered, but neither counted nor logged: a flood of them was
/// invisible to the metrics and the access log.
#[tokio::test]
async fn an_ipv4_client_of_a_dual_stack_listener_is_logged_as_its_ipv4_address() {
    // On `[::]`, IPv4 clients arrive as ::ffff:a.b.c.d: requests refused before routing
    // (404, 400, 431) were logged under that address, the rest under a.b.c.d.
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("no IPv6 sockets on this machine: nothing to test");
        return;
    }
    let echo = Echo::start("a").await;
    let port = common::free_port();
    let palisade = Logged::start(&format!(
        "[server]\nlisten = [\"[::]:{port}\"]\n[admin]\nlisten = \"127.0.0.1:{}\"\n\
         [[routes]]\npath_prefix = \"/web\"\nupstream = \"app\"\n\
         [upstreams.app]\nbackends = [{{ addr = \"{}\" }}]\n",
        common::free_port(),
        echo.addr
    ))
    .await;
    // Whatever net.ipv6.bindv6only says, `[::]` takes IPv4 clients too.
    let web = get(&format!("http://127.0.0.1:{port}/web")).await;
    assert_eq!(web.status, 200);
    assert_eq!(web.json()["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(
        get(&format!("http://127.0.0.1:{port}/nowhere"))
            .await
            .status,
        404
    );
    let log = palisade.stop();
    let lines = access_lines(&log);
    for path in ["/web", "/nowhere"] {
        assert_eq!(
            access_line(&lines, path, &log)["client_ip"],
            "127.0.0.1",
            "{path}"
        );
    }
}

#[tokio::test]
async fn heads_the_codec_refuses_are_counted_and_get_an_access_line() {
    let echo = Echo::start("a").await;
    let palisade = Logged::start(&access_config(true, echo.addr)).await;
    let (addr, admin) = (palisade.addr, palisade.admin);
    let big = format!(
        "GET /too-big HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70_000)
    );
    let refused: [(&[u8], &str); 3] = [
        (big.as_bytes(), "HTTP/1.1 431 "),
        (
            b"GET /folded HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
            "HTTP/1.1 400 ",
        ),
        // A TLS ClientHello's first bytes on the plain port.
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            "HTTP/1.1 400 ",
        ),
    ];
    for (raw, status) in refused {
        let (answer, _) = raw_exchange(addr, raw, Duration::from_secs(5)).await;
        assert!(answer.starts_with(status), "{answer}");
    }
    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    let count = |code: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("palisade_requests_total{")
                    && l.contains("route=\"\"")
                    && l.contains(&format!("code=\"{code}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    assert_eq!(count("431"), Some(1), "{metrics}");
    assert_eq!(count("400"), Some(2), "{metrics}");
    let log = palisade.stop();
    let lines = access_lines(&log);
    let line = |path: &str| access_line(&lines, path, &log);
    assert_eq!(line("/too-big")["status"], 431);
    assert_eq!(line("/too-big")["method"], "GET");
    assert_eq!(line("/folded")["status"], 400);
    assert_eq!(line("/folded")["route"], "-");
    assert_eq!(line("/folded")["client_ip"], "127.0.0.1");
    // Bytes that are not a request line are logged as "-", never raw.
    let garbage = line("-");
    assert_eq!(garbage["method"], "-");
    assert_eq!(garbage["status"], 400);
    assert_eq!(lines.len(), 3, "{log}");
}

/// A request whose client went away before its answer had no access line at all.
#[tokio::test]
async fn a_request_whose_client_leaves_gets_a_499_access_line() {
    let echo = Echo::start("a").await;
    let palisade = Logged::start(&access_config(true, echo.addr)).await;
    let addr = palisade.addr;
    let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut client,
        b"GET /delay/5000 HTTP/1.1\r\nhost: gone.test\r\nx-request-id: gone-1\r\n\r\n",
    )
    .await
    .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = palisade.stop();
    let lines = access_lines(&log);
    let line = access_line(&lines, "/delay/5000", &log);
    assert_eq!(line["status"], 499);
    assert_eq!(line["request_id"], "gone-1");
    assert_eq!(line["host"], "gone.test");
    assert_eq!(line["route"], "web");
    assert_eq!(line["backend"], echo.addr.to_string());
    assert!(
        line["duration_ms"].as_f64().is_some_and(|ms| ms < 3000.0),
        "{line}"
    );
}

/// At max_connections with no connection idle, every refused connection wrote a warning:
/// a flood of connections was a flood of log lines (9,890 in 3 s in an audit).
#[tokio::test]
async fn refusals_at_max_connections_are_logged_at_most_once_a_second() {
    let echo = Echo::start("a").await;
    let config = format!(
        "{}[server.limits]\nmax_connections = 1\n",
        access_config(false, echo.addr)
    );
    let palisade = Logged::start(&config).await;
    let active = async || {
        let metrics = get(&format!("http://{}/metrics", palisade.admin))
            .await
            .text();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("palisade_connections_active "))
            .and_then(|n| n.parse::<u64>().ok())
    };
    let at_backend = async || {
        let metrics = get(&format!("http://{}/metrics", palisade.admin))
            .await
            .text();
        sample(
            &metrics,
            "palisade_backend_in_flight",
            &[("backend", &echo.addr.to_string())],
        )
    };
    // wait_listening's probe connection has gone.
    assert!(eventually(Duration::from_secs(5), async || active().await == Some(0)).await);
    // The one slot, busy for 8 s.
    let mut busy = tokio::net::TcpStream::connect(palisade.addr)
        .await
        .expect("connect");
    let request = b"GET /delay/8000 HTTP/1.1\r\nhost: x\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut busy, request)
        .await
        .expect("write");
    // Counted, and its request at the backend: a connection whose head is not read yet
    // would still look idle, and make room for the next.
    let counted = eventually(Duration::from_secs(10), async || {
        active().await == Some(1) && at_backend().await == Some(1.0)
    })
    .await;
    assert!(
        counted,
        "the busy connection is not counted: {:?}, at the backend: {:?}; log: {}",
        active().await,
        at_backend().await,
        std::fs::read_to_string(&palisade.log).unwrap_or_default()
    );
    let started = std::time::Instant::now();
    for i in 0..50 {
        let (answer, closed) = raw_exchange(
            palisade.addr,
            b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
            Duration::from_secs(3),
        )
        .await;
        assert!(
            closed && answer.is_empty(),
            "{i} after {:?}: served over the cap: {answer}",
            started.elapsed()
        );
    }
    // Each refusal is counted, also those after the last warning.
    let metrics = get(&format!("http://{}/metrics", palisade.admin))
        .await
        .text();
    let listener = palisade.addr.to_string();
    assert_eq!(
        sample(
            &metrics,
            "palisade_connections_refused_total",
            &[("listener", &listener)]
        ),
        Some(50.0),
        "{metrics}"
    );
    drop(busy);
    let log = palisade.stop();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("max_connections reached"))
        .collect();
    assert!(
        !warnings.is_empty() && warnings.len() <= 3,
        "{} warnings for 50 refusals: {log}",
        warnings.len()
    );
}

#[tokio::test]
async fn every_access_line_reaches_the_log_when_the_process_stops_right_after() {
    // Access lines are batched per thread and handed to the writer every 20 ms; the ones
    // still batched at exit are flushed by the log guard, not lost.
    let echo = Echo::start("a").await;
    let log = run_and_capture_n(&access_config(true, echo.addr), "/burst", 300).await;
    let lines = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "palisade::access" && v["path"] == "/burst")
        .count();
    assert_eq!(lines, 300, "{log}");
}

#[tokio::test]
async fn access_log_false_writes_no_access_lines() {
    let echo = Echo::start("a").await;
    let log = run_and_capture(&access_config(false, echo.addr), "/").await;
    assert!(!log.contains("palisade::access"), "{log}");
}

#[tokio::test]
async fn a_burst_of_long_access_lines_reaches_the_log_whole() {
    // 40 pipelined requests with 48 KiB targets, refused at routing (no backend round
    // trip), make 1.9 MB of access lines on one connection within a few milliseconds: the
    // handling thread hands its batch over itself each time it passes 1 MiB, between the
    // flusher's 20 ms rounds. No line may be lost, repeated or cut.
    let port = common::free_port();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\naccess_log = true\n[admin]\nlisten = \"127.0.0.1:{}\"\n[[routes]]\nname = \"web\"\nhost = \"app.test\"\nupstream = \"app\"\n[upstreams.app]\nbackends = [{{ addr = \"127.0.0.1:9\" }}]\n",
        common::free_port()
    );
    let (_dir, file) = write_config(&format!("burst-{port}.toml"), &config);
    let log = file.with_extension("log");
    let child = spawn_logged(&file, &log, "info");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_listening(addr).await;
    let filler = "a".repeat(48 * 1024);
    let mut raw = Vec::new();
    for i in 0..40 {
        let close = if i == 39 { "Connection: close\r\n" } else { "" };
        raw.extend_from_slice(
            format!("GET /{i:02}/{filler} HTTP/1.1\r\nHost: other.test\r\n{close}\r\n").as_bytes(),
        );
    }
    let (answer, closed) = raw_exchange(addr, &raw, Duration::from_secs(10)).await;
    assert!(closed, "no close after the last request");
    assert_eq!(answer.matches("HTTP/1.1 404 ").count(), 40, "{answer}");
    stop_gracefully(child);
    let log = std::fs::read_to_string(&log).expect("read log");
    let mut paths: Vec<String> = access_lines(&log)
        .into_iter()
        .filter_map(|v| v["path"].as_str().map(str::to_owned))
        .collect();
    let expected: Vec<String> = (0..40).map(|i| format!("/{i:02}/{filler}")).collect();
    assert_eq!(paths.len(), 40, "access lines in the log");
    // Each thread's lines stay in order; a connection's task may move between the
    // runtime's threads, so the lines of one connection need not.
    paths.sort();
    assert!(paths == expected, "access lines lost, repeated or changed");
    let access_bytes: usize = log
        .lines()
        .filter(|l| l.contains("\"palisade::access\""))
        .map(|l| l.len() + 1)
        .sum();
    assert!(access_bytes > 1 << 20, "only {access_bytes} bytes of lines");
}

#[tokio::test]
async fn a_second_echo_on_a_taken_port_fails_instead_of_sharing_it() {
    // `echo` and `demo` bind without SO_REUSEPORT: a second one on the same port used
    // to start and take half the connections, silently.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let first = spawn_palisade(&["echo", "--listen", &listen, "--name", "first"]);
    wait_listening(listen.parse().expect("addr")).await;
    let second = palisade_within(&["echo", "--listen", &listen, "--name", "second"], &[]);
    let (code, err) = second.expect("the second echo exits instead of serving");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Address already in use"), "{err}");
    stop_gracefully(first);
}
