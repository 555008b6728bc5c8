//! Errors that palisade answers itself, and the one function that turns them into responses.
//!
//! Each [`ProxyError`] knows its HTTP status and its RFC 9209 `Proxy-Status` error name, so
//! the status, the header and the log line all come from one place.

use std::error::Error as _;
use std::io;

use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use super::body::{BodyTooLarge, ProxyBody};

/// Why palisade answered a request itself instead of passing on a backend's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No route matches the request's host and path.
    #[error("no route matches")]
    NoRoute,
    /// The client's address is not allowed on this route.
    #[error("client address not allowed")]
    Denied,
    /// The client went over the route's rate limit; it may retry after this many seconds.
    #[error("rate limited")]
    RateLimited {
        /// Whole seconds, at least 1.
        retry_after_secs: u64,
        /// The policy's quota (the burst)...
        quota: u32,
        /// ...per this many seconds (the time the burst takes to refill).
        window_secs: u64,
    },
    /// The backend refused the connection (or none could be reached).
    #[error("backend refused the connection")]
    ConnectionRefused,
    /// The TLS handshake with the backend failed (its certificate did not verify, it sent
    /// an alert, or it does not speak TLS as expected): a connect-phase failure, answered
    /// as a refused connection, and one that would fail again on the same backend.
    #[error("TLS handshake with the backend failed: {0}")]
    Tls(TlsFailure),
    /// The backend closed or reset the connection before a complete response head.
    #[error("backend closed the connection")]
    ConnectionTerminated,
    /// Connecting to the backend took longer than `timeouts.connect`.
    #[error("backend connect timed out")]
    ConnectionTimeout,
    /// The backend's answer is not valid HTTP (a malformed or ambiguous head, one over
    /// the size or line limits).
    #[error("invalid response from the backend")]
    InvalidResponse,
    /// The backend's response head took longer than `timeouts.response`.
    #[error("backend response timed out")]
    ResponseTimeout,
    /// The upstream's queue was full, or the wait in it too long.
    #[error("upstream queue full")]
    QueueFull,
    /// palisade itself ran out of what a backend connection needs (file descriptors,
    /// memory, socket buffers): no backend's fault, never held against one.
    #[error("out of file descriptors or socket memory")]
    Exhausted,
    /// The request is malformed (the reason is for the log).
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    /// The request head is larger than `max_header_bytes`, or has more than
    /// [`crate::http1::MAX_HEADERS`] header lines.
    #[error("request head too large (over max_header_bytes, or over 128 header lines)")]
    HeadTooLarge,
    /// The request body is larger than `max_body_bytes`.
    #[error("request body too large")]
    BodyTooLarge,
    /// The client stopped sending its request body.
    #[error("request body not received in time")]
    BodyTimeout,
}

/// Why a TLS handshake with a backend failed, as RFC 9209 names it (in the `details` of
/// the `Proxy-Status` palisade answers with: the kind, nothing of the backend's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    /// The backend's certificate did not verify: an unknown issuer, another name, expired,
    /// or none at all (`tls_certificate_error`).
    #[error("its certificate did not verify")]
    Certificate,
    /// The backend ended the handshake with an alert (`tls_alert_received`).
    #[error("it sent a TLS alert")]
    Alert,
    /// Any other handshake failure: no common version or cipher, or not TLS at all
    /// (`tls_protocol_error`).
    #[error("TLS protocol error")]
    Protocol,
}

impl TlsFailure {
    /// The kind of `error`, a handshake's failure.
    pub fn of(error: &rustls::Error) -> TlsFailure {
        match error {
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::InvalidCertRevocationList(_) => TlsFailure::Certificate,
            rustls::Error::AlertReceived(_) => TlsFailure::Alert,
            _ => TlsFailure::Protocol,
        }
    }

    /// The `Proxy-Status` header of a 502 for this failure: a refused connection (the
    /// SPEC's name for a backend that could not be reached), with the RFC 9209 name of
    /// the failure as its `details`.
    fn proxy_status_header(self) -> &'static str {
        match self {
            TlsFailure::Certificate => {
                "palisade; error=connection_refused; details=\"tls_certificate_error\""
            }
            TlsFailure::Alert => {
                "palisade; error=connection_refused; details=\"tls_alert_received\""
            }
            TlsFailure::Protocol => {
                "palisade; error=connection_refused; details=\"tls_protocol_error\""
            }
        }
    }
}

impl ProxyError {
    /// The HTTP status palisade answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Denied => StatusCode::FORBIDDEN,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::ConnectionRefused
            | ProxyError::Tls(_)
            | ProxyError::ConnectionTerminated
            | ProxyError::ConnectionTimeout
            | ProxyError::InvalidResponse => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::QueueFull | ProxyError::Exhausted => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The RFC 9209 error type named in the `Proxy-Status` header.
    pub fn proxy_status_name(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "destination_not_found",
            ProxyError::Denied | ProxyError::RateLimited { .. } => "http_request_denied",
            ProxyError::ConnectionRefused | ProxyError::Tls(_) => "connection_refused",
            ProxyError::ConnectionTerminated => "connection_terminated",
            ProxyError::ConnectionTimeout => "connection_timeout",
            ProxyError::InvalidResponse => "http_protocol_error",
            ProxyError::ResponseTimeout => "http_response_timeout",
            ProxyError::QueueFull => "connection_limit_reached",
            ProxyError::Exhausted => "proxy_internal_error",
            ProxyError::BadRequest(_)
            | ProxyError::HeadTooLarge
            | ProxyError::BodyTooLarge
            | ProxyError::BodyTimeout => "http_request_error",
        }
    }

    /// The full `Proxy-Status` header value, built without allocating.
    fn proxy_status_header(&self) -> HeaderValue {
        if let ProxyError::Tls(failure) = self {
            return HeaderValue::from_static(failure.proxy_status_header());
        }
        HeaderValue::from_static(match self.proxy_status_name() {
            "destination_not_found" => "palisade; error=destination_not_found",
            "http_request_denied" => "palisade; error=http_request_denied",
            "connection_refused" => "palisade; error=connection_refused",
            "connection_terminated" => "palisade; error=connection_terminated",
            "connection_timeout" => "palisade; error=connection_timeout",
            "http_protocol_error" => "palisade; error=http_protocol_error",
            "http_response_timeout" => "palisade; error=http_response_timeout",
            "connection_limit_reached" => "palisade; error=connection_limit_reached",
            "proxy_internal_error" => "palisade; error=proxy_internal_error",
            _ => "palisade; error=http_request_error",
        })
    }

    /// The short text body of the answer.
    fn body_text(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no route matches this request\n",
            ProxyError::Denied => "forbidden\n",
            ProxyError::RateLimited { .. } => "too many requests\n",
            ProxyError::ConnectionRefused
            | ProxyError::Tls(_)
            | ProxyError::ConnectionTerminated
            | ProxyError::ConnectionTimeout => "bad gateway: no backend could answer\n",
            ProxyError::InvalidResponse => "bad gateway: the backend's answer is not valid HTTP\n",
            ProxyError::ResponseTimeout => "gateway timeout: the backend did not answer in time\n",
            ProxyError::QueueFull => "service unavailable: too many requests queued\n",
            ProxyError::Exhausted => {
                "service unavailable: the proxy is out of file descriptors or socket memory\n"
            }
            ProxyError::BadRequest(_) => "bad request\n",
            ProxyError::HeadTooLarge => "request header fields too large\n",
            ProxyError::BodyTooLarge => "request body too large\n",
            ProxyError::BodyTimeout => "request body not received in time\n",
        }
    }

    /// Whether the client connection must close after this answer (the request stream can
    /// no longer be trusted to be in sync).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::HeadTooLarge
                | ProxyError::BodyTooLarge
                | ProxyError::BodyTimeout
        )
    }

    /// The response palisade sends for this error.
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::from_static(self.body_text()));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert("proxy-status", self.proxy_status_header());
        if let ProxyError::RateLimited {
            retry_after_secs,
            quota,
            window_secs,
        } = self
        {
            let wait = retry_after_secs.max(1);
            headers.insert(RETRY_AFTER, HeaderValue::from(wait));
            // IETF draft-ietf-httpapi-ratelimit-headers (structured fields).
            if let Ok(v) = HeaderValue::from_str(&format!("\"route\";q={quota};w={window_secs}")) {
                headers.insert("ratelimit-policy", v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("\"route\";r=0;t={wait}")) {
                headers.insert("ratelimit", v);
            }
        }
        if self.closes_connection() {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// Classifies a failed upstream exchange from the client's error.
    pub fn from_upstream(err: &crate::upstream::pool::SendError) -> ProxyError {
        if matches!(err, crate::upstream::pool::SendError::TimedOut) {
            return ProxyError::ResponseTimeout;
        }
        if let Some(tls) = err.tls_handshake_error() {
            return ProxyError::Tls(TlsFailure::of(tls));
        }
        let mut source = err.source();
        while let Some(cause) = source {
            if cause.is::<BodyTooLarge>() {
                return ProxyError::BodyTooLarge;
            }
            if cause.is::<crate::upstream::h1::ClientBodyTimeout>() {
                return ProxyError::BodyTimeout;
            }
            if cause.is::<super::body::ClientBodyError>() {
                return ProxyError::BadRequest("request body ended early or malformed");
            }
            if let Some(proto) = cause.downcast_ref::<crate::upstream::h1::ProtoError>() {
                if matches!(
                    proto,
                    crate::upstream::h1::ProtoError::InvalidHead(_)
                        | crate::upstream::h1::ProtoError::HeadTooLarge
                ) {
                    return ProxyError::InvalidResponse;
                }
            }
            if cause
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_parse)
            {
                return ProxyError::InvalidResponse;
            }
            if let Some(io) = cause.downcast_ref::<io::Error>() {
                if io.kind() == io::ErrorKind::TimedOut {
                    return ProxyError::ConnectionTimeout;
                }
                if err.is_connect() && is_exhaustion(io) {
                    return ProxyError::Exhausted;
                }
            }
            source = cause.source();
        }
        if err.is_connect() {
            ProxyError::ConnectionRefused
        } else {
            ProxyError::ConnectionTerminated
        }
    }
}

/// Whether `e` says this process or host ran out of something a new connection needs:
/// descriptors (EMFILE, ENFILE), memory or socket buffers (ENOMEM, ENOBUFS). Not
/// EADDRNOTAVAIL: on connect it is as often the backend's address being unusable here (an
/// IPv6 backend where IPv6 is off) as local ports running out, and a backend at fault
/// must be struck and failed over from.
fn is_exhaustion(e: &io::Error) -> bool {
    use rustix::io::Errno;
    e.raw_os_error().is_some_and(|code| {
        [Errno::MFILE, Errno::NFILE, Errno::NOMEM, Errno::NOBUFS]
            .iter()
            .any(|errno| errno.raw_os_error() == code)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_names_its_status_and_proxy_status() {
        let cases = [
            (ProxyError::NoRoute, 404, "destination_not_found"),
            (ProxyError::Denied, 403, "http_request_denied"),
            (
                ProxyError::RateLimited {
                    retry_after_secs: 3,
                    quota: 10,
                    window_secs: 5,
                },
                429,
                "http_request_denied",
            ),
            (ProxyError::ConnectionRefused, 502, "connection_refused"),
            (
                ProxyError::ConnectionTerminated,
                502,
                "connection_terminated",
            ),
            (ProxyError::ConnectionTimeout, 502, "connection_timeout"),
            (ProxyError::ResponseTimeout, 504, "http_response_timeout"),
            (ProxyError::QueueFull, 503, "connection_limit_reached"),
            (ProxyError::Exhausted, 503, "proxy_internal_error"),
            (ProxyError::BadRequest("x"), 400, "http_request_error"),
            (ProxyError::HeadTooLarge, 431, "http_request_error"),
            (ProxyError::InvalidResponse, 502, "http_protocol_error"),
            (ProxyError::BodyTooLarge, 413, "http_request_error"),
            (
                ProxyError::Tls(TlsFailure::Certificate),
                502,
                "connection_refused; details=\"tls_certificate_error\"",
            ),
            (
                ProxyError::Tls(TlsFailure::Alert),
                502,
                "connection_refused; details=\"tls_alert_received\"",
            ),
            (
                ProxyError::Tls(TlsFailure::Protocol),
                502,
                "connection_refused; details=\"tls_protocol_error\"",
            ),
        ];
        for (err, status, name) in cases {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status, "{err:?}");
            let header = resp.headers()["proxy-status"].to_str().unwrap_or_default();
            assert_eq!(header, format!("palisade; error={name}"), "{err:?}");
        }
    }

    #[test]
    fn only_running_out_of_descriptors_or_memory_is_palisades_own_fault() {
        use crate::upstream::pool::SendError;
        use rustix::io::Errno;
        let connect = |errno: Errno| {
            ProxyError::from_upstream(&SendError::Connect(io::Error::from_raw_os_error(
                errno.raw_os_error(),
            )))
        };
        for errno in [Errno::MFILE, Errno::NFILE, Errno::NOMEM, Errno::NOBUFS] {
            assert_eq!(connect(errno), ProxyError::Exhausted, "{errno:?}");
        }
        // An IPv6 backend where IPv6 is off: the backend's address, struck and failed over.
        for errno in [Errno::ADDRNOTAVAIL, Errno::CONNREFUSED, Errno::NETUNREACH] {
            assert_eq!(connect(errno), ProxyError::ConnectionRefused, "{errno:?}");
        }
    }

    #[test]
    fn a_failed_tls_handshake_is_told_apart_from_a_refused_connection() {
        use crate::upstream::pool::SendError;
        let handshake = |error: rustls::Error| {
            // As hyper-rustls reports it: tokio-rustls' io::Error in another.
            let err = SendError::Connect(io::Error::other(io::Error::new(
                io::ErrorKind::InvalidData,
                error,
            )));
            (
                ProxyError::from_upstream(&err),
                err.tls_handshake_error().is_some(),
            )
        };
        assert_eq!(
            handshake(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            )),
            (ProxyError::Tls(TlsFailure::Certificate), true)
        );
        assert_eq!(
            handshake(rustls::Error::AlertReceived(
                rustls::AlertDescription::HandshakeFailure
            )),
            (ProxyError::Tls(TlsFailure::Alert), true)
        );
        assert_eq!(
            handshake(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            )),
            (ProxyError::Tls(TlsFailure::Protocol), true)
        );
        // Once the request went out, a TLS error is the exchange's, not the handshake's.
        let lost = SendError::Exchange(crate::upstream::h1::ProtoError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::DecryptError,
        )));
        assert_eq!(lost.tls_handshake_error(), None);
        assert_eq!(
            ProxyError::from_upstream(&lost),
            ProxyError::ConnectionTerminated
        );
    }

    #[test]
    fn rate_limited_carries_retry_after_of_at_least_one_second() {
        let resp = ProxyError::RateLimited {
            retry_after_secs: 0,
            quota: 10,
            window_secs: 5,
        }
        .into_response();
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
        assert_eq!(resp.headers()["ratelimit-policy"], "\"route\";q=10;w=5");
        assert_eq!(resp.headers()["ratelimit"], "\"route\";r=0;t=1");
    }
}
