//! The pooled HTTP client palisade uses to talk to one upstream's backends.
//!
//! One keep-alive pool per upstream (hyper-util's legacy client; the pool is keyed by
//! backend address), TCP_NODELAY, a connect timeout, and HTTP/1.1 or h2c prior knowledge as
//! the upstream's `protocol` says.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Protocol;
use crate::proxy::body::ProxyBody;

/// The client type of every upstream.
pub type HttpClient = Client<HttpConnector, ProxyBody>;

/// How long an unused pooled connection stays open (nginx's `keepalive_timeout` is 60 s;
/// backends usually close sooner, which the pool notices).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds the pooled client for one upstream.
pub fn build(protocol: Protocol, connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.enforce_http(true);

    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .http2_only(protocol == Protocol::H2c);
    builder.build(connector)
}
