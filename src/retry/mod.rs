//! gRFC A6 retries for any tonic client: jittered backoff, a retry budget and replayable request
//! bodies, as one `tower::Layer`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt};
//! use towline::connect::Connect;
//! use towline::retry::{RetryLayer, RetryPolicy};
//! use towline::testkit::{Backend, pb::{echo_client::EchoClient, EchoRequest}};
//!
//! let backend = Backend::start().await?;
//! let channel = Connect::new().oneshot(backend.uri()).await?;
//! let policy = RetryPolicy::builder()
//!     .max_attempts(3)
//!     .initial_backoff(Duration::from_millis(10))
//!     .build()?;
//! let mut client = EchoClient::new(ServiceBuilder::new().layer(RetryLayer::new(policy)).service(channel));
//!
//! backend.fail_next(2, tonic::Code::Unavailable);
//! let reply = client.unary(EchoRequest { message: "hi".into(), ..Default::default() }).await?;
//! assert_eq!(reply.get_ref().message, "hi");
//! assert_eq!(backend.calls(), 3); // two failures, retried
//! # Ok(()) }
//! ```
//!
//! ## What is retried
//! - Only failures whose code the policy lists (default `UNAVAILABLE`), and only before the call is
//!   committed: a call commits when response headers arrive (gRFC A6), so only Trailers-Only
//!   responses and errors before any response are retried. Streaming responses are never cut
//!   short and replayed. A response that is not gRPC at all (a proxy's HTTP 503) is committed
//!   too: it reaches tonic, which maps it to a status.
//! - At most `max_attempts` attempts (capped at 5), with [`Backoff`] between them, unless the
//!   server's `grpc-retry-pushback-ms` says otherwise (a negative or malformed value stops
//!   retrying). Attempts after the first carry `grpc-previous-rpc-attempts`.
//!   A pushback is capped at [`MAX_PUSHBACK`] (10 minutes), so that a call without a deadline
//!   never waits on an absurd value; more than one value stops retrying, and a pushback that
//!   stops retrying counts as a failure for the budget whatever the code (gRFC A6, grpc-go).
//!   Attempts after the first carry `grpc-previous-rpc-attempts`: the policy's earlier attempts,
//!   not counting transparent retries (as grpc-go and grpc-core count them).
//! - Never past the call's deadline: a retry that could not start before the `grpc-timeout` the
//!   caller set is not made, and every attempt after the first, transparent ones included,
//!   carries what is left of it at the moment it is sent (after its backoff and its wait for
//!   the service to be ready).
//! - Failures that prove the request never reached the server (a refused connection,
//!   `REFUSED_STREAM`, a stream above a GOAWAY; see [`is_unprocessed`](crate::status::is_unprocessed))
//!   are retried at once and transparently: a few of them (`max_transparent_retries`), outside
//!   `max_attempts` and the budget. As gRFC A6 says, this applies to every call whatever its
//!   policy: a policy of `max_attempts(1)` and a request that carries [`NoRetry`] get them too
//!   (as in grpc-go), since the server provably never saw the request.
//! - Only while the request body is replayable, up to `max_replay_bytes` (default 64 KiB); a
//!   bigger request is sent once, in full, and never retried. A body ready in one frame when
//!   the call is made (a unary request) is kept as its bytes; a streaming one is buffered as the
//!   first attempt sends it (see [`ReplayBody`]). Nothing is waited for to read it.
//! - Only while the [`RetryBudget`] allows: when it is spent the failure is returned at once.
//!
//! ## Tower semantics
//! Every attempt after the first waits for the inner service's `poll_ready`, on a clone of the
//! service the future owns. Dropping the response future cancels the attempt in flight and any
//! backoff sleep; the layer spawns no task. A call that can make no retry at all (its policy
//! makes one attempt, or it carries [`NoRetry`], and its policy has
//! `max_transparent_retries(0)`; or its body is known to exceed the cap) goes straight to the
//! inner future with no allocation.
//!
//! What transparent retries cost a call the policy does not retry: the same as a retryable
//! call's (listed on [`Retry`]: for a tonic unary call, a list of its headers and a box for its
//! body, no lock), and the request's bytes held until the response arrives. No budget is
//! touched. Set `max_transparent_retries(0)` on the policy to trade them for the bare
//! pass-through.
//!
//! ## Metrics
//! Through the [`metrics`](https://docs.rs/metrics) facade, with gRFC A96 names and no labels
//! (the call-level `MetricsLayer` owns method and target labels): the histograms
//! `grpc.client.call.retries`, `grpc.client.call.transparent_retries` and
//! `grpc.client.call.retry_delay` (seconds), recorded when a call ends, for calls that retried;
//! and the counter `towline.retry.budget_exhausted`. Only retries actually sent count: one
//! decided and then abandoned (the deadline passed while the service was not ready, or the
//! service failed instead of becoming ready) was never made. `retry_delay` is the sum of the
//! backoffs (and pushbacks) of the retries sent, not the time spent waiting for readiness.

mod body;
mod budget;
mod future;
mod head;
mod hedge;
mod layer;
pub mod metrics;
mod percent;
mod policy;
mod response_body;
mod service;
mod source;

pub use crate::backoff::{Backoff, Jitter};
pub use body::{Capped, ReplayBody};
pub use budget::{PercentBuilder, RetryBudget};
pub use future::{
    GRPC_PREVIOUS_RPC_ATTEMPTS, GRPC_RETRY_PUSHBACK_MS, MAX_PUSHBACK, ResponseFuture,
};
pub use hedge::{Hedge, HedgeFuture, HedgeLayer, HedgePolicy, HedgePolicyBuilder};
pub use layer::RetryLayer;
pub use policy::{DEFAULT_MAX_REPLAY_BYTES, MAX_ATTEMPTS_CAP, RetryPolicy, RetryPolicyBuilder};
pub use service::Retry;

use crate::BoxError;

/// A request extension that opts one call out of the policy's retries:
/// `request.extensions_mut().insert(NoRetry)` (on a `tonic::Request` too).
///
/// Transparent retries still apply (gRFC A6; grpc-go does the same): they only resend a request
/// the server provably never saw, so they cannot repeat its effects. A policy with
/// `max_transparent_retries(0)` turns those off too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoRetry;

/// The caller sees a [`tonic::Status`] with the code towline's classification gives.
fn into_status(err: impl Into<BoxError>) -> BoxError {
    Box::new(crate::status::status_from_error(err.into()))
}
