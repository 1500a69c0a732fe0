//! What did a gRPC call end with? Classify a response by its headers and trailers, and a service
//! error by its source chain, into a [`tonic::Code`].
//!
//! Every towline layer that reacts to outcomes (retry, outlier detection, metrics) asks here, so they
//! all agree on what "failed" means. Nothing in this module panics on what a peer sends: a missing,
//! malformed or unknown `grpc-status` is [`Code::Unknown`].
//!
//! ```
//! use http::{Response, StatusCode};
//! use tonic::Code;
//! use towline::status::{classify_response, ResponseStatus};
//!
//! // A Trailers-Only response: the call has already ended.
//! let res = Response::builder()
//!     .header("content-type", "application/grpc")
//!     .header("grpc-status", "14")
//!     .body(())
//!     .unwrap();
//! assert_eq!(classify_response(&res), ResponseStatus::TrailersOnly(Code::Unavailable));
//!
//! // A proxy's 503 in front of the server is not gRPC at all.
//! let res = Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(()).unwrap();
//! assert_eq!(classify_response(&res), ResponseStatus::NotGrpc(Code::Unavailable));
//! ```

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, Response, StatusCode};
use tonic::{Code, Status};

use crate::BoxError;

/// The `grpc-status` header or trailer.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Where a response's gRPC status is, read from its head alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResponseStatus {
    /// `grpc-status` is in the headers: a Trailers-Only response. The call has ended with this code
    /// and the body carries no message.
    TrailersOnly(Code),
    /// A gRPC response whose status will arrive in the trailers, after the messages.
    InTrailers,
    /// Not a gRPC response (an HTTP error or a foreign content type, typically from a proxy);
    /// the code follows gRPC's HTTP-to-gRPC status mapping.
    NotGrpc(Code),
}

impl ResponseStatus {
    /// The code, if the head alone decides it.
    pub fn code(self) -> Option<Code> {
        match self {
            ResponseStatus::TrailersOnly(code) | ResponseStatus::NotGrpc(code) => Some(code),
            ResponseStatus::InTrailers => None,
        }
    }
}

/// Classifies a response by its status line and headers.
pub fn classify_response<B>(res: &Response<B>) -> ResponseStatus {
    if let Some(code) = code_from_headers(res.headers()) {
        return ResponseStatus::TrailersOnly(code);
    }
    if res.status() != StatusCode::OK {
        return ResponseStatus::NotGrpc(code_from_http_status(res.status()));
    }
    let grpc_content_type = res
        .headers()
        .get(CONTENT_TYPE)
        .is_none_or(|ct| ct.as_bytes().starts_with(b"application/grpc"));
    if grpc_content_type {
        ResponseStatus::InTrailers
    } else {
        ResponseStatus::NotGrpc(Code::Unknown)
    }
}

/// The `grpc-status` in a header map: `None` when absent, [`Code::Unknown`] when malformed.
pub fn code_from_headers(headers: &HeaderMap) -> Option<Code> {
    crate::header::first(headers, &GRPC_STATUS).map(|value| Code::from_bytes(value.as_bytes()))
}

/// The code a call ended with, from its trailers. A stream that ended without trailers, or whose
/// trailers carry no `grpc-status`, ended abnormally: [`Code::Unknown`].
pub fn code_from_trailers(trailers: Option<&HeaderMap>) -> Code {
    trailers
        .and_then(code_from_headers)
        .unwrap_or(Code::Unknown)
}

/// gRPC's mapping of an HTTP status, for responses without `grpc-status`
/// (grpc/doc/http-grpc-status-mapping.md).
pub fn code_from_http_status(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// The code a failed `Service::call` stands for, found by walking the error's source chain.
///
/// A [`Status`] anywhere in the chain gives its own code. Connection-level failures (refused
/// connects, I/O errors, GOAWAY, keepalive timeouts, a connection closed under the request) are
/// [`Code::Unavailable`], as in grpc-go and grpc-java, so that retry and outlier detection treat them
/// as the transient failures they are. Elapsed timers are [`Code::DeadlineExceeded`]. HTTP/2 stream
/// resets follow gRPC's `RST_STREAM` mapping. Anything else is [`Code::Unknown`].
pub fn code_from_error(err: &(dyn Error + 'static)) -> Code {
    let mut saw_transport_error = false;
    for err in source_chain(err) {
        if let Some(status) = err.downcast_ref::<Status>() {
            return status.code();
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return code_from_h2(h2);
        }
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            // hyper's timeout is the HTTP/2 keepalive ping; gRPC says UNAVAILABLE.
            if hyper.is_timeout() || hyper.is_canceled() || hyper.is_closed() {
                return Code::Unavailable;
            }
        }
        if err.is::<std::io::Error>() {
            return Code::Unavailable;
        }
        // tonic's client enforces `grpc-timeout` itself; a client whose deadline passed reports
        // DEADLINE_EXCEEDED, as grpc-go and grpc-java do.
        if err.is::<tonic::TimeoutExpired>()
            || err.is::<tokio::time::error::Elapsed>()
            || err.is::<tower::timeout::error::Elapsed>()
        {
            return Code::DeadlineExceeded;
        }
        if err.is::<tonic::ConnectError>() {
            return Code::Unavailable;
        }
        saw_transport_error |= err.is::<tonic::transport::Error>();
    }
    if saw_transport_error {
        Code::Unavailable
    } else {
        Code::Unknown
    }
}

/// Whether an error proves the request never reached the server application: the connection
/// could not be made, the stream was refused (`REFUSED_STREAM`, or grpc-core's `ENHANCE_YOUR_CALM`
/// reset of a stream it did not accept) or fell above a graceful GOAWAY's last stream id, or the
/// request never left the client's dispatch queue. gRFC A6 retries such calls transparently.
pub fn is_unprocessed(err: &(dyn Error + 'static)) -> bool {
    source_chain(err).any(|err| {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            // A graceful GOAWAY (NO_ERROR) fails only the streams above its last stream id, which
            // the server never saw. A GOAWAY with an error reason is handed to every open stream,
            // processed ones included, so it proves nothing.
            let refused = h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            let graceful_go_away = h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR);
            // grpc-core refuses a stream that arrives before its SETTINGS are acknowledged (the
            // race on every new connection) or under memory pressure with RST_STREAM
            // ENHANCE_YOUR_CALM, not REFUSED_STREAM, before accepting it (chttp2 parsing.cc).
            // A reset of that code before any response is such a refusal. grpc-go does not
            // retry it; we do, since grpc-core servers send it for nothing else.
            let calm_reset = h2.is_reset()
                && h2.is_remote()
                && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
            return refused || graceful_go_away || calm_reset;
        }
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            return hyper.is_canceled();
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        false
    })
}

/// Turns a service error into the [`Status`] a caller should see: the error itself if it is one,
/// otherwise a status whose code is [`code_from_error`] and whose message says what happened in
/// words ([`describe_error`]). The error stays reachable as the status's source.
pub fn status_from_error(err: BoxError) -> Status {
    match err.downcast::<Status>() {
        Ok(status) => *status,
        Err(err) => {
            let mut status = Status::new(code_from_error(&*err), describe_error(&*err));
            status.set_source(Arc::<dyn Error + Send + Sync>::from(err));
            status
        }
    }
}

/// One line that names what happened, once, in words: `"connection refused"`,
/// `"deadline exceeded"`, `"connection closed by the server: GOAWAY ENHANCE_YOUR_CALM
/// (too_many_pings)"`, `"connect failed: connection refused"`.
///
/// It walks the source chain and keeps what each error adds: a [`Status`] contributes its
/// message (never its `Display`, which dumps its source with `Debug`), HTTP/2 and I/O errors a
/// phrase for their reason, and wrappers that only say "transport error" nothing.
///
/// ```
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// assert_eq!(towline::status::describe_error(&refused), "connection refused");
/// ```
pub fn describe_error(err: &(dyn Error + 'static)) -> String {
    let mut out = String::new();
    for err in source_chain(err) {
        let text = describe_one(err);
        let text = text.trim();
        if text.is_empty() || out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    if out.is_empty() {
        out.push_str("unknown error");
    }
    out
}

/// What one error of a chain adds to [`describe_error`]'s line.
fn describe_one(err: &(dyn Error + 'static)) -> String {
    if let Some(status) = err.downcast_ref::<Status>() {
        return status.message().to_owned();
    }
    if let Some(h2) = err.downcast_ref::<h2::Error>() {
        return describe_h2(h2);
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind::*;
        return match io.kind() {
            ConnectionRefused | ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut
            | NotConnected | AddrNotAvailable | HostUnreachable | NetworkUnreachable => {
                io.kind().to_string()
            }
            UnexpectedEof => "connection closed".to_owned(),
            _ => io.to_string(),
        };
    }
    if err.is::<tonic::TimeoutExpired>()
        || err.is::<tokio::time::error::Elapsed>()
        || err.is::<tower::timeout::error::Elapsed>()
    {
        return "deadline exceeded".to_owned();
    }
    if err.is::<tonic::ConnectError>() {
        return "connect failed".to_owned();
    }
    if err.is::<tonic::transport::Error>() {
        // "transport error": says nothing its source does not say better.
        return String::new();
    }
    if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
        if hyper.is_canceled() {
            return "the request was not sent".to_owned();
        }
        if hyper.is_timeout() {
            return "keepalive ping timed out".to_owned();
        }
        if hyper.is_closed() || hyper.is_incomplete_message() {
            return "connection closed".to_owned();
        }
        // Its variants wrap an h2 or I/O error that says more; its own text is a category.
        return if err.source().is_some() {
            String::new()
        } else {
            hyper.to_string()
        };
    }
    let text = err.to_string();
    // hyper-util's legacy client errors ("client error (Connect)") only name a category.
    if text.starts_with("client error (") || text == "transport error" {
        return String::new();
    }
    text
}

fn describe_h2(err: &h2::Error) -> String {
    if let Some(io) = err.get_io() {
        return describe_one(io);
    }
    let reason = err.reason().unwrap_or(h2::Reason::INTERNAL_ERROR);
    if err.is_go_away() {
        // h2 keeps the GOAWAY's debug data private, but shows it in `Display` as `(b"…")`.
        let shown = err.to_string();
        let debug = shown
            .split_once("(b\"")
            .and_then(|(_, rest)| rest.rsplit_once("\")"))
            .map(|(data, _)| data.to_owned());
        let by = if err.is_remote() {
            "connection closed by the server"
        } else {
            "connection closed"
        };
        return match debug {
            Some(debug) if !debug.is_empty() => format!("{by}: GOAWAY {reason:?} ({debug})"),
            _ => format!("{by}: GOAWAY {reason:?}"),
        };
    }
    match reason {
        h2::Reason::REFUSED_STREAM => "stream refused by the server (REFUSED_STREAM)".to_owned(),
        h2::Reason::CANCEL => "stream cancelled (RST_STREAM CANCEL)".to_owned(),
        other if err.is_reset() => format!("stream reset (RST_STREAM {other:?})"),
        other => format!("HTTP/2 error {other:?}"),
    }
}

/// `300 ms`, `1.5 s`: a duration as people write it in messages.
pub(crate) struct HumanDuration(pub(crate) Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d < Duration::from_millis(1) {
            write!(f, "{} µs", d.as_micros())
        } else if d < Duration::from_secs(1) {
            write!(f, "{} ms", d.as_millis())
        } else {
            write!(f, "{:.1} s", d.as_secs_f64())
        }
    }
}

/// Whether an error is the server's GOAWAY `ENHANCE_YOUR_CALM` with debug data `too_many_pings`:
/// it received keepalive pings more often than it allows (gRFC A8).
pub fn is_too_many_pings(err: &(dyn Error + 'static)) -> bool {
    source_chain(err).any(|err| {
        err.downcast_ref::<h2::Error>().is_some_and(|h2| {
            h2.is_go_away()
                && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
                && h2.to_string().contains("too_many_pings")
        })
    })
}

/// Whether a call's trailers (or Trailers-Only headers) say it was cancelled for the same
/// reason: grpc-core, when it sends GOAWAY `too_many_pings`, ends the calls open on the
/// connection with `UNAVAILABLE` "Too many pings", so the GOAWAY itself fails no stream.
///
/// Every call's head and trailers pass here in the pool and the balancer, and almost none carry
/// `grpc-status: 14`: both names are found by [`header::first`](crate::header::first), a scan
/// of a small map rather than a hash.
pub fn is_too_many_pings_status(headers: &HeaderMap) -> bool {
    const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
    crate::header::first(headers, &GRPC_STATUS).is_some_and(|s| s.as_bytes() == b"14")
        && crate::header::first(headers, &GRPC_MESSAGE).is_some_and(|m| {
            let m = m.as_bytes();
            m.eq_ignore_ascii_case(b"Too many pings")
                || m.eq_ignore_ascii_case(b"Too%20many%20pings")
        })
}

/// A request extension through which a layer learns how a call ended after its own response
/// future is done: the layer below that reads the call's trailers reports the final code.
///
/// towline's `RetryLayer` puts one on the calls whose token-bucket budget must hear the outcome
/// of a call that committed (gRFC A6: one that then ends with a retryable code is a failure for
/// throttling), and the balancer's response body reports to it. A layer of your own that reads
/// trailers can report too; the first report counts.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use tonic::Code;
/// use towline::status::CallEnd;
///
/// let end = CallEnd::new();
/// let seen = Arc::new(Mutex::new(None));
/// let record = seen.clone();
/// end.on_end(move |code| *record.lock().unwrap() = Some(code));
/// end.clone().report(Code::Unavailable); // from the layer that saw the trailers
/// end.report(Code::Ok);                  // too late: the first report counts
/// assert_eq!(*seen.lock().unwrap(), Some(Code::Unavailable));
/// ```
///
/// When every handle is gone without a report (no layer below reads trailers), the handler gets
/// `OK`: the call committed, and nothing below said otherwise.
#[derive(Clone, Default)]
pub struct CallEnd(Arc<EndSlot>);

type EndHandler = Box<dyn FnOnce(Code) + Send>;

#[derive(Default)]
struct EndSlot(std::sync::Mutex<Option<EndHandler>>);

impl Drop for EndSlot {
    fn drop(&mut self) {
        let handler = self
            .0
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handler) = handler {
            handler(Code::Ok);
        }
    }
}

impl CallEnd {
    /// A handle with nobody listening yet.
    pub fn new() -> Self {
        CallEnd::default()
    }

    /// `handler` gets the code of the first [`report`](Self::report) made after this.
    pub fn on_end(&self, handler: impl FnOnce(Code) + Send + 'static) {
        *self.slot() = Some(Box::new(handler));
    }

    /// The call ended with `code`. Reports before anyone listens, and after the first, are
    /// ignored.
    pub fn report(&self, code: Code) {
        let handler = self.slot().take();
        if let Some(handler) = handler {
            handler(code);
        }
    }

    /// Whether someone is still waiting for the report.
    pub fn is_awaited(&self) -> bool {
        self.slot().is_some()
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<EndHandler>> {
        self.0
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl fmt::Debug for CallEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallEnd")
            .field("awaited", &self.is_awaited())
            .finish()
    }
}

/// The canonical upper-case name of a code, as gRFC A66 labels `grpc.status` ("OK", "UNAVAILABLE").
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// gRPC's mapping of HTTP/2 `RST_STREAM` and `GOAWAY` error codes (grpc/doc/PROTOCOL-HTTP2.md).
fn code_from_h2(err: &h2::Error) -> Code {
    if err.is_go_away() || err.is_io() {
        return Code::Unavailable;
    }
    match err.reason() {
        Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

fn source_chain<'a>(
    err: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |&err: &&'a (dyn Error + 'static)| err.source())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    #[derive(Debug)]
    struct Transport(BoxError);
    impl std::fmt::Display for Transport {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }
    impl Error for Transport {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn errors_are_described_once_in_words() {
        let refused = Transport(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(describe_error(&refused), "connection refused");
        let deadline = Transport(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(describe_error(&deadline), "deadline exceeded");
        let status = status_from_error(Box::new(Transport(Box::new(tonic::TimeoutExpired(())))));
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(status.message(), "deadline exceeded");
        // A Status in the chain gives its message, never its Debug-laden Display.
        let mut wrapped = Status::unavailable("connection to http://a:1 broke: connection reset");
        wrapped.set_source(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        let text = describe_error(&wrapped);
        assert_eq!(text, "connection to http://a:1 broke: connection reset");
        assert!(!text.contains("code:"), "{text}");
        let refused_stream = Transport(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
        assert_eq!(
            describe_error(&refused_stream),
            "stream refused by the server (REFUSED_STREAM)"
        );
        assert!(!is_too_many_pings(&refused_stream));
    }

    fn response(status: u16, headers: &[(&str, &[u8])]) -> Response<()> {
        let mut res = Response::builder().status(status).body(()).unwrap();
        for (name, value) in headers {
            res.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        res
    }

    const GRPC: (&str, &[u8]) = ("content-type", b"application/grpc");

    #[test]
    fn trailers_only_response_carries_its_code() {
        let res = response(200, &[GRPC, ("grpc-status", b"14")]);
        assert_eq!(
            classify_response(&res),
            ResponseStatus::TrailersOnly(Code::Unavailable)
        );
        let res = response(200, &[GRPC, ("grpc-status", b"0")]);
        assert_eq!(
            classify_response(&res),
            ResponseStatus::TrailersOnly(Code::Ok)
        );
    }

    #[test]
    fn grpc_status_wins_over_http_status() {
        let res = response(503, &[("grpc-status", b"8")]);
        assert_eq!(
            classify_response(&res),
            ResponseStatus::TrailersOnly(Code::ResourceExhausted)
        );
    }

    #[test]
    fn malformed_or_unknown_grpc_status_is_unknown() {
        for value in [
            &b"abc"[..],
            b"",
            b"17",
            b"-1",
            b"99999999999999999999",
            b"1 4",
            b"\xff",
        ] {
            let res = response(200, &[GRPC, ("grpc-status", value)]);
            assert_eq!(
                classify_response(&res),
                ResponseStatus::TrailersOnly(Code::Unknown),
                "grpc-status {value:?}"
            );
        }
    }

    #[test]
    fn grpc_response_without_status_header_waits_for_trailers() {
        assert_eq!(
            classify_response(&response(200, &[GRPC])),
            ResponseStatus::InTrailers
        );
        let proto = ("content-type", &b"application/grpc+proto"[..]);
        assert_eq!(
            classify_response(&response(200, &[proto])),
            ResponseStatus::InTrailers
        );
        assert_eq!(ResponseStatus::InTrailers.code(), None);
    }

    #[test]
    fn http_errors_follow_the_grpc_mapping() {
        let cases = [
            (400, Code::Internal),
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (404, Code::Unimplemented),
            (429, Code::Unavailable),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::Unavailable),
            (500, Code::Unknown),
            (302, Code::Unknown),
        ];
        for (http, code) in cases {
            let res = response(http, &[]);
            assert_eq!(
                classify_response(&res),
                ResponseStatus::NotGrpc(code),
                "HTTP {http}"
            );
        }
    }

    #[test]
    fn foreign_content_type_is_not_grpc() {
        let res = response(200, &[("content-type", b"text/html")]);
        assert_eq!(
            classify_response(&res),
            ResponseStatus::NotGrpc(Code::Unknown)
        );
    }

    #[test]
    fn trailers_decide_streaming_calls() {
        let mut trailers = HeaderMap::new();
        assert_eq!(code_from_trailers(None), Code::Unknown);
        assert_eq!(code_from_trailers(Some(&trailers)), Code::Unknown);
        trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
        assert_eq!(code_from_trailers(Some(&trailers)), Code::Ok);
        trailers.insert(GRPC_STATUS, HeaderValue::from_static("5"));
        assert_eq!(code_from_trailers(Some(&trailers)), Code::NotFound);
        trailers.insert(GRPC_STATUS, HeaderValue::from_static("x"));
        assert_eq!(code_from_trailers(Some(&trailers)), Code::Unknown);
    }

    #[derive(Debug)]
    struct Wrapped(BoxError);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl Error for Wrapped {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn status_anywhere_in_the_chain_gives_its_code() {
        let err = Wrapped(Box::new(Status::permission_denied("no")));
        assert_eq!(code_from_error(&err), Code::PermissionDenied);
        assert_eq!(code_from_error(&Status::aborted("x")), Code::Aborted);
    }

    #[test]
    fn h2_resets_follow_the_grpc_mapping() {
        let cases = [
            (h2::Reason::REFUSED_STREAM, Code::Unavailable, true),
            (h2::Reason::CANCEL, Code::Cancelled, false),
            (
                h2::Reason::ENHANCE_YOUR_CALM,
                Code::ResourceExhausted,
                false,
            ),
            (
                h2::Reason::INADEQUATE_SECURITY,
                Code::PermissionDenied,
                false,
            ),
            (h2::Reason::PROTOCOL_ERROR, Code::Internal, false),
            (h2::Reason::INTERNAL_ERROR, Code::Internal, false),
        ];
        for (reason, code, unprocessed) in cases {
            let err = Wrapped(Box::new(h2::Error::from(reason)));
            assert_eq!(code_from_error(&err), code, "{reason:?}");
            assert_eq!(is_unprocessed(&err), unprocessed, "{reason:?}");
        }
    }

    #[test]
    fn io_errors_are_unavailable_and_refused_connects_unprocessed() {
        let refused = Wrapped(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(code_from_error(&refused), Code::Unavailable);
        assert!(is_unprocessed(&refused));

        let reset = Wrapped(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(code_from_error(&reset), Code::Unavailable);
        assert!(
            !is_unprocessed(&reset),
            "a reset may come after the server saw the request"
        );
    }

    #[test]
    fn elapsed_timers_are_deadline_exceeded() {
        let elapsed = tower::timeout::error::Elapsed::new();
        assert_eq!(code_from_error(&elapsed), Code::DeadlineExceeded);
        let client_deadline = Wrapped(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(code_from_error(&client_deadline), Code::DeadlineExceeded);
        assert!(!is_unprocessed(&client_deadline));
    }

    #[test]
    fn unrecognised_errors_are_unknown() {
        let err: BoxError = "something odd".into();
        assert_eq!(code_from_error(&*err), Code::Unknown);
        assert!(!is_unprocessed(&*err));
    }

    #[tokio::test]
    async fn refused_tonic_connect_is_unavailable_and_unprocessed() {
        // Bind then drop a listener so the port is (almost certainly) closed.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect_err("nothing listens there");
        assert_eq!(code_from_error(&err), Code::Unavailable);
        assert!(is_unprocessed(&err), "{err:?}");
        let status = status_from_error(Box::new(err));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.source().is_some());
    }

    #[test]
    fn too_many_pings_is_read_alike_from_small_and_large_heads() {
        let map = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (k, v) in pairs {
                headers.append(*k, HeaderValue::from_static(v));
            }
            headers
        };
        let pings = [("grpc-status", "14"), ("grpc-message", "Too many pings")];
        let mut cases = vec![
            (map(&[]), false),
            (map(&[("grpc-status", "0")]), false),
            (
                map(&[("grpc-status", "14"), ("grpc-message", "other")]),
                false,
            ),
            (
                map(&[("grpc-message", "Too many pings"), ("x-other", "14")]),
                false,
            ),
            (map(&pings), true),
            (
                map(&[
                    ("grpc-status", "14"),
                    ("grpc-message", "Too%20many%20pings"),
                ]),
                true,
            ),
        ];
        // Past the small-map scan: looked up by hash.
        let mut big = map(&pings);
        for i in 0..10 {
            big.append(
                HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        cases.push((big, true));
        for (headers, expected) in &cases {
            assert_eq!(is_too_many_pings_status(headers), *expected, "{headers:?}");
        }
    }

    #[test]
    fn status_from_error_keeps_a_status_as_it_is() {
        let status = status_from_error(Box::new(Status::not_found("gone")));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "gone");
    }

    #[test]
    fn code_names_are_the_canonical_ones() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        for i in 0..17 {
            let name = code_name(Code::from(i));
            assert!(
                name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{name}"
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_header_bytes_never_panic(
            http in 100u16..1000,
            status in proptest::collection::vec(any::<u8>(), 0..24),
            content_type in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut res = Response::builder().status(http).body(()).unwrap();
            if let Ok(v) = HeaderValue::from_bytes(&status) {
                res.headers_mut().insert(GRPC_STATUS, v);
            }
            if let Ok(v) = HeaderValue::from_bytes(&content_type) {
                res.headers_mut().insert(CONTENT_TYPE, v);
            }
            let class = classify_response(&res);
            if res.headers().contains_key(GRPC_STATUS) {
                prop_assert!(matches!(class, ResponseStatus::TrailersOnly(_)));
            }
            let _ = code_from_trailers(Some(res.headers()));
        }

        #[test]
        fn any_valid_status_number_round_trips(code in 0i32..17) {
            let mut headers = HeaderMap::new();
            headers.insert(GRPC_STATUS, HeaderValue::from(code));
            prop_assert_eq!(code_from_headers(&headers), Some(Code::from(code)));
        }
    }
}
