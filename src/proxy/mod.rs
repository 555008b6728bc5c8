//! The request path: `handler` reads one request's life top to bottom, `headers` rewrites
//! headers between hops, `body` is the streaming body type, `error` turns failures into
//! answers.

pub mod body;
pub mod error;
pub mod handler;
pub mod headers;

pub use body::ProxyBody;
pub use error::ProxyError;
pub use handler::{handle, ConnInfo};
