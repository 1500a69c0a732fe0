//! [`TrackedBody`]: the response body that tells the balancer when and how its call ended.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::Frame;
use pin_project_lite::pin_project;
use tonic::Code;

use super::guard::CallGuard;
use crate::status::code_from_trailers;

pin_project! {
    /// A response body that tells the balancer when the call really ends (its last frame) and how
    /// (its `grpc-status` trailer), for in-flight counts, RTT and outlier detection.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: Option<CallGuard>,
    }
}

impl<B> TrackedBody<B> {
    /// `inner`, tracked by `guard` until its end.
    pub(crate) fn new(inner: B, mut guard: CallGuard) -> Self {
        guard.responded();
        TrackedBody {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B> fmt::Debug for TrackedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedBody")
            .field("finished", &self.guard.is_none())
            .finish_non_exhaustive()
    }
}

/// An empty body that tracks no call. tonic's generated `with_interceptor` requires the
/// response body to be `Default`: an interceptor that rejects a request answers with a default
/// body, which has no call on any endpoint to account for.
impl<B: Default> Default for TrackedBody<B> {
    fn default() -> Self {
        TrackedBody {
            inner: B::default(),
            guard: None,
        }
    }
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            // The first data ends the round trip: a stream's length is no latency.
            Some(Ok(frame)) if frame.is_data() => {
                if let Some(guard) = this.guard.as_mut() {
                    guard.end_round_trip();
                }
            }
            // Trailers are always the last frame, and tonic stops polling after them: the call
            // ends here (in-flight count, RTT).
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = code_from_trailers(Some(trailers));
                    if code == Code::Unavailable
                        && crate::status::is_too_many_pings_status(trailers)
                        && let Some(guard) = this.guard.as_ref()
                    {
                        guard.too_many_pings();
                    }
                    CallGuard::end(this.guard, code);
                }
            }
            Some(Err(_)) => CallGuard::end(this.guard, Code::Unavailable),
            // A gRPC stream that ends without trailers ended abnormally.
            None => CallGuard::end(this.guard, code_from_trailers(None)),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
