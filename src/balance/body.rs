//! [`TrackedBody`]: the response body that tells the balancer when and how its call ended.

use http::HeaderMap;
use tonic::Code;

use super::guard::CallGuard;
use crate::body::{Observer, observed_body};
use crate::status::{code_from_trailers, is_too_many_pings_status};

observed_body! {
    /// A response body that tells the balancer when the call really ends (its last frame) and how
    /// (its `grpc-status` trailer), for in-flight counts, RTT and outlier detection.
    pub struct TrackedBody<B>(Observed<B, CallGuard>);
    impl Body where {
        B: http_body::Body,
    } {
        type Data = B::Data;
        type Error = B::Error;
    }
}

/// The call on its endpoint: its round trip ends at the first data, the call at the trailers.
impl<D, E> Observer<D, E> for CallGuard {
    type Error = E;

    /// The first data ends the round trip: a stream's length is no latency.
    #[inline]
    fn on_data(&mut self, _: &D) {
        self.end_round_trip();
    }

    /// Trailers are always the last frame, and tonic stops polling after them: the call ends
    /// here (in-flight count, RTT, outcome).
    fn on_trailers(mut self, trailers: &HeaderMap) {
        let code = code_from_trailers(Some(trailers));
        if code == Code::Unavailable && is_too_many_pings_status(trailers) {
            self.too_many_pings();
        }
        self.finish(code);
    }

    /// A gRPC stream that ends without trailers ended abnormally.
    fn on_eos(mut self) {
        self.finish(code_from_trailers(None));
    }

    fn on_error(mut self, err: E) -> E {
        self.finish(Code::Unavailable);
        err
    }

    fn unobserved_error(err: E) -> E {
        err
    }
}
