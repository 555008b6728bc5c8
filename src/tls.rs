//! TLS termination: rustls server configs built from `[[server.tls]]`.
//!
//! One config per listen address; the entries sharing an address are picked by SNI (exact
//! name, then a `*.` wildcard entry), and the entry without `sni` (or the first one) is the
//! default for clients that send no name or an unknown one. TLS 1.2 and 1.3 only, ALPN
//! `h2` and `http/1.1`, the ring provider passed explicitly (a process with two providers
//! compiled in would otherwise panic). Certificates and keys are read on every (re)load: a
//! missing or malformed PEM file or a key that does not match its certificate is an
//! error, and a reload with such an error keeps the running certificates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, ConfigError};

/// The server configs of every TLS listen address.
pub type TlsConfigs = HashMap<SocketAddr, Arc<ServerConfig>>;

/// The crypto provider palisade uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a certificate chain and its private key, checking that they belong together.
pub fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, PemError> {
    let chain = read_certificates("certificate", cert).map_err(PemError::Cert)?;
    let pem = crate::config::read_file(key, crate::config::MAX_PEM_BYTES)
        .map_err(|e| PemError::Key(format!("cannot read private key {}: {e}", key.display())))?;
    let private = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let why = match e {
            pem::Error::NoItemsFound => {
                "no private key in it (PEM `PRIVATE KEY`, `RSA PRIVATE KEY` \
                 or `EC PRIVATE KEY`; encrypted keys are not supported)"
                    .to_owned()
            }
            other => pem_problem(&other),
        };
        PemError::Key(format!("private key {}: {why}", key.display()))
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        PemError::Key(format!(
            "private key {} does not fit certificate {}: {e}",
            key.display(),
            cert.display()
        ))
    })
}

/// The certificates of the PEM file at `path` (at least one), or what is wrong with it,
/// naming the file as `what` (`certificate`, `ca_file`).
pub fn read_certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = crate::config::read_file(path, crate::config::MAX_PEM_BYTES)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {}: {}", path.display(), pem_problem(&e)))?;
    if chain.is_empty() {
        return Err(format!(
            "no certificate in {what} {} (PEM `CERTIFICATE` sections)",
            path.display()
        ));
    }
    Ok(chain)
}

/// What a PEM parse error means, in words (the library's own names the END line it
/// missed as a list of byte values).
fn pem_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "a section has no `{}` line: the file is cut short",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "malformed PEM line `{}`",
            String::from_utf8_lossy(line).trim()
        ),
        pem::Error::Base64Decode(e) => format!("malformed PEM: bad base64 ({e})"),
        other => format!("malformed PEM: {other}"),
    }
}

/// Why a certificate and key pair did not load, and which of the two files is at fault.
#[derive(Debug)]
pub enum PemError {
    /// The certificate file.
    Cert(String),
    /// The key file (or the key does not fit the certificate).
    Key(String),
}

/// Picks a certificate by SNI.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// ".example.com" -> key, from "*.example.com".
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        if let Some(dot) = name.find('.') {
            if let Some(key) = self.wildcard.get(&name[dot..]) {
                return Some(key.clone());
            }
        }
        self.default.clone()
    }
}

/// Builds the server config of every TLS listen address of `config`, reading the PEM
/// files; every problem is reported (as `CONFIG: server.tls[N]: ...`).
pub fn build(config: &Config) -> Result<TlsConfigs, Vec<ConfigError>> {
    let provider = provider();
    let mut errors = Vec::new();
    let mut by_listen: HashMap<SocketAddr, SniResolver> = HashMap::new();
    for (i, entry) in config.server.tls.iter().enumerate() {
        let key = match load_certified_key(&entry.cert, &entry.key, &provider) {
            Ok(key) => Arc::new(key),
            Err(e) => {
                let (at, message) = match e {
                    PemError::Cert(message) => (entry.cert_at, message),
                    PemError::Key(message) => (entry.key_at, message),
                };
                errors.push(ConfigError::at(
                    &config.path,
                    at,
                    format!("server.tls[{i}]: {message}"),
                ));
                continue;
            }
        };
        let resolver = by_listen
            .entry(entry.listen)
            .or_insert_with(|| SniResolver {
                exact: HashMap::new(),
                wildcard: HashMap::new(),
                default: None,
            });
        // The entry without `sni` is the default; until one appears, the first entry is.
        if entry.sni.is_empty() || resolver.default.is_none() {
            resolver.default = Some(key.clone());
        }
        for name in &entry.sni {
            match name.strip_prefix('*') {
                Some(suffix) => resolver.wildcard.insert(suffix.to_owned(), key.clone()),
                None => resolver.exact.insert(name.clone(), key.clone()),
            };
        }
    }
    for upstream in &config.upstreams {
        let Some(tls) = upstream.tls.as_ref() else {
            continue;
        };
        if let Some(path) = tls.ca_file.as_ref() {
            if let Err(message) = crate::upstream::client::load_roots(path) {
                errors.push(ConfigError::at(
                    &config.path,
                    tls.ca_file_at,
                    format!("upstreams.{}: {message}", upstream.name),
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut configs = TlsConfigs::new();
    for (listen, resolver) in by_listen {
        let built = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map(|b| {
                b.with_no_client_auth()
                    .with_cert_resolver(Arc::new(resolver))
            });
        match built {
            Ok(mut server) => {
                server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                configs.insert(listen, Arc::new(server));
            }
            Err(e) => errors.push(ConfigError {
                path: config.path.clone(),
                line: 0,
                col: 0,
                message: format!("TLS on {listen}: {e}"),
            }),
        }
    }
    if errors.is_empty() {
        Ok(configs)
    } else {
        Err(errors)
    }
}
