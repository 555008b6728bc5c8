//! TLS termination with certificates generated at test time: HTTP/1.1 and h2 over TLS,
//! SNI picking one of two certificates, ALPN, certificate reload (and a broken one
//! keeping the old), and `check` catching bad PEM files.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Cert {
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn make_cert(names: &[&str]) -> Cert {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names).expect("rcgen");
    Cert {
        der: certified.cert.der().clone(),
        cert_pem: certified.cert.pem(),
        key_pem: certified.signing_key.serialize_pem(),
    }
}

fn write_pair(dir: &Path, stem: &str, cert: &Cert) {
    std::fs::write(dir.join(format!("{stem}.pem")), &cert.cert_pem).expect("cert");
    std::fs::write(dir.join(format!("{stem}-key.pem")), &cert.key_pem).expect("key");
}

fn temp_dir(tag: &str) -> TempDir {
    TempDir::new(&format!("tls-{tag}"))
}

/// A config with two certificates on one TLS address: a.test (the default) and b.test.
fn tls_config(dir: &Path, backend: SocketAddr) -> PathBuf {
    let path = dir.join("palisade.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[server.tls]]
listen = "127.0.0.1:8443"
cert = "a.pem"
key = "a-key.pem"

[[server.tls]]
listen = "127.0.0.1:8443"
cert = "b.pem"
key = "b-key.pem"
sni = ["b.test"]

[[routes]]
upstream = "app"

[upstreams.app]
backends = [{{ addr = "{backend}" }}]
"#
        ),
    )
    .expect("config");
    path
}

fn client_config(roots: &[&Cert], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store.add(cert.der.clone()).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn handshake(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let server_name = ServerName::try_from(name.to_owned()).expect("name");
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake")
}

fn served_cert(
    stream: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().expect("peer certs")[0]
        .clone()
        .into_owned()
}

#[tokio::test]
async fn https_with_sni_alpn_http1_and_h2() {
    let (a, b) = (make_cert(&["a.test"]), make_cert(&["b.test"]));
    let dir = temp_dir("main");
    write_pair(&dir, "a", &a);
    write_pair(&dir, "b", &b);
    let echo = Echo::start("e").await;
    let (proxy, tls) = Proxy::start_with_tls(&tls_config(&dir, echo.addr)).await;
    let addr = tls[&"127.0.0.1:8443".parse().expect("addr")];

    // SNI picks the certificate.
    let stream = handshake(addr, "b.test", client_config(&[&a, &b], &[])).await;
    assert_eq!(served_cert(&stream), b.der);
    let mut stream = handshake(addr, "a.test", client_config(&[&a, &b], &[b"http/1.1"])).await;
    assert_eq!(served_cert(&stream), a.der);

    // HTTP/1.1 over TLS, X-Forwarded-Proto https.
    let text = exchange_over(&mut stream, "/over-tls").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"x-forwarded-proto\":\"https\""), "{text}");

    // ALPN negotiates h2; a request over it works.
    let stream = handshake(
        addr,
        "a.test",
        client_config(&[&a, &b], &[b"h2", b"http/1.1"]),
    )
    .await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get("https://a.test/h2-over-tls")
        .body(Empty::<Bytes>::new())
        .expect("req");
    let resp = sender.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["path"], "/h2-over-tls");
    assert_eq!(json["headers"]["x-forwarded-proto"], "https");
    drop(proxy);
}

/// A proxy with [`tls_config`] after `settings`: the proxy, its TLS address, a.test's
/// certificate, and what must live as long as the proxy.
async fn tls_proxy_with(settings: &str) -> (Proxy, SocketAddr, Cert, (TempDir, Echo)) {
    let a = make_cert(&["a.test"]);
    let dir = temp_dir("with");
    write_pair(&dir, "a", &a);
    write_pair(&dir, "b", &make_cert(&["b.test"]));
    let echo = Echo::start("e").await;
    let path = tls_config(&dir, echo.addr);
    let config = std::fs::read_to_string(&path).expect("read config");
    std::fs::write(&path, format!("{settings}{config}")).expect("config");
    let (proxy, tls) = Proxy::start_with_tls(&path).await;
    let addr = tls[&"127.0.0.1:8443".parse().expect("addr")];
    (proxy, addr, a, (dir, echo))
}

#[tokio::test]
async fn a_tls_handshake_that_stalls_is_closed_at_header_read() {
    let (_proxy, addr, a, _keep) =
        tls_proxy_with("[server.timeouts]\nheader_read = \"500ms\"\n").await;

    // Nothing at all, then a ClientHello's record header and no more: both end at the
    // header_read deadline (a slowloris on the handshake), not before, not never.
    for sent in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00][..]] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(sent).await.expect("write");
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
        let waited = started.elapsed();
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "{sent:?}: not closed: {read:?}"
        );
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
            "{sent:?}: closed after {waited:?}"
        );
    }
    // A client that completes its handshake is served as before.
    let stream = handshake(addr, "a.test", client_config(&[&a], &[])).await;
    assert_eq!(served_cert(&stream), a.der);
}

/// At `max_connections`, a connection still in its TLS handshake holds a slot but sent
/// no request: it makes room, like an idle keep-alive connection. It was refused that:
/// counted, but unknown to eviction until its handshake ended, so a stalled handshake
/// kept every new client out for up to `header_read`.
#[tokio::test]
async fn at_max_connections_a_stalled_handshake_makes_room() {
    let (proxy, addr, a, _keep) = tls_proxy_with(
        "[server.limits]\nmax_connections = 1\n[server.timeouts]\nheader_read = \"60s\"\n",
    )
    .await;

    let mut stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let counted = eventually(Duration::from_secs(5), async || {
        proxy
            .state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    assert!(counted, "the stalled connection was never accepted");

    let status = https_status(addr, &a).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the stalled handshake still holds its slot: {read:?}"
    );
}

/// A GET of `path` for a.test on `stream`, with `connection: close`; the whole answer.
async fn exchange_over(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A GET over TLS to `addr` (certificate for a.test); the answer's status line.
async fn https_status(addr: SocketAddr, cert: &Cert) -> String {
    let mut stream = handshake(addr, "a.test", client_config(&[cert], &[])).await;
    exchange_over(&mut stream, "/")
        .await
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn tls_listeners_open_and_close_as_their_addresses_change() {
    let a = make_cert(&["a.test"]);
    let dir = temp_dir("tls-listen");
    write_pair(&dir, "a", &a);
    let echo = Echo::start("e").await;
    let (plain, admin, tls1, tls2) = (free_port(), free_port(), free_port(), free_port());
    let config = |tls: &[u16]| {
        let mut text = format!(
            "[server]\nlisten = [\"127.0.0.1:{plain}\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
        );
        for port in tls {
            text.push_str(&format!(
                "[[server.tls]]\nlisten = \"127.0.0.1:{port}\"\ncert = \"a.pem\"\nkey = \"a-key.pem\"\n"
            ));
        }
        text.push_str(&format!(
            "[[routes]]\nupstream = \"app\"\n[upstreams.app]\nbackends = [{{ addr = \"{}\" }}]\n",
            echo.addr
        ));
        text
    };
    let path = dir.write("palisade.toml", &config(&[]));
    let _child = spawn_palisade(&["run", "-c", &path.to_string_lossy()]);
    let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().expect("addr") };
    wait_listening(addr(plain)).await;
    // The admin API answers once the config file is watched (it starts after the watcher).
    let healthz = format!("http://{}/healthz", addr(admin));
    assert!(
        eventually(Duration::from_secs(10), async || get(&healthz).await.status
            == 200)
        .await
    );

    // Added by a reload (there was no TLS listener at all), then moved to another port.
    std::fs::write(&path, config(&[tls1])).expect("write");
    wait_listening(addr(tls1)).await;
    assert!(https_status(addr(tls1), &a)
        .await
        .starts_with("HTTP/1.1 200"));
    std::fs::write(&path, config(&[tls2])).expect("write");
    wait_listening(addr(tls2)).await;
    assert!(https_status(addr(tls2), &a)
        .await
        .starts_with("HTTP/1.1 200"));
    let closed = eventually(Duration::from_secs(3), async || {
        tokio::net::TcpStream::connect(addr(tls1)).await.is_err()
    })
    .await;
    assert!(closed, "the old TLS address still accepts connections");
}

#[tokio::test]
async fn a_reload_serves_new_certificates_and_a_broken_one_keeps_the_old() {
    let (a, b) = (make_cert(&["a.test"]), make_cert(&["b.test"]));
    let dir = temp_dir("reload");
    write_pair(&dir, "a", &a);
    write_pair(&dir, "b", &b);
    let echo = Echo::start("e").await;
    let (proxy, tls) = Proxy::start_with_tls(&tls_config(&dir, echo.addr)).await;
    let addr = tls[&"127.0.0.1:8443".parse().expect("addr")];

    let renewed = make_cert(&["a.test"]);
    write_pair(&dir, "a", &renewed);
    palisade::reload::reload(&proxy.state).expect("reload with the renewed certificate");
    let stream = handshake(addr, "a.test", client_config(&[&renewed, &b], &[])).await;
    assert_eq!(served_cert(&stream), renewed.der);

    // A key that does not match: the reload is refused, the renewed certificate stays.
    std::fs::write(dir.join("a-key.pem"), make_cert(&["x.test"]).key_pem).expect("key");
    let errors = palisade::reload::reload(&proxy.state).expect_err("mismatched key accepted");
    let text = errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        text.contains("a-key.pem") && text.contains("does not fit"),
        "{text}"
    );
    let stream = handshake(addr, "a.test", client_config(&[&renewed, &b], &[])).await;
    assert_eq!(served_cert(&stream), renewed.der);
}

/// Writes `text` as `name` in `dir`, runs `palisade check` on it, expects exit code 1;
/// returns the file's path as written in errors, and stderr.
fn check_fails(dir: &Path, name: &str, text: &str) -> (String, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["check", "-c", &path.to_string_lossy()])
        .output()
        .expect("run check");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    (path.to_string_lossy().into_owned(), err)
}

#[test]
fn check_reports_missing_and_mismatched_pem_files() {
    let dir = temp_dir("check");
    let a = make_cert(&["a.test"]);
    write_pair(&dir, "a", &a);
    // b's key belongs to another certificate; c does not exist.
    std::fs::write(dir.join("b.pem"), make_cert(&["b.test"]).cert_pem).expect("cert");
    std::fs::write(dir.join("b-key.pem"), make_cert(&["z.test"]).key_pem).expect("key");
    let (file, err) = check_fails(
        &dir,
        "bad.toml",
        "[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"a.pem\"\nkey = \"a-key.pem\"\n\n[[server.tls]]\nlisten = \"127.0.0.1:8444\"\ncert = \"b.pem\"\nkey = \"b-key.pem\"\n\n[[server.tls]]\nlisten = \"127.0.0.1:8445\"\ncert = \"c.pem\"\nkey = \"c-key.pem\"\n",
    );
    // Each at the value that names the file at fault (SPEC 1: PATH:LINE:COL): b's key,
    // c's certificate.
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with(&format!("error: {file}:9:7: server.tls[1]: private key "))
            && lines[0].contains("does not fit"),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "error: {file}:13:8: server.tls[2]: cannot read certificate "
        )) && lines[1].contains("c.pem"),
        "{err}"
    );

    // A backend CA bundle that cannot be read: at its ca_file value.
    let (file, err) = check_fails(
        &dir,
        "bad-ca.toml",
        "[[routes]]\nupstream = \"app\"\n[upstreams.app]\nbackends = [{ addr = \"127.0.0.1:1\" }]\ntls = true\nca_file = \"missing-ca.pem\"\n",
    );
    let expected = format!("error: {file}:6:11: upstreams.app: cannot read ca_file ");
    assert!(err.starts_with(&expected), "{err}");
}

#[tokio::test]
async fn certificate_files_a_rejected_config_names_are_watched_until_they_are_there() {
    // A config naming a certificate still to be issued (its directory not made yet) is
    // rejected; once the files are there, the reload goes through without a command.
    let cert = make_cert(&["localhost"]);
    let dir = temp_dir("cert-later");
    let echo = Echo::start("e").await;
    let (port, admin, tls_port) = (free_port(), free_port(), free_port());
    let plain = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[routes]]\nupstream = \"app\"\n[upstreams.app]\nbackends = [{{ addr = \"{}\" }}]\n",
        echo.addr
    );
    let path = dir.write("palisade.toml", &plain);
    let logs = temp_dir("cert-later-log");
    let log = logs.write("palisade.log", "");
    let child = spawn_logged(&path, &log, "info");
    wait_listening(([127, 0, 0, 1], port).into()).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let with_tls = format!(
        "{plain}[[server.tls]]\nlisten = \"127.0.0.1:{tls_port}\"\ncert = \"later/c.pem\"\nkey = \"later/c-key.pem\"\n"
    );
    std::fs::write(&path, with_tls).expect("write");
    let logged = |text: &'static str| {
        let log = log.clone();
        async move || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(text)
        }
    };
    assert!(eventually(Duration::from_secs(10), logged("reload rejected")).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = dir.join("later");
    std::fs::create_dir_all(&later).expect("mkdir");
    write_pair(&later, "c", &cert);
    let served = eventually(Duration::from_secs(10), async || {
        tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .is_ok()
    })
    .await;
    assert!(
        served,
        "the certificate was there, the reload never came: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(eventually(Duration::from_secs(10), logged("configuration reloaded")).await);
    stop_gracefully(child);
}

#[tokio::test]
async fn replacing_the_certificate_files_is_noticed_without_a_reload_command() {
    let (a, b) = (make_cert(&["a.test"]), make_cert(&["b.test"]));
    let dir = temp_dir("watch");
    write_pair(&dir, "a", &a);
    write_pair(&dir, "b", &b);
    let echo = Echo::start("e").await;
    let (proxy, tls) = Proxy::start_with_tls(&tls_config(&dir, echo.addr)).await;
    let _watcher = palisade::reload::watch_config_file(proxy.state.clone()).expect("watch");
    let addr = tls[&"127.0.0.1:8443".parse().expect("addr")];
    let renewed = make_cert(&["b.test"]);
    // Written the way renewers do it: new files renamed over the old ones.
    for (name, text) in [
        ("b.pem", &renewed.cert_pem),
        ("b-key.pem", &renewed.key_pem),
    ] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
    assert!(
        comes_to_serve(addr, &a, &renewed).await,
        "the renewed certificate was not picked up"
    );
}

/// Whether `addr` serves `cert` for b.test within 3 s (`a` is trusted too).
async fn comes_to_serve(addr: SocketAddr, a: &Cert, cert: &Cert) -> bool {
    let config = client_config(&[a, cert], &[]);
    eventually(Duration::from_secs(3), async || {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("b.test".to_owned()).expect("name");
        match tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
        {
            Ok(stream) => served_cert(&stream) == cert.der,
            Err(_) => false,
        }
    })
    .await
}

#[tokio::test]
async fn certificate_files_a_reload_names_are_watched_too() {
    // The watch followed only the certificate files of the config palisade started
    // with: after a reload moved b.test to other files, renewing those went unnoticed.
    let (a, b, c) = (
        make_cert(&["a.test"]),
        make_cert(&["b.test"]),
        make_cert(&["b.test"]),
    );
    let dir = temp_dir("rewatch");
    write_pair(&dir, "a", &a);
    write_pair(&dir, "b", &b);
    let echo = Echo::start("e").await;
    let path = tls_config(&dir, echo.addr);
    let (proxy, tls) = Proxy::start_with_tls(&path).await;
    let _watcher = palisade::reload::watch_config_file(proxy.state.clone()).expect("watch");
    let addr = tls[&"127.0.0.1:8443".parse().expect("addr")];
    write_pair(&dir, "c", &c);
    let config = std::fs::read_to_string(&path).expect("read config");
    std::fs::write(
        &path,
        config
            .replace("\"b.pem\"", "\"c.pem\"")
            .replace("\"b-key.pem\"", "\"c-key.pem\""),
    )
    .expect("config");
    assert!(
        comes_to_serve(addr, &a, &c).await,
        "the reload to c.pem was not applied"
    );

    let renewed = make_cert(&["b.test"]);
    for (name, text) in [
        ("c.pem", &renewed.cert_pem),
        ("c-key.pem", &renewed.key_pem),
    ] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
    assert!(
        comes_to_serve(addr, &a, &renewed).await,
        "renewing the files the reload named went unnoticed"
    );
}

/// A certificate for `names`, written as `backend-ca.pem` to a new directory for `tag`,
/// and an HTTPS backend ([`https_backend`]) serving it.
async fn https_backend_and_ca(tag: &str, names: &[&str]) -> (TempDir, SocketAddr) {
    let cert = make_cert(names);
    let dir = temp_dir(tag);
    std::fs::write(dir.join("backend-ca.pem"), &cert.cert_pem).expect("ca");
    (dir, https_backend(&cert).await)
}

/// A TLS acceptor serving `cert`.
fn acceptor(cert: &Cert) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der.clone()], key)
    .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Listens on an ephemeral port and hands each connection, with an acceptor for `cert`, to
/// `serve`, whose future runs in a task of its own.
async fn tls_listener<F, Fut>(cert: &Cert, mut serve: F) -> SocketAddr
where
    F: FnMut(tokio_rustls::TlsAcceptor, tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = acceptor(cert);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(acceptor.clone(), tcp));
        }
    });
    addr
}

/// An HTTPS-only backend with `cert`, answering `tls-ok PATH`, with the SNI it got in
/// `x-sni` and the Host in `x-host` (`-`: none).
async fn https_backend(cert: &Cert) -> SocketAddr {
    https_backend_counted(cert).await.0
}

/// [`https_backend`], and the count of connections it accepted (handshakes begun).
async fn https_backend_counted(cert: &Cert) -> (SocketAddr, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = tls_listener(cert, move |acceptor, tcp| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let sni = stream.get_ref().1.server_name().unwrap_or("-").to_owned();
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let sni = sni.clone();
                    async move {
                        let body = format!("tls-ok {}", req.uri().path());
                        let mut resp =
                            http::Response::new(http_body_util::Full::new(Bytes::from(body)));
                        let host = req
                            .headers()
                            .get("host")
                            .cloned()
                            .unwrap_or(http::HeaderValue::from_static("-"));
                        resp.headers_mut().insert("x-host", host);
                        resp.headers_mut()
                            .insert("x-sni", sni.parse().expect("sni as a value"));
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await;
    (addr, accepted)
}

fn upstream_tls_config(dir: &Path, backend: impl std::fmt::Display, tls_lines: &str) -> PathBuf {
    let path = dir.join(format!("up-{}.toml", free_port()));
    std::fs::write(
        &path,
        format!("[[routes]]\nupstream = \"secure\"\n[upstreams.secure]\ntls = true\n{tls_lines}\nbackends = [{{ addr = \"{backend}\" }}]\n"),
    )
    .expect("config");
    path
}

#[tokio::test]
async fn https_backends_are_verified_against_ca_file_and_server_name() {
    let (dir, backend) = https_backend_and_ca("upstream", &["backend.test"]).await;

    let good = Proxy::start_file(&upstream_tls_config(
        &dir,
        backend,
        "ca_file = \"backend-ca.pem\"\nserver_name = \"backend.test\"",
    ))
    .await;
    let answer = get(&good.url("/secure-path")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "tls-ok /secure-path");

    // The certificate does not name other.test: refused.
    let wrong_name = Proxy::start_file(&upstream_tls_config(
        &dir,
        backend,
        "ca_file = \"backend-ca.pem\"\nserver_name = \"other.test\"",
    ))
    .await;
    assert_eq!(get(&wrong_name.url("/")).await.status, 502);

    // The system roots do not trust a self-signed certificate: refused.
    let untrusted = Proxy::start_file(&upstream_tls_config(
        &dir,
        backend,
        "server_name = \"backend.test\"",
    ))
    .await;
    assert_eq!(get(&untrusted.url("/")).await.status, 502);
}

#[tokio::test]
async fn a_dns_backend_gets_its_name_as_sni_and_is_verified_against_it() {
    // Connections go to the address the name resolved to; the certificate names the
    // host, and nothing else does: neither the address nor a server_name.
    let (dir, backend) = https_backend_and_ca("dns-name", &["localhost"]).await;
    let name = format!("localhost:{}", backend.port());
    let proxy = Proxy::start_file(&upstream_tls_config(
        &dir,
        &name,
        "ca_file = \"backend-ca.pem\"",
    ))
    .await;
    // What palisade's lookup of localhost gives (127.0.0.1 only: the backend is there).
    crate::dns::resolve(&proxy, &name, backend);
    assert_eq!(
        *proxy.state.snapshot().upstreams[0].backends[0].addr,
        backend.to_string()
    );

    let answer = get(&proxy.url("/named")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "tls-ok /named");
    assert_eq!(answer.header("x-sni"), Some("localhost"));

    // An HTTP/1.0 client without Host: the name is the Host too.
    let answer = raw_expect(proxy.addr, b"GET /bare HTTP/1.0\r\n\r\n", "HTTP/1.1 200 ").await;
    assert!(answer.contains(&format!("x-host: {name}\r\n")), "{answer}");
}

/// rustls warns about what a client does in its handshake (an IP address as SNI, among
/// others), once per handshake: any client could fill the log. palisade holds rustls to
/// errors unless `--log-level` names it.
#[tokio::test]
async fn a_client_sending_an_ip_address_as_sni_does_not_fill_the_log() {
    let backend = Echo::start("a").await;
    let dir = temp_dir("ip-sni");
    write_pair(&dir, "a", &make_cert(&["a.test"]));
    let port = free_port();
    let path = dir.join("palisade.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{}\"]\n[admin]\nlisten = \"127.0.0.1:{}\"\n\
             [[server.tls]]\nlisten = \"127.0.0.1:{port}\"\ncert = \"a.pem\"\nkey = \"a-key.pem\"\n\
             [[routes]]\nupstream = \"app\"\n[upstreams.app]\nbackends = [{{ addr = \"{}\" }}]\n",
            free_port(),
            free_port(),
            backend.addr
        ),
    )
    .expect("config");
    let run = async |level: &str| -> String {
        let log = dir.join(format!("{}.log", level.replace([',', '='], "-")));
        let child = spawn_logged(&path, &log, level);
        wait_listening(([127, 0, 0, 1], port).into()).await;
        for _ in 0..3 {
            let done = std::process::Command::new("openssl")
                .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
                .args(["-servername", "127.0.0.1"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run openssl s_client");
            assert!(done.success(), "openssl s_client failed");
        }
        stop_gracefully(child);
        std::fs::read_to_string(&log).expect("read log")
    };
    let quiet = run("info").await;
    assert!(!quiet.contains("Illegal SNI"), "{quiet}");
    // The same handshakes, with rustls' warnings asked for: they are there to be seen.
    let loud = run("info,rustls=warn").await;
    assert_eq!(loud.matches("Illegal SNI").count(), 3, "{loud}");
}

#[tokio::test]
async fn the_spec_examples_certificate_paths_work_from_the_repository() {
    // SPEC's example names `config/certs/localhost.pem`, a path from the repository's
    // root: with the config file elsewhere, a relative path that is not beside the file
    // is taken from the working directory (the tests run in the repository's root), and
    // the repository ships that localhost pair.
    let dir = temp_dir("spec-certs");
    let echo = Echo::start("e").await;
    let path = dir.write(
        "palisade.toml",
        &format!(
            "[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert = \"config/certs/localhost.pem\"\nkey = \"config/certs/localhost-key.pem\"\n[[routes]]\nupstream = \"app\"\n[upstreams.app]\nbackends = [{{ addr = \"{}\" }}]\n",
            echo.addr
        ),
    );
    let (_proxy, tls) = Proxy::start_with_tls(&path).await;
    let addr = tls[&"127.0.0.1:8443".parse().expect("addr")];
    let shipped = std::fs::read("config/certs/localhost.pem").expect("the shipped certificate");
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&shipped).expect("PEM");
    let cert = Cert {
        der,
        cert_pem: String::new(),
        key_pem: String::new(),
    };
    for name in ["localhost", "127.0.0.1"] {
        let mut stream = handshake(addr, name, client_config(&[&cert], &[])).await;
        let answer = exchange_over(&mut stream, "/").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{name}: {answer}");
    }
}

/// An HTTPS backend that answers the first request of each connection, keeping it
/// alive, then reads the second request and closes without answering (a keep-alive
/// timeout meeting a request on its way), with or without TLS close_notify. Counts the
/// request heads it read.
async fn https_closing_on_the_second_request(cert: &Cert) -> (SocketAddr, Arc<AtomicUsize>) {
    let heads = Arc::new(AtomicUsize::new(0));
    let count = heads.clone();
    let mut graceful = false;
    let addr = tls_listener(cert, move |acceptor, tcp| {
        let count = count.clone();
        // Every other connection ends with TLS close_notify, the others without.
        graceful = !graceful;
        let graceful = graceful;
        async move {
            let Ok(mut stream) = acceptor.accept(tcp).await else {
                return;
            };
            for answered in [true, false] {
                if request_head_bytes(&mut stream).await.is_none() {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                if answered {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(ok).await.is_err() || stream.flush().await.is_err() {
                        return;
                    }
                }
            }
            if graceful {
                let _ = stream.shutdown().await;
            }
        }
    })
    .await;
    (addr, heads)
}

/// An HTTPS backend that reads a request head on each connection and answers `answer`,
/// then closes. Counts the request heads it read.
async fn https_answering(cert: &Cert, answer: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let heads = Arc::new(AtomicUsize::new(0));
    let count = heads.clone();
    let addr = tls_listener(cert, move |acceptor, tcp| {
        let count = count.clone();
        async move {
            let Ok(mut stream) = acceptor.accept(tcp).await else {
                return;
            };
            if request_head_bytes(&mut stream).await.is_some() {
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(answer).await;
                let _ = stream.flush().await;
                let _ = stream.shutdown().await;
            }
        }
    })
    .await;
    (addr, heads)
}

#[tokio::test]
async fn an_https_backend_answer_that_is_not_http_is_a_502_http_protocol_error() {
    // HTTPS backends are spoken to through hyper's HTTP/1 client, not palisade's own codec:
    // its parse errors get the same 502 and Proxy-Status as the codec's (h1_upstream.rs),
    // not a connection error.
    let cert = make_cert(&["backend.test"]);
    let dir = temp_dir("garbled");
    std::fs::write(dir.join("backend-ca.pem"), &cert.cert_pem).expect("ca");
    let garbled: [(&str, &'static [u8]); 3] = [
        ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
        (
            "a bad status code",
            b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            "a line without a colon",
            b"HTTP/1.1 200 OK\r\nno colon here\r\ncontent-length: 0\r\n\r\n",
        ),
    ];
    for (what, answer) in garbled {
        let (backend, heads) = https_answering(&cert, answer).await;
        let proxy = Proxy::start_file(&upstream_tls_config(
            &dir,
            backend,
            "ca_file = \"backend-ca.pem\"\nserver_name = \"backend.test\"",
        ))
        .await;
        let got = get(&proxy.url("/")).await;
        assert_eq!(got.status, 502, "{what}: {}", got.text());
        assert_eq!(
            got.header("proxy-status"),
            Some("palisade; error=http_protocol_error"),
            "{what}"
        );
        assert!(heads.load(Ordering::SeqCst) >= 1, "{what}: never asked");
    }
}

#[tokio::test]
async fn an_https_keep_alive_connection_closed_on_a_request_gets_it_sent_again() {
    let cert = make_cert(&["backend.test"]);
    let dir = temp_dir("closing");
    std::fs::write(dir.join("backend-ca.pem"), &cert.cert_pem).expect("ca");
    let (backend, heads) = https_closing_on_the_second_request(&cert).await;
    let proxy = Proxy::start_file(&upstream_tls_config(
        &dir,
        backend,
        "ca_file = \"backend-ca.pem\"\nserver_name = \"backend.test\"",
    ))
    .await;
    // Each second request on a connection is read and dropped: a GET (idempotent, no
    // body) goes again on a new connection instead of failing with 502.
    for i in 0..4 {
        let answer = get(&proxy.url("/")).await;
        assert_eq!((i, answer.status), (i, 200), "{}", answer.text());
    }
    assert!(heads.load(Ordering::SeqCst) > 4, "no request was dropped");
    // A POST on the kept connection is dropped the same way: it may have been acted on,
    // so it is not sent again (a 502), and the backend saw it once.
    let before = heads.load(Ordering::SeqCst);
    let answer = post(&proxy.url("/"), b"once".to_vec()).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(
        heads.load(Ordering::SeqCst),
        before + 1,
        "the POST was sent again"
    );
}

#[tokio::test]
async fn a_backend_certificate_that_fails_verification_is_named_and_not_tried_again() {
    // `bad` serves a certificate for backend.test from a CA palisade does not trust;
    // `good` one it trusts. Handshakes that fail on a certificate are connect-phase
    // failures: the request was never sent, so it goes on to another backend whatever its
    // method, but never back to the backend whose certificate failed.
    let (dir, good) = https_backend_and_ca("bad-cert", &["backend.test"]).await;
    let (bad, bad_handshakes) = https_backend_counted(&make_cert(&["backend.test"])).await;
    let (port, admin) = (free_port(), free_port());
    let upstream = |name: &str, backends: &[SocketAddr], server_name: &str| {
        let list: Vec<String> = backends
            .iter()
            .map(|a| format!("{{ addr = \"{a}\" }}"))
            .collect();
        format!(
            "[upstreams.{name}]\ntls = true\nca_file = \"backend-ca.pem\"\nserver_name = \"{server_name}\"\n\
             backends = [{}]\n[upstreams.{name}.retry]\nattempts = 2\nbackoff = \"1ms\"\n",
            list.join(", ")
        )
    };
    let file = dir.write(
        "palisade.toml",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [[routes]]\npath_prefix = \"/solo\"\nupstream = \"solo\"\n\
             [[routes]]\npath_prefix = \"/misnamed\"\nupstream = \"misnamed\"\n\
             [[routes]]\nupstream = \"pair\"\n{}{}{}",
            upstream("solo", &[bad], "backend.test"),
            upstream("misnamed", &[good], "other.test"),
            upstream("pair", &[bad, good], "backend.test"),
        ),
    );
    let log = dir.write("palisade.log", "");
    let child = spawn_logged(&file, &log, "warn");
    let proxy: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_listening(proxy).await;

    // The only backend's certificate is untrusted: one handshake, not one per attempt.
    let answer = get(&format!("http://{proxy}/solo")).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    let proxy_status = answer.header("proxy-status").unwrap_or_default();
    assert!(
        proxy_status.starts_with("palisade; error=connection_refused"),
        "{proxy_status}"
    );
    assert_eq!(
        bad_handshakes.load(Ordering::SeqCst),
        1,
        "retried on the same backend"
    );
    // A certificate for another name: refused the same way.
    let answer = get(&format!("http://{proxy}/misnamed")).await;
    assert_eq!(answer.status, 502, "{}", answer.text());

    // With a backend to go on to, every request gets there, a POST too, and each tries
    // the failing backend once at most.
    for i in 0..4 {
        let answer = post(&format!("http://{proxy}/pair/{i}"), b"once".to_vec()).await;
        assert_eq!((i, answer.status), (i, 200), "{}", answer.text());
        assert_eq!(answer.text(), format!("tls-ok /pair/{i}"));
    }
    let handshakes = bad_handshakes.load(Ordering::SeqCst);
    assert!((2..=5).contains(&handshakes), "{handshakes}");

    // Each failed handshake counts against the backend, as a failed connect does.
    let status = get(&format!("http://127.0.0.1:{admin}/status"))
        .await
        .json();
    let failures = |upstream: &str, i: usize| {
        status["upstreams"][upstream]["backends"][i]["failures"]
            .as_u64()
            .unwrap_or(u64::MAX)
    };
    assert_eq!(failures("solo", 0), 1, "{status}");
    assert_eq!(failures("misnamed", 0), 1, "{status}");
    assert_eq!(failures("pair", 0) as usize, handshakes - 1, "{status}");
    assert_eq!(failures("pair", 1), 0, "{status}");

    // The log names the failure and the backend, with rustls' reason.
    stop_gracefully(child);
    let log = std::fs::read_to_string(&log).expect("read log");
    let failed = log_lines_saying(&log, "TLS handshake with backend");
    assert_eq!(failed.len(), handshakes + 1, "{log}");
    for line in &failed {
        let message = line["message"].as_str().unwrap_or_default();
        assert!(message.contains("certificate"), "{line}");
        let (reason, backend) = if line["upstream"] == "misnamed" {
            ("not valid for name \"other.test\"", good)
        } else {
            ("invalid peer certificate", bad)
        };
        assert!(message.contains(reason), "{line}");
        assert!(message.contains(&backend.to_string()), "{line}");
        assert_eq!(line["backend"], backend.to_string(), "{line}");
    }
}

#[tokio::test]
async fn a_backend_renamed_by_a_reload_gets_connections_with_its_new_name() {
    // a.test and b.test both resolve to the one backend, whose certificate names both
    // and which answers with the SNI of the connection each request came on.
    let cert = make_cert(&["a.test", "b.test"]);
    let dir = temp_dir("renamed");
    std::fs::write(dir.join("backend-ca.pem"), &cert.cert_pem).expect("ca");
    let (backend, accepted) = https_backend_counted(&cert).await;
    let (a, b) = (
        format!("a.test:{}", backend.port()),
        format!("b.test:{}", backend.port()),
    );
    let path = dir.join("palisade.toml");
    let write = |name: &str, attempts: u32| {
        std::fs::write(
            &path,
            format!(
                "[[routes]]\nupstream = \"secure\"\n[upstreams.secure]\ntls = true\n\
                 ca_file = \"backend-ca.pem\"\nbackends = [{{ addr = \"{name}\" }}]\n\
                 [upstreams.secure.retry]\nattempts = {attempts}\n"
            ),
        )
        .expect("config");
    };
    write(&a, 2);
    let proxy = Proxy::start_file(&path).await;
    proxy.state.set_resolved(palisade::dns::Resolved::from([
        (a.clone(), vec![backend]),
        (b.clone(), vec![backend]),
    ]));
    // Each request's SNI, and the connections the backend has taken so far.
    let sni_and_connections = async || {
        let answer = get(&proxy.url("/")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let sni = answer.header("x-sni").unwrap_or_default().to_owned();
        (sni, accepted.load(Ordering::SeqCst))
    };
    for _ in 0..2 {
        assert_eq!(sni_and_connections().await, ("a.test".into(), 1));
    }

    // A reload that leaves the name alone keeps the pooled connection.
    write(&a, 1);
    palisade::reload::reload(&proxy.state).expect("reload");
    assert_eq!(sni_and_connections().await, ("a.test".into(), 1));

    // Renamed, at the same address: a connection made for the new name, then kept.
    write(&b, 1);
    palisade::reload::reload(&proxy.state).expect("reload");
    assert_eq!(
        *proxy.state.snapshot().upstreams[0].backends[0].addr,
        backend.to_string()
    );
    for _ in 0..2 {
        assert_eq!(sni_and_connections().await, ("b.test".into(), 2));
    }
}
