//! [`Observed`]: the one response body wrapper every layer uses to learn how its call ended.
//!
//! A call's response head is not its end: a gRPC call ends with its trailers (their
//! `grpc-status`), or with an error, or with a stream that stops without trailers (abnormal:
//! `UNKNOWN`), or when the caller drops the body first. Each layer that accounts for calls (the
//! balancer's in-flight counts and RTT, the pool's streams per connection, metrics, the retry
//! budget) needs exactly that, so the frames are watched here once and each layer supplies only
//! an [`Observer`] — its own guard type — with what to do at each point, as tower-http's
//! `classify::ResponseBody` hands the end of a stream to an `OnEos`.
//!
//! The observer is held as `Option<O>`: it is taken at the end, so each ending hook runs at most
//! once and the observer is dropped right after it; a body dropped before its end drops the
//! observer unended, and the observer's own `Drop` (as the guards already have) says so. A
//! [`Default`] body has no observer at all.
//!
//! The public body types (`TrackedBody`, `PoolBody`, `MetricsBody`) are newtypes over
//! [`Observed`], declared by [`observed_body!`], so that their names, bounds and docs stay theirs.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// What a layer does as its call's response body goes by. `D` and `E` are the inner body's data
/// and error types.
///
/// The ending hooks take the observer by value: each runs at most once, and the observer is
/// dropped after it. A body dropped before any of them drops the observer as it is.
pub(crate) trait Observer<D, E>: Sized {
    /// The error the wrapped body yields.
    type Error;

    /// A data frame went by (the first ends a round trip; metrics count its bytes).
    #[inline]
    fn on_data(&mut self, data: &D) {
        let _ = data;
    }

    /// The trailers, always the last frame: the call ends with their `grpc-status`.
    fn on_trailers(self, trailers: &HeaderMap);

    /// The stream ended without trailers: for gRPC, an abnormal end.
    fn on_eos(self);

    /// The inner body failed: the call ends, and the returned error is the one the body yields.
    fn on_error(self, err: E) -> Self::Error;

    /// The inner body failed with no call to observe (a default body, or one already ended):
    /// the error as the body yields it.
    fn unobserved_error(err: E) -> Self::Error;
}

pin_project! {
    /// `inner`, unchanged frame for frame, reporting its end to an [`Observer`].
    pub(crate) struct Observed<B, O> {
        #[pin]
        inner: B,
        observer: Option<O>,
    }
}

impl<B, O> Observed<B, O> {
    /// `inner`, observed by `observer` (if any) until its end.
    #[inline]
    pub(crate) fn new(inner: B, observer: Option<O>) -> Self {
        Observed { inner, observer }
    }

    /// Whether the call has ended (or was never observed).
    pub(crate) fn has_ended(&self) -> bool {
        self.observer.is_none()
    }

    /// The wrapped body; the observer is dropped unended (as a body dropped early drops it).
    pub(crate) fn into_inner(self) -> B {
        self.inner
    }
}

/// An empty body that observes no call. tonic's generated `with_interceptor` requires the
/// response body to be `Default`: an interceptor that rejects a request answers with a default
/// body, and that call was never sent through any layer to be accounted for.
impl<B: Default, O> Default for Observed<B, O> {
    fn default() -> Self {
        Observed {
            inner: B::default(),
            observer: None,
        }
    }
}

impl<B, O> Body for Observed<B, O>
where
    B: Body,
    O: Observer<B::Data, B::Error>,
{
    type Data = B::Data;
    type Error = O::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, O::Error>>> {
        let this = self.project();
        Poll::Ready(match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(observer) = this.observer.as_mut() {
                        observer.on_data(data);
                    }
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(observer) = this.observer.take()
                {
                    observer.on_trailers(trailers);
                }
                Some(Ok(frame))
            }
            Some(Err(err)) => Some(Err(match this.observer.take() {
                Some(observer) => observer.on_error(err),
                None => O::unobserved_error(err),
            })),
            None => {
                if let Some(observer) = this.observer.take() {
                    observer.on_eos();
                }
                None
            }
        })
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Declares a public response body type as a newtype over [`Observed`], with its own name, docs
/// and `Body` bounds (so its public face is the layer's, not this module's): `new`, `Debug`,
/// `Default` and a `Body` impl that hands every call to the [`Observed`] inside.
macro_rules! observed_body {
    (
        $(#[$attr:meta])*
        pub struct $name:ident<B>(Observed<B, $observer:ty>);
        impl Body where { $($bounds:tt)* } {
            type Data = $data:ty;
            $(#[$error_attr:meta])*
            type Error = $error:ty;
        }
    ) => {
        pin_project_lite::pin_project! {
            $(#[$attr])*
            pub struct $name<B> {
                #[pin]
                body: $crate::body::Observed<B, $observer>,
            }
        }

        impl<B> $name<B> {
            /// `inner`, observed by `observer` (if any) until its end.
            #[inline]
            pub(crate) fn new(inner: B, observer: Option<$observer>) -> Self {
                $name {
                    body: $crate::body::Observed::new(inner, observer),
                }
            }
        }

        impl<B> ::std::fmt::Debug for $name<B> {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("finished", &self.body.has_ended())
                    .finish_non_exhaustive()
            }
        }

        /// An empty body that accounts for no call. tonic's generated `with_interceptor`
        /// requires the response body to be `Default`: an interceptor that rejects a request
        /// answers with a default body, and that call was never sent through this layer.
        impl<B: Default> Default for $name<B> {
            fn default() -> Self {
                $name {
                    body: $crate::body::Observed::default(),
                }
            }
        }

        impl<B> ::http_body::Body for $name<B>
        where
            $($bounds)*
        {
            type Data = $data;
            $(#[$error_attr])*
            type Error = $error;

            #[inline]
            fn poll_frame(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<Option<Result<::http_body::Frame<$data>, $error>>> {
                self.project().body.poll_frame(cx)
            }

            #[inline]
            fn is_end_stream(&self) -> bool {
                self.body.is_end_stream()
            }

            #[inline]
            fn size_hint(&self) -> ::http_body::SizeHint {
                self.body.size_hint()
            }
        }
    };
}
pub(crate) use observed_body;

impl<B, O> fmt::Debug for Observed<B, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observed")
            .field("ended", &self.has_ended())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use std::sync::{Arc, Mutex};

    type Events = Arc<Mutex<Vec<String>>>;

    /// Writes down each hook as it fires, and its own drop.
    struct Log(Events);

    impl Log {
        fn push(&self, event: impl Into<String>) {
            self.0.lock().unwrap().push(event.into());
        }
    }

    impl Drop for Log {
        fn drop(&mut self) {
            self.push("drop");
        }
    }

    impl<E: std::fmt::Display> Observer<Bytes, E> for Log {
        type Error = String;

        fn on_data(&mut self, data: &Bytes) {
            self.push(format!("data {}", data.len()));
        }

        fn on_trailers(self, trailers: &HeaderMap) {
            self.push(format!(
                "trailers {}",
                trailers["grpc-status"].to_str().unwrap()
            ));
        }

        fn on_eos(self) {
            self.push("eos");
        }

        fn on_error(self, err: E) -> String {
            self.push(format!("error {err}"));
            format!("observed {err}")
        }

        fn unobserved_error(err: E) -> String {
            format!("unobserved {err}")
        }
    }

    type MockFrame = Result<Frame<Bytes>, &'static str>;
    type Frames = Vec<MockFrame>;
    type Mock = Observed<StreamBody<futures::stream::Iter<std::vec::IntoIter<MockFrame>>>, Log>;

    fn data(bytes: &'static [u8]) -> MockFrame {
        Ok(Frame::data(Bytes::from_static(bytes)))
    }

    fn trailers(status: &'static str) -> MockFrame {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", status.parse().unwrap());
        Ok(Frame::trailers(trailers))
    }

    fn observed(frames: Frames) -> (Pin<Box<Mock>>, Events) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let inner = StreamBody::new(futures::stream::iter(frames));
        (Box::pin(Observed::new(inner, Some(Log(log.clone())))), log)
    }

    fn events(log: &Events) -> Vec<String> {
        log.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn each_hook_fires_once_in_order_and_the_observer_goes_with_the_trailers() {
        let (mut body, log) = observed(vec![data(b"ab"), data(b"cde"), trailers("0")]);
        while body.frame().await.is_some() {}
        assert_eq!(events(&log), ["data 2", "data 3", "trailers 0", "drop"]);
        assert!(body.has_ended());
        // Polled again after its end: nothing more to report.
        assert!(body.frame().await.is_none());
        drop(body);
        assert_eq!(events(&log).len(), 4);
    }

    #[tokio::test]
    async fn a_stream_without_trailers_ends_at_its_end() {
        let (mut body, log) = observed(vec![data(b"ab")]);
        while body.frame().await.is_some() {}
        assert_eq!(events(&log), ["data 2", "eos", "drop"]);
    }

    #[tokio::test]
    async fn an_error_ends_the_call_and_the_observer_maps_it() {
        let (mut body, log) = observed(vec![data(b"ab"), Err("reset"), Err("again")]);
        body.frame().await.unwrap().unwrap();
        assert_eq!(body.frame().await.unwrap().unwrap_err(), "observed reset");
        assert_eq!(events(&log), ["data 2", "error reset", "drop"]);
        assert_eq!(body.frame().await.unwrap().unwrap_err(), "unobserved again");
        assert_eq!(events(&log).len(), 3);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_drops_its_observer_unended() {
        let (mut body, log) = observed(vec![data(b"ab"), trailers("0")]);
        body.frame().await.unwrap().unwrap();
        assert!(!body.has_ended());
        drop(body);
        assert_eq!(events(&log), ["data 2", "drop"]);
    }

    #[tokio::test]
    async fn a_default_body_has_no_observer() {
        let mut body = Observed::<Empty<Bytes>, Log>::default();
        assert!(body.has_ended());
        assert!(body.is_end_stream(), "passed through");
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.frame().await.is_none());
    }

    #[test]
    fn size_and_end_pass_through() {
        let inner = http_body_util::Full::new(Bytes::from_static(b"abc"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let body = Observed::new(inner, Some(Log(log.clone())));
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        assert_eq!(body.into_inner().size_hint().exact(), Some(3));
        assert_eq!(
            events(&log),
            ["drop"],
            "into_inner drops the observer unended"
        );
    }
}
