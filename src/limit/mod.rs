//! Client protection: who the client is (`client_ip`), whether it may use a route
//! (`cidr` allow/deny lists), and how often (`rate`).

pub mod cidr;
pub mod client_ip;
pub mod rate;
