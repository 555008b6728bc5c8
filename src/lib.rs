//! palisade: an HTTP reverse proxy and load balancer.
//!
//! The architecture in ten lines:
//! - `config` parses and validates the TOML file (every error with PATH:LINE:COL);
//! - `snapshot` compiles a config into the immutable form the hot path reads, swapped whole
//!   on reload (`arc-swap`), carrying live state over;
//! - `server` owns listeners, the accept loop, connection timeouts and graceful drain, and
//!   (`server::h1`) palisade's HTTP/1.1 server codec; `http1` is what it shares with the
//!   backend-side codec (`upstream::h1`); `server::tunnel` runs WebSocket tunnels,
//!   `server::handover` passes the listening sockets on to a replacing process;
//! - `proxy::handler` is one request's life top to bottom: route, check, pick, forward, respond;
//! - `route` matches host and path; `limit` resolves the client IP;
//! - `upstream` holds pools, per-backend live state (atomics) and the pooled client;
//! - `balance` has one small type per algorithm behind the `Balance` trait;
//! - `echo` is the built-in test backend; `app` wires it all up for `run` and `demo`.

pub mod admin;
pub mod app;
pub mod balance;
pub mod clock;
pub mod config;
pub mod dns;
pub mod echo;
pub mod health;
pub mod http1;
pub mod limit;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod sdnotify;
pub mod server;
pub mod snapshot;
pub mod tls;
pub mod upstream;
