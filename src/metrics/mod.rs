//! gRFC A66 client metrics through the [`metrics`](https://docs.rs/metrics) facade, so any
//! recorder works: Prometheus, OpenTelemetry, statsd.
//!
//! [`MetricsLayer`] records every call that passes through it, at one of two levels:
//!
//! - **Call level** ([`MetricsLayer::new`], placed above `RetryLayer`): one
//!   [`grpc.client.call.duration`](CALL_DURATION) per logical call, retries included.
//! - **Attempt level** ([`MetricsLayer::attempts`], placed under `RetryLayer`):
//!   [`grpc.client.attempt.started`](ATTEMPT_STARTED), [`grpc.client.attempt.duration`](ATTEMPT_DURATION)
//!   and the compressed message bytes sent and received
//!   ([`grpc.client.attempt.sent_total_compressed_message_size`](ATTEMPT_SENT_SIZE),
//!   [`grpc.client.attempt.rcvd_total_compressed_message_size`](ATTEMPT_RCVD_SIZE)) per attempt.
//!
//! Labels are A66's: `grpc.method` (`package.Service/Method`), `grpc.target` (the name you give
//! the layer) and, on everything but `attempt.started`, `grpc.status` (the code's name, `"OK"`,
//! `"UNAVAILABLE"`, from [`status::code_name`](crate::status::code_name)).
//!
//! **Durations run to the end of the response body**, not to its headers: a streaming response is
//! measured until its trailers. The status comes from a Trailers-Only response's headers, else
//! from the trailers, else from the error ([`code_from_error`](crate::status::code_from_error)). A
//! response body dropped before it ended is recorded as `CANCELLED` (unless its headers already
//! carried the status), and so is a response future dropped before it resolved.
//!
//! **Bounded labels.** A path that is not `/service/method` is recorded as method `"other"`, as
//! A66 says, and so is every method past the first [`max_methods`](MetricsLayer::max_methods)
//! (default [`DEFAULT_MAX_METHODS`]) a layer has seen.
//!
//! **Hot path.** Metric handles are resolved once per method and status and cached in the layer;
//! the layer's first few methods (the ones a client calls over and over) are found by a string
//! compare, any later one through the layer's read-locked map. Then two clock reads and atomic updates: no string formatting, no allocation at call
//! level. Attempt level wraps the request body to count the bytes sent, which costs one box and
//! one shared counter per attempt. `benches/metrics.rs` and `benches/layers.rs` measure it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use tower::{ServiceBuilder, ServiceExt};
//! use towline::connect::Connect;
//! use towline::metrics::MetricsLayer;
//! use towline::testkit::{Backend, pb::{echo_client::EchoClient, EchoRequest}};
//!
//! let backend = Backend::start().await?;
//! let channel = Connect::new().oneshot(backend.uri()).await?;
//! let stack = ServiceBuilder::new()
//!     .layer(MetricsLayer::new("echo"))   // grpc.target = "echo"
//!     .service(channel);
//! let mut client = EchoClient::new(stack);
//! client.unary(EchoRequest::default()).await?;
//! // recorded: grpc.client.call.duration{grpc.method="towline.testkit.v1.Echo/Unary",
//! //                                     grpc.target="echo", grpc.status="OK"}
//! # Ok(()) }
//! ```
//!
//! For Prometheus, give the histograms A66's buckets, [`LATENCY_BUCKETS`] and [`SIZE_BUCKETS`]
//! (`examples/prometheus.rs` shows how).

mod body;
mod layer;
mod service;

pub use body::MetricsBody;
pub use layer::{DEFAULT_MAX_METHODS, Level, MetricsLayer};
pub use service::{Metrics, ResponseFuture};

/// gRFC A66: end-to-end time of a call, to the end of its response, in seconds. Histogram;
/// labels `grpc.method`, `grpc.target`, `grpc.status`.
pub const CALL_DURATION: &str = "grpc.client.call.duration";
/// gRFC A66: attempts started. Counter; labels `grpc.method`, `grpc.target`.
pub const ATTEMPT_STARTED: &str = "grpc.client.attempt.started";
/// gRFC A66: time of one attempt, to the end of its response, in seconds. Histogram; labels
/// `grpc.method`, `grpc.target`, `grpc.status`.
pub const ATTEMPT_DURATION: &str = "grpc.client.attempt.duration";
/// gRFC A66: message bytes an attempt sent (compressed, without the gRPC framing). Histogram;
/// labels `grpc.method`, `grpc.target`, `grpc.status`.
pub const ATTEMPT_SENT_SIZE: &str = "grpc.client.attempt.sent_total_compressed_message_size";
/// gRFC A66: message bytes an attempt received (compressed, without the gRPC framing). Histogram;
/// labels `grpc.method`, `grpc.target`, `grpc.status`.
pub const ATTEMPT_RCVD_SIZE: &str = "grpc.client.attempt.rcvd_total_compressed_message_size";

/// Label: the full method name, `package.Service/Method`, or `"other"`.
pub const METHOD: &str = "grpc.method";
/// Label: the target the layer was given.
pub const TARGET: &str = "grpc.target";
/// Label: the status code's name, `"OK"`, `"UNAVAILABLE"`, ….
pub const STATUS: &str = "grpc.status";
/// The method label of paths that are not `/service/method`, and of methods past the cap.
pub const OTHER_METHOD: &str = "other";

/// gRFC A66's latency buckets, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005,
    0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16,
    0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
];

/// gRFC A66's message size buckets, in bytes.
pub const SIZE_BUCKETS: &[f64] = &[
    0.0,
    1024.0,
    2048.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
];
