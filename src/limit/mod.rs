//! Client protection: who the client is (`client_ip`), whether it may use a route
//! (`cidr` allow/deny lists), and how often (`rate`, shared across instances through
//! Redis by `shared`).

pub mod cidr;
pub mod client_ip;
pub mod rate;
pub mod shared;
