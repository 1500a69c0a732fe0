//! [`PoolBody`]: the response body that keeps its call counted on its connection until its end.

use bytes::Buf;
use http::HeaderMap;
use tonic::Status;

use super::conn::{InFlight, breaks_connection};
use super::service::connection_broke;
use crate::BoxError;
use crate::body::{Observer, observed_body};

observed_body! {
    /// A response body that counts its call as in flight on its connection until it ends or is
    /// dropped, so a long stream keeps its connection loaded.
    pub struct PoolBody<B>(Observed<B, InFlight>);
    impl Body where {
        B: http_body::Body,
        B::Data: Buf,
        B::Error: Into<BoxError>,
    } {
        type Data = B::Data;
        /// The inner body's error; a broken connection's as a [`Status`] `UNAVAILABLE` saying so
        /// (tonic would report it as `UNKNOWN` "h2 protocol error").
        type Error = BoxError;
    }
}

impl<B> PoolBody<B> {
    /// The wrapped body.
    pub fn into_inner(self) -> B {
        self.body.into_inner()
    }
}

/// The call's stream on its connection: freed (by `InFlight`'s drop) with the last frame, the
/// trailers, or when the body ends or is dropped.
impl<D, E: Into<BoxError>> Observer<D, E> for InFlight {
    type Error = BoxError;

    #[inline]
    fn on_trailers(self, trailers: &HeaderMap) {
        if crate::status::is_too_many_pings_status(trailers) {
            self.conn().too_many_pings();
        }
    }

    #[inline]
    fn on_eos(self) {}

    fn on_error(self, err: E) -> BoxError {
        body_failed(err.into(), Some(self))
    }

    fn unobserved_error(err: E) -> BoxError {
        body_failed(err.into(), None)
    }
}

/// The error of a response body that failed mid-stream; a broken connection leaves the
/// rotation here too.
fn body_failed(err: BoxError, guard: Option<InFlight>) -> BoxError {
    // tonic's body reports a connection that broke under it as an `UNKNOWN` status over the
    // transport error: judge by the transport error.
    let broke = match err.downcast_ref::<Status>() {
        Some(status) => std::error::Error::source(status).is_some_and(breaks_connection),
        None => breaks_connection(&*err),
    };
    match guard.filter(|_| broke) {
        Some(guard) => Box::new(connection_broke(err, &guard, " while reading the response")),
        None => err,
    }
}
