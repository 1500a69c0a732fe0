//! [`Connect`]: a `MakeService` that turns a target [`Uri`] into a connected tonic [`Channel`].
//!
//! Layers that manage connections (a pool per endpoint, a balancer over endpoints) take a
//! `Service<Uri>` so they can open a connection whenever they need one. `Connect` is that service
//! for plain tonic: every target gets the same [`Endpoint`] settings, applied by one function.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::time::Duration;
//! use tower::ServiceExt;
//! use towline::connect::Connect;
//! # let backend = towline::testkit::Backend::start().await?;
//!
//! let connect = Connect::new().configure(|endpoint| {
//!     endpoint
//!         .http2_keep_alive_interval(Duration::from_secs(10))
//!         .keep_alive_timeout(Duration::from_secs(5))
//! });
//! let channel = connect.oneshot(backend.uri()).await?;
//! let mut client = towline::testkit::pb::echo_client::EchoClient::new(channel);
//! client.unary(towline::testkit::pb::EchoRequest::default()).await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use pin_project_lite::pin_project;
use tonic::transport::{Channel, Endpoint, Error};

/// gRPC's minimum connect timeout (grpc/doc/connection-backoff.md).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

type Configure = dyn Fn(Endpoint) -> Endpoint + Send + Sync;

/// Opens a tonic [`Channel`] to each target it is called with. Cheap to clone.
///
/// Defaults: `TCP_NODELAY` on, a 20 s connect timeout, and an eager connect (the future resolves
/// once the HTTP/2 connection is up, so a dead target fails here rather than on the first call).
#[derive(Clone)]
pub struct Connect {
    configure: Option<Arc<Configure>>,
    lazy: bool,
}

impl Connect {
    /// A connector with the default settings.
    pub fn new() -> Self {
        Connect {
            configure: None,
            lazy: false,
        }
    }

    /// Applies `f` to each target's [`Endpoint`], after the defaults: keepalive, window sizes,
    /// timeouts, TLS, user agent. Replaces any earlier `configure`.
    pub fn configure(mut self, f: impl Fn(Endpoint) -> Endpoint + Send + Sync + 'static) -> Self {
        self.configure = Some(Arc::new(f));
        self
    }

    /// Resolve at once with a channel that connects on its first call (`Endpoint::connect_lazy`).
    pub fn lazy(mut self) -> Self {
        self.lazy = true;
        self
    }

    /// The endpoint this connector would use for `target`.
    pub fn endpoint(&self, target: Uri) -> Endpoint {
        let endpoint = Endpoint::from(target)
            .tcp_nodelay(true)
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        match &self.configure {
            Some(configure) => configure(endpoint),
            None => endpoint,
        }
    }
}

impl Default for Connect {
    fn default() -> Self {
        Connect::new()
    }
}

impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("configured", &self.configure.is_some())
            .field("lazy", &self.lazy)
            .finish()
    }
}

impl tower_service::Service<Uri> for Connect {
    type Response = Channel;
    type Error = Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Uri) -> ConnectFuture {
        let endpoint = self.endpoint(target);
        let state = if self.lazy {
            ConnectState::Lazy {
                channel: Some(endpoint.connect_lazy()),
            }
        } else {
            // Boxed: `Endpoint::connect` is an `async fn` whose future has no nameable type, and a
            // connection attempt is rare enough that one allocation does not matter.
            ConnectState::Connecting {
                future: Box::pin(async move { endpoint.connect().await }),
            }
        };
        ConnectFuture { state }
    }
}

type BoxConnect = Pin<Box<dyn Future<Output = Result<Channel, Error>> + Send>>;

pin_project! {
    /// The response future of [`Connect`].
    pub struct ConnectFuture {
        #[pin]
        state: ConnectState,
    }
}

pin_project! {
    #[project = ConnectStateProj]
    enum ConnectState {
        Lazy { channel: Option<Channel> },
        Connecting { future: BoxConnect },
    }
}

impl fmt::Debug for ConnectFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectFuture").finish_non_exhaustive()
    }
}

impl Future for ConnectFuture {
    type Output = Result<Channel, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            ConnectStateProj::Lazy { channel } => Poll::Ready(Ok(channel
                .take()
                .expect("ConnectFuture polled after completion"))),
            ConnectStateProj::Connecting { future } => future.as_mut().poll(cx),
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::Backend;
    use crate::testkit::pb::{EchoRequest, echo_client::EchoClient};
    use tower::ServiceExt;

    #[tokio::test]
    async fn connects_each_target_with_the_template() {
        let backends = Backend::start_many(2).await.unwrap();
        let connect = Connect::new().configure(|e| e.user_agent("towline-test/1").unwrap());
        for backend in &backends {
            let channel = connect.clone().oneshot(backend.uri()).await.unwrap();
            let reply = EchoClient::new(channel)
                .unary(EchoRequest::default())
                .await
                .unwrap();
            assert_eq!(reply.get_ref().backend, backend.id());
            // The template's settings reach the server.
            let agent = &reply.get_ref().request_headers["user-agent"];
            assert!(agent.starts_with("towline-test/1"), "{agent}");
        }
    }

    #[tokio::test]
    async fn eager_connect_fails_on_a_dead_target_and_lazy_does_not() {
        let backend = Backend::start().await.unwrap();
        backend.stop().await;
        let err = Connect::new().oneshot(backend.uri()).await.unwrap_err();
        assert_eq!(
            crate::status::code_from_error(&err),
            tonic::Code::Unavailable
        );

        let channel = Connect::new().lazy().oneshot(backend.uri()).await.unwrap();
        let status = EchoClient::new(channel)
            .unary(EchoRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
}
