//! Client protection: who the client is, and (in later pieces) what it may do.

pub mod client_ip;
