//! The pooled HTTP client palisade uses for HTTPS upstreams, and the connector of HTTPS
//! and h2c upstreams (plain HTTP/1.1 upstreams use the backends' own pools,
//! [`super::pool`]; h2c upstreams one HTTP/2 connection per backend, [`super::h2`]).
//!
//! One keep-alive pool per upstream (hyper-util's legacy client; the pool is keyed by
//! backend address, so an upstream whose address changes name, by a reload or DNS, gets a
//! new client: see [`super::Upstream::build`]), TCP_NODELAY, a connect timeout, HTTP/1.1
//! or HTTP/2 prior knowledge as the upstream's `protocol` says, and TLS to the backends when the upstream has
//! `tls = true` (rustls: the system roots or `ca_file`; `server_name`, else the backend's
//! configured host, as the name to send in SNI and to verify, see [`ServerNames`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Uri;
use hyper_rustls::{
    DefaultServerNameResolver, FixedServerNameResolver, HttpsConnector, ResolveServerName,
};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};

use super::Backend;
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

/// The TLS names of an upstream's backends by the address connections go to.
///
/// Connections go to the resolved addresses of a backend name (the request URI's
/// authority is `ip:port`), but the certificate names the host as configured, and the
/// backend may pick its certificate by SNI: hyper-rustls asks this table, once per new
/// connection, for the name of the URI's authority. Shared by the connector, the health
/// probes' connector and every snapshot that keeps them, and updated by
/// [`super::Upstream::build`] as the addresses change. An authority without an entry (an
/// IP address as configured, a name not resolved yet) is its own name, as by default.
/// The names of the addresses before the last change are kept too: a request of an older
/// snapshot (queued, or retrying after its backoff) may still open a connection to an
/// address that is gone.
#[derive(Debug, Default, Clone)]
pub struct ServerNames(Arc<ArcSwap<NameTables>>);

/// The current address-to-name table and the one before it.
#[derive(Debug, Default)]
pub struct NameTables {
    now: HashMap<Box<str>, ServerName<'static>>,
    before: HashMap<Box<str>, ServerName<'static>>,
}

impl ServerNames {
    /// Maps each of `backends` whose address is not its configured host to that host.
    pub fn update(&self, backends: &[Arc<Backend>]) {
        let mut names = HashMap::new();
        for b in backends {
            if b.host == b.authority {
                continue;
            }
            let host = b.host.host();
            // An IP literal configured as a name keeps the default (no SNI).
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if let Ok(name) = ServerName::try_from(host.to_owned()) {
                names.insert(b.addr.clone(), name);
            }
        }
        let tables = self.0.load();
        if tables.now != names {
            self.0.store(Arc::new(NameTables {
                now: names,
                before: tables.now.clone(),
            }));
        }
    }
}

impl ResolveServerName for ServerNames {
    fn resolve(
        &self,
        uri: &Uri,
    ) -> Result<ServerName<'static>, Box<dyn std::error::Error + Sync + Send>> {
        if let Some(authority) = uri.authority() {
            let tables = self.0.load();
            let name = tables.now.get(authority.as_str());
            if let Some(name) = name.or_else(|| tables.before.get(authority.as_str())) {
                return Ok(name.clone());
            }
        }
        DefaultServerNameResolver::default().resolve(uri)
    }
}

/// The connector for one upstream's backends (also used by its health probes); without
/// a `server_name`, `names` gives the TLS name of each backend address.
pub fn connector(
    cfg: &config::Upstream,
    connect_timeout: Duration,
    names: &ServerNames,
) -> Connector {
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
        None => schemes.with_server_name_resolver(names.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(names: &ServerNames, uri: &'static str) -> String {
        match names.resolve(&Uri::from_static(uri)) {
            Ok(ServerName::DnsName(name)) => name.as_ref().to_owned(),
            Ok(ServerName::IpAddress(ip)) => format!("ip {ip:?}"),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn server_names_map_addresses_to_configured_names_and_follow_updates() {
        let names = ServerNames::default();
        names.update(&[
            Arc::new(Backend::named("10.0.0.1:443", "api.example.com:443", 1)),
            Arc::new(Backend::new("10.0.0.9:443", 1)),
            Arc::new(Backend::new("direct.example.com:443", 1)),
        ]);
        assert_eq!(name_of(&names, "https://10.0.0.1:443/"), "api.example.com");
        // Configured as an address, or not resolved yet: the URI's own host.
        assert!(name_of(&names, "https://10.0.0.9:443/").starts_with("ip "));
        assert_eq!(
            name_of(&names, "https://direct.example.com:443/"),
            "direct.example.com"
        );
        // The address now belongs to another name; the old one is gone.
        names.update(&[Arc::new(Backend::named(
            "10.0.0.1:443",
            "web.example.com:443",
            1,
        ))]);
        assert_eq!(name_of(&names, "https://10.0.0.1:443/"), "web.example.com");
        // A name moves to a new address: the old address keeps its name for one more
        // change, for requests of older snapshots still on their way to it.
        names.update(&[Arc::new(Backend::named(
            "10.0.0.2:443",
            "web.example.com:443",
            1,
        ))]);
        assert_eq!(name_of(&names, "https://10.0.0.2:443/"), "web.example.com");
        assert_eq!(name_of(&names, "https://10.0.0.1:443/"), "web.example.com");
        names.update(&[Arc::new(Backend::named(
            "10.0.0.3:443",
            "web.example.com:443",
            1,
        ))]);
        assert!(name_of(&names, "https://10.0.0.1:443/").starts_with("ip "));
    }
}
