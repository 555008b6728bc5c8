//! Every integration test, in one binary.
//!
//! One test binary instead of one per file: each of them linked the whole dependency
//! tree again (about 200 MB apiece with debug info), which cost minutes of link time and
//! once filled a CI machine's disk. The modules are still one per area, each starting
//! real palisade servers and backends on ephemeral 127.0.0.1 ports through `common`.
//! Run one area with `cargo test --test it -- proxy::`.

mod common;

mod admin;
mod cli;
mod compose;
mod dashboard;
mod dns;
mod echo;
mod failover;
mod h1_server;
mod h1_upstream;
mod h2;
mod memory;
mod mutation;
mod pool;
mod proxy;
mod reload;
mod request_headers;
mod restart;
mod security;
mod shared_limits;
mod tls;
