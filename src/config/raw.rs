//! The config file exactly as written: serde types mirroring the TOML, unknown keys
//! rejected. Every value that can be semantically wrong keeps its span (`Spanned`) and its
//! loosest type (strings for durations and addresses, i64 for counts), so `validate` can
//! report all problems at once, each at its position. Nothing here checks meaning: a
//! custom deserialiser would stop at the first bad value.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// A value with its byte span in the file.
pub type S<T> = Spanned<T>;

/// A TOML number, integer or float: `requests_per_second = 100` is as good as `100.0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number(pub f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Number;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Number, E> {
                Ok(Number(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The whole file.
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
    pub upstreams: BTreeMap<S<String>, S<RawUpstream>>,
}

/// `[server]`.
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
    pub access_log: Option<bool>,
}

/// One `[[server.tls]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: S<String>,
    pub cert: S<String>,
    pub key: S<String>,
    #[serde(default)]
    pub sni: Vec<S<String>>,
}

/// `[server.timeouts]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTimeouts {
    pub header_read: Option<S<String>>,
    pub idle: Option<S<String>>,
    pub shutdown: Option<S<String>>,
}

/// `[server.limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<S<i64>>,
    pub max_header_bytes: Option<S<i64>>,
    pub max_body_bytes: Option<S<i64>>,
}

/// `[server.client_ip]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientIp {
    #[serde(default)]
    pub trusted_proxies: Vec<S<String>>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<S<String>>,
    pub token: Option<S<String>>,
    pub token_env: Option<S<String>>,
}

/// One `[[routes]]` entry.
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

/// `[routes.rate_limit]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: S<Number>,
    pub burst: S<i64>,
    pub key: Option<S<String>>,
    pub store: Option<S<String>>,
    pub redis_url: Option<S<String>>,
}

/// `[upstreams.NAME]`.
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

/// One entry of `backends`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub addr: S<String>,
    pub weight: Option<S<i64>>,
}

/// `[upstreams.NAME.health]`.
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

/// `[upstreams.NAME.passive]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub consecutive_failures: Option<S<i64>>,
    pub ejection: Option<S<String>>,
}

/// `[upstreams.NAME.retry]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<S<i64>>,
    pub backoff: Option<S<String>>,
    pub backoff_max: Option<S<String>>,
    pub budget_percent: Option<S<i64>>,
}

/// `[upstreams.NAME.timeouts]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTimeouts {
    pub connect: Option<S<String>>,
    pub response: Option<S<String>>,
    pub idle: Option<S<String>>,
    pub read: Option<S<String>>,
}

/// `[upstreams.NAME.queue]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub max_in_flight_per_backend: Option<S<i64>>,
    pub size: Option<S<i64>>,
    pub timeout: Option<S<String>>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The single error the parser stops at, as `check` prints it.
    fn parse_error(text: &str) -> String {
        match super::super::parse(text, Path::new("t.toml")) {
            Ok(_) => "no error".into(),
            Err(e) => e
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    #[test]
    fn unknown_keys_are_errors_at_the_key() {
        assert_eq!(
            parse_error("[server]\nlsten = [\"127.0.0.1:8080\"]\n"),
            "t.toml:2:1: unknown field `lsten`, expected one of `listen`, `tls`, `timeouts`, `limits`, `client_ip`, `access_log`"
        );
        assert_eq!(
            parse_error("[upstreams.x]\nbackends = [{ addr = \"a:1\", wieght = 2 }]\n"),
            "t.toml:2:29: unknown field `wieght`, expected `addr` or `weight`"
        );
        assert_eq!(
            parse_error("\n\nx = 1\n"),
            "t.toml:3:1: unknown field `x`, expected one of `server`, `admin`, `routes`, `upstreams`"
        );
    }

    #[test]
    fn syntax_errors_have_positions() {
        assert_eq!(
            parse_error("[server\nlisten = 1\n"),
            "t.toml:1:8: unclosed table, expected `]`"
        );
        assert_eq!(
            parse_error("[admin]\nlisten = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n"),
            "t.toml:3:1: duplicate key `listen`"
        );
        let cases = [
            (
                "[[routes]]\nupstream = \"a\"\n[routes]\nupstream = \"b\"\n",
                "t.toml:3:2: duplicate key `routes`: [routes] after [[routes]]: write [[routes]] for every entry",
            ),
            (
                "[routes]\nupstream = \"b\"\n[[ routes ]]\nupstream = \"a\"\n",
                "t.toml:3:4: duplicate key `routes`: routes is already a table, so [[routes]] cannot add an entry to it",
            ),
            (
                "[admin]\nlisten = \"127.0.0.1:1\"\n[admin]\ntoken = \"x\"\n",
                "t.toml:3:2: duplicate key `admin`: table [admin] is defined twice",
            ),
            (
                "[upstreams.a]\nbackends = [{ addr = \"a:1\" }]\n[upstreams.\"a\"]\nbackends = []\n",
                "t.toml:3:12: duplicate key `a`: table [upstreams.\"a\"] is defined twice",
            ),
            (
                "[server]\nlimits.max_connections = 1\nlimits.max_connections = 2\n",
                "t.toml:3:8: duplicate key `max_connections`",
            ),
            (
                "[upstreams.a]\nbackends = [{ addr = \"a:1\", 'addr' = \"b:1\" }]\n",
                "t.toml:2:29: duplicate key `addr`",
            ),
            (
                "[server]\nlisten = []\n\"list\\u0065n\" = []\n",
                "t.toml:3:1: duplicate key `listen`",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_error(text), want, "{text}");
        }
    }

    #[test]
    fn wrong_types_and_missing_keys_have_positions() {
        assert_eq!(
            parse_error("[server.limits]\nmax_connections = \"many\"\n"),
            "t.toml:2:19: invalid type: string \"many\", expected an integer"
        );
        assert_eq!(
            parse_error("[admin]\n[upstreams.x]\n"),
            "t.toml:2:1: missing field `backends`"
        );
    }

    #[test]
    fn numbers_may_be_integers_or_floats() {
        let number = |text: &str| {
            toml::from_str::<super::RawRateLimit>(text).map(|r| r.requests_per_second.into_inner())
        };
        assert_eq!(
            number("requests_per_second = 100\nburst = 1").ok(),
            Some(super::Number(100.0))
        );
        assert_eq!(
            number("requests_per_second = 2.5\nburst = 1").ok(),
            Some(super::Number(2.5))
        );
        assert_eq!(
            parse_error("[[routes]]\nupstream = \"x\"\n[routes.rate_limit]\nrequests_per_second = \"fast\"\nburst = 1\n"),
            concat!(
                "t.toml:2:12: route \"route-1\" uses upstream \"x\", which is not defined (none is defined)\n",
                "t.toml:4:23: invalid type: string \"fast\", expected a number"
            )
        );
    }
}
