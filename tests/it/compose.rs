//! docker-compose.yml, the Dockerfile, and the Prometheus and Grafana files under config/
//! must agree with each other and with palisade: no Docker engine runs here, so this test
//! reads them and checks every file, port, service and metric they name.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    let mut docs = YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"));
    assert_eq!(docs.len(), 1, "{path}: one YAML document expected");
    docs.remove(0)
}

fn strings(node: &Yaml) -> Vec<String> {
    node.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn compose() -> Yaml {
    yaml("docker-compose.yml")
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let s = &compose["services"][name];
    assert!(
        !s.is_badvalue(),
        "docker-compose.yml has no service {name:?}"
    );
    s
}

/// (host path, container path) of a service's bind mounts.
fn mounts(service: &Yaml) -> Vec<(String, String)> {
    strings(&service["volumes"])
        .iter()
        .map(|v| {
            let mut parts = v.split(':');
            let host = parts.next().unwrap_or_default().to_owned();
            let container = parts.next().unwrap_or_default().to_owned();
            (host, container)
        })
        .collect()
}

/// The host file mounted at `container` in `service`.
fn mounted_at(service: &Yaml, container: &str) -> String {
    mounts(service)
        .into_iter()
        .find_map(|(h, c)| (c == container).then_some(h))
        .unwrap_or_else(|| panic!("nothing mounted at {container}"))
}

/// The docker config as palisade reads it (TOML).
fn docker_config() -> toml::Table {
    read("config/docker/palisade.toml")
        .parse()
        .expect("config/docker/palisade.toml is TOML")
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

#[test]
fn every_service_is_there_and_every_file_it_names_exists() {
    let compose = compose();
    let services: BTreeSet<&str> = compose["services"]
        .as_hash()
        .expect("services")
        .keys()
        .filter_map(Yaml::as_str)
        .collect();
    for wanted in [
        "palisade",
        "backend1",
        "backend2",
        "backend3",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains(wanted), "missing service {wanted}");
    }
    for name in &services {
        let s = service(&compose, name);
        if !s["build"].is_badvalue() {
            let context = root().join(s["build"]["context"].as_str().expect("build.context"));
            assert!(context.is_dir(), "{name}: build context {context:?}");
            let dockerfile =
                context.join(s["build"]["dockerfile"].as_str().unwrap_or("Dockerfile"));
            assert!(dockerfile.is_file(), "{name}: {dockerfile:?} missing");
        }
        for (host, _) in mounts(s) {
            assert!(
                root().join(&host).exists(),
                "{name} mounts {host}, which does not exist"
            );
        }
        for port in strings(&s["ports"]) {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond the host's loopback"
            );
        }
    }
}

#[test]
fn palisade_runs_the_docker_config_on_the_ports_it_publishes() {
    let compose = compose();
    let palisade = service(&compose, "palisade");
    let command = strings(&palisade["command"]);
    let config_path = command
        .windows(2)
        .find_map(|w| (w[0] == "-c").then(|| w[1].clone()))
        .expect("palisade's command names its config with -c");
    assert_eq!(
        mounted_at(palisade, &config_path),
        "./config/docker/palisade.toml"
    );

    let config = docker_config();
    let listen = config["server"]["listen"][0]
        .as_str()
        .expect("server.listen");
    let admin = config["admin"]["listen"].as_str().expect("admin.listen");
    let published: Vec<(u16, u16)> = strings(&palisade["ports"])
        .iter()
        .map(|p| {
            let parts: Vec<&str> = p.split(':').collect();
            let n = parts.len();
            (
                parts[n - 2].parse().expect("host port"),
                parts[n - 1].parse().expect("container port"),
            )
        })
        .collect();
    for addr in [listen, admin] {
        assert!(
            addr.starts_with("0.0.0.0:"),
            "{addr}: inside the container palisade must listen beyond its loopback"
        );
        assert!(
            published.iter().any(|&(_, c)| c == port_of(addr)),
            "port of {addr} is not published: {published:?}"
        );
    }

    // The backends are the echo services, on the ports palisade proxies to.
    let backends = config["upstreams"]["app"]["backends"]
        .as_array()
        .expect("upstreams.app.backends");
    assert_eq!(backends.len(), 3);
    for backend in backends {
        let addr = backend["addr"].as_str().expect("addr");
        let (host, port) = addr.split_once(':').expect("host:port");
        let command = strings(&service(&compose, host)["command"]);
        assert_eq!(command.first().map(String::as_str), Some("echo"), "{host}");
        let listen = command
            .windows(2)
            .find_map(|w| (w[0] == "--listen").then(|| w[1].clone()))
            .unwrap_or_else(|| panic!("{host}: no --listen"));
        assert_eq!(
            listen,
            format!("0.0.0.0:{port}"),
            "{host} listens elsewhere than palisade expects"
        );
        assert_eq!(
            service(&compose, host)["image"].as_str(),
            palisade["image"].as_str(),
            "{host} runs palisade's image"
        );
    }
}

#[test]
fn the_docker_config_passes_palisade_check() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["check", "-c"])
        .arg(root().join("config/docker/palisade.toml"))
        .output()
        .expect("run palisade check");
    assert!(
        out.status.success(),
        "palisade check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_image_is_multi_stage_and_runs_as_non_root() {
    let dockerfile = read("Dockerfile");
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    let last = stages[stages.len() - 1];
    let user = last
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "runs as {user}"
    );
    let copied = last
        .lines()
        .find_map(|l| {
            l.strip_prefix("COPY --from=")
                .and_then(|rest| rest.split_whitespace().last())
        })
        .expect("the runtime stage copies the binary from the build stage");
    assert!(
        last.contains(&format!("ENTRYPOINT [\"{copied}\"]")),
        "ENTRYPOINT runs {copied}"
    );
    let config = docker_config();
    for addr in [
        config["server"]["listen"][0].as_str().expect("listen"),
        config["admin"]["listen"].as_str().expect("admin"),
    ] {
        let port = port_of(addr);
        assert!(
            last.lines()
                .any(|l| l.starts_with("EXPOSE")
                    && l.split_whitespace().any(|p| p == port.to_string())),
            "EXPOSE {port}"
        );
    }
    for copied in last.lines().filter_map(|l| l.strip_prefix("COPY ")) {
        if let Some(src) = copied
            .split_whitespace()
            .next()
            .filter(|s| !s.starts_with("--"))
        {
            assert!(
                root().join(src).exists(),
                "Dockerfile copies {src}, which does not exist"
            );
        }
    }
}

#[test]
fn prometheus_scrapes_palisades_admin_port() {
    let compose = compose();
    let prometheus = service(&compose, "prometheus");
    let config_flag = strings(&prometheus["command"])
        .into_iter()
        .find_map(|a| a.strip_prefix("--config.file=").map(str::to_owned))
        .expect("--config.file");
    let host_file = mounted_at(prometheus, &config_flag);
    let scrape = yaml(host_file.trim_start_matches("./"));
    let job = &scrape["scrape_configs"][0];
    assert_eq!(
        job["metrics_path"].as_str().unwrap_or("/metrics"),
        "/metrics"
    );
    let target = strings(&job["static_configs"][0]["targets"])
        .pop()
        .expect("a scrape target");
    let (host, port) = target.split_once(':').expect("host:port");
    service(&compose, host);
    let admin = docker_config()["admin"]["listen"]
        .as_str()
        .map(port_of)
        .expect("admin.listen");
    assert_eq!(port.parse::<u16>().ok(), Some(admin), "scrapes {target}");
}

#[tokio::test]
async fn grafana_provisions_the_datasource_and_dashboard_over_real_metric_names() {
    let compose = compose();
    let grafana = service(&compose, "grafana");
    let provisioning = mounted_at(grafana, "/etc/grafana/provisioning");
    let provisioning = provisioning.trim_start_matches("./");

    let datasources = yaml(&format!("{provisioning}/datasources/prometheus.yml"));
    let source = &datasources["datasources"][0];
    let uid = source["uid"].as_str().expect("datasource uid").to_owned();
    let url = source["url"].as_str().expect("datasource url");
    let host = url
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap_or_default();
    service(&compose, host);

    let providers = yaml(&format!("{provisioning}/dashboards/palisade.yml"));
    let folder = providers["providers"][0]["options"]["path"]
        .as_str()
        .expect("dashboard provider path");
    let host_folder = mounted_at(grafana, folder);
    let dashboard_path = Path::new(host_folder.trim_start_matches("./")).join("palisade.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(dashboard_path.to_str().expect("utf-8 path")))
            .expect("dashboard JSON");

    // Every panel and query uses the provisioned datasource.
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "{} panels", panels.len());
    let mut used = BTreeSet::new();
    for panel in panels {
        assert_eq!(
            panel["datasource"]["uid"],
            uid.as_str(),
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            assert_eq!(target["datasource"]["uid"], uid.as_str());
            let expr = target["expr"].as_str().expect("expr");
            used.extend(metric_names(expr));
        }
    }
    for wanted in [
        "palisade_requests_total",
        "palisade_request_duration_seconds",
        "palisade_backend_healthy",
        "palisade_retries_total",
    ] {
        assert!(used.contains(wanted), "the dashboard shows no {wanted}");
    }

    // ...and every metric it queries is one a running palisade exports.
    let backend = Echo::start("a").await;
    let proxy = Proxy::start(&single_upstream(
        &[(backend.addr, 1)],
        "[upstreams.app.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"50ms\"",
    ))
    .await;
    assert_eq!(get(&proxy.url("/")).await.status, 200);
    let exported: BTreeSet<String> = get(&proxy.admin_url("/metrics"))
        .await
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    for name in &used {
        assert!(
            exported.contains(name),
            "the dashboard queries {name}, which palisade does not export"
        );
    }
}

/// `palisade_*` metric names in a PromQL expression, histogram suffixes stripped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("palisade_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}
