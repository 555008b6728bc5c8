//! The pooled HTTP client palisade uses for HTTPS upstreams, and the connector of HTTPS
//! and h2c upstreams (plain HTTP/1.1 upstreams use the backends' own pools,
//! [`super::pool`]; h2c upstreams one HTTP/2 connection per backend, [`super::h2`]).
//!
//! One keep-alive pool per upstream (hyper-util's legacy client; the pool is keyed by
//! backend address), TCP_NODELAY, a connect timeout, HTTP/1.1 or HTTP/2 prior knowledge as
//! the upstream's `protocol` says, and TLS to the backends when the upstream has
//! `tls = true` (rustls: the system roots or `ca_file`, the backend's host or
//! `server_name` as the name to verify).

use std::time::Duration;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::config::{self, Protocol};
use crate::proxy::body::ProxyBody;

/// The connector of every upstream: plain TCP, or TLS over it for `https` URIs.
pub type Connector = HttpsConnector<HttpConnector>;

/// The client type of every upstream.
pub type HttpClient = Client<Connector, ProxyBody>;

/// Builds the pooled client for one upstream, on its `connector`.
pub fn build(cfg: &config::Upstream, connector: Connector) -> HttpClient {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(cfg.timeouts.idle)
        .http2_only(cfg.protocol == Protocol::H2c);
    if cfg.timeouts.idle.is_zero() {
        builder.pool_max_idle_per_host(0);
    }
    builder.build(connector)
}

/// The connector for one upstream's backends (also used by its health probes).
pub fn connector(cfg: &config::Upstream, connect_timeout: Duration) -> Connector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    // https URIs go through this connector too.
    http.enforce_http(false);

    let provider = crate::tls::provider();
    let with_roots = match cfg.tls.as_ref() {
        // Plain upstreams never use TLS; an empty trust store keeps construction cheap.
        None => {
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(client_config(Vec::new()))
        }
        Some(tls) => match &tls.ca_file {
            Some(path) => match load_roots(path) {
                Ok(roots) => {
                    hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(client_config(roots))
                }
                Err(e) => {
                    tracing::error!(upstream = %cfg.name, error = %e, "cannot load ca_file; TLS to this upstream fails");
                    hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(client_config(Vec::new()))
                }
            },
            None => match hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(provider)
            {
                Ok(builder) => builder,
                Err(e) => {
                    tracing::error!(upstream = %cfg.name, error = %e, "cannot load the system's CA roots; TLS to this upstream fails");
                    hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(client_config(Vec::new()))
                }
            },
        },
    };
    let schemes = with_roots.https_or_http();
    let schemes = match cfg
        .tls
        .as_ref()
        .and_then(|t| t.server_name.clone())
        .and_then(|name| ServerName::try_from(name).ok())
    {
        Some(name) => schemes.with_server_name_resolver(FixedServerNameResolver::new(name)),
        None => schemes,
    };
    match cfg.protocol {
        Protocol::Http1 => schemes.enable_http1().wrap_connector(http),
        Protocol::H2c => schemes.enable_http2().wrap_connector(http),
    }
}

fn client_config(roots: Vec<CertificateDer<'static>>) -> ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        let _ = store.add(cert);
    }
    ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        // A property of the compiled-in ring provider, not of any input.
        .expect("the ring provider supports the default TLS versions")
        .with_root_certificates(store)
        .with_no_client_auth()
}

/// Reads the CA certificates of `ca_file`.
pub fn load_roots(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    crate::tls::read_certificates("ca_file", path)
}
