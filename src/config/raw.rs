//! The config file exactly as written: serde types mirroring the TOML, unknown keys
//! rejected. Every value that can be semantically wrong keeps its span (`Spanned`) and its
//! loosest type (strings for durations and addresses, i64 for counts), so `validate` can
//! report all problems at once, each at its position.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub routes: Vec<S<RawRoute>>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, S<RawUpstream>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    pub tls: Vec<S<RawTls>>,
    #[serde(default)]
    pub timeouts: RawServerTimeouts,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub client_ip: RawClientIp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: S<String>,
    pub cert: S<String>,
    pub key: S<String>,
    #[serde(default)]
    pub sni: Vec<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTimeouts {
    pub header_read: Option<S<String>>,
    pub idle: Option<S<String>>,
    pub shutdown: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<S<i64>>,
    pub max_header_bytes: Option<S<i64>>,
    pub max_body_bytes: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientIp {
    #[serde(default)]
    pub trusted_proxies: Vec<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<S<String>>,
    pub token: Option<S<String>>,
    pub token_env: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<S<String>>,
    pub host: Option<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub upstream: S<String>,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub allow: Vec<S<String>>,
    #[serde(default)]
    pub deny: Vec<S<String>>,
    pub rate_limit: Option<S<RawRateLimit>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: S<f64>,
    pub burst: S<i64>,
    pub key: Option<S<String>>,
    pub store: Option<S<String>>,
    pub redis_url: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub balance: Option<S<String>>,
    pub hash_key: Option<S<String>>,
    pub protocol: Option<S<String>>,
    pub backends: S<Vec<S<RawBackend>>>,
    pub resolve_every: Option<S<String>>,
    pub health: Option<S<RawHealth>>,
    pub passive: Option<S<RawPassive>>,
    pub retry: Option<RawRetry>,
    pub timeouts: Option<RawUpstreamTimeouts>,
    pub queue: Option<RawQueue>,
    pub tls: Option<S<bool>>,
    pub ca_file: Option<S<String>>,
    pub server_name: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub addr: S<String>,
    pub weight: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: Option<S<String>>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub healthy_threshold: Option<S<i64>>,
    pub unhealthy_threshold: Option<S<i64>>,
    pub expect_status: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub consecutive_failures: Option<S<i64>>,
    pub ejection: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<S<i64>>,
    pub backoff: Option<S<String>>,
    pub backoff_max: Option<S<String>>,
    pub budget_percent: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTimeouts {
    pub connect: Option<S<String>>,
    pub response: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub max_in_flight_per_backend: Option<S<i64>>,
    pub size: Option<S<i64>>,
    pub timeout: Option<S<String>>,
}
