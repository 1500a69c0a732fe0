//! [`Connect`]: a `MakeService` that turns a target [`Uri`] into a connected tonic [`Channel`].
//!
//! Layers that manage connections (a pool per endpoint, a balancer over endpoints) take a
//! `Service<Uri>` so they can open a connection whenever they need one. `Connect` is that service
//! for plain tonic: every target gets the same [`Endpoint`] settings, applied by one function.
//!
//! Targets are `http://` and `https://` URIs, or the keys of Unix domain sockets
//! (`unix://localhost/run/app.sock`, `unix-abstract://localhost/name`; see
//! [`channel::unix_key`](crate::channel::unix_key)), which it dials as those sockets.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::time::Duration;
//! use tower::ServiceExt;
//! use towline::connect::Connect;
//! # let backend = towline::testkit::Backend::start().await?;
//!
//! let connect = Connect::new()
//!     .keepalive(Duration::from_secs(30), Duration::from_secs(10))
//!     .configure(|endpoint| endpoint.initial_stream_window_size(1 << 20));
//! let channel = connect.oneshot(backend.uri()).await?;
//! let mut client = towline::testkit::pb::echo_client::EchoClient::new(channel);
//! client.unary(towline::testkit::pb::EchoRequest::default()).await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use pin_project_lite::pin_project;
use tonic::transport::{Channel, Endpoint, Error};

use crate::BoxError;

/// gRPC's minimum connect timeout (grpc/doc/connection-backoff.md).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

type Configure = dyn Fn(Endpoint) -> Result<Endpoint, BoxError> + Send + Sync;

/// Keepalive intervals below this draw a warning: grpc-go refuses them outright, and no gRPC
/// server accepts pings this often by default while it sends no data (see [`Connect::keepalive`]).
pub const KEEPALIVE_WARN_BELOW: Duration = Duration::from_secs(10);

/// The longest a keepalive interval grows to by doubling after `too_many_pings`.
pub const MAX_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3600);

/// Opens a tonic [`Channel`] to each target it is called with. Cheap to clone.
///
/// Defaults: `TCP_NODELAY` on, a 20 s connect timeout, no HTTP/2 keepalive, and an eager connect
/// (the future resolves once the HTTP/2 connection is up, so a dead target fails here rather
/// than on the first call).
#[derive(Clone)]
pub struct Connect {
    configure: Option<Arc<Configure>>,
    keepalive: Option<Keepalive>,
    lazy: bool,
}

/// HTTP/2 keepalive settings (gRFC A8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keepalive {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) while_idle: bool,
}

impl Keepalive {
    /// Applies these settings to `endpoint`, with the interval doubled once for every
    /// `too_many_pings` GOAWAY that `target` has sent this process (gRFC A8).
    pub(crate) fn apply(&self, target: &Uri, endpoint: Endpoint) -> Endpoint {
        endpoint
            .http2_keep_alive_interval(self.interval_for(target))
            .keep_alive_timeout(self.timeout)
            .keep_alive_while_idle(self.while_idle)
    }

    pub(crate) fn interval_for(&self, target: &Uri) -> Duration {
        let doublings = ping_strikes()
            .get(&target_key(target))
            .copied()
            .unwrap_or(0);
        self.interval
            .checked_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX))
            .unwrap_or(MAX_KEEPALIVE_INTERVAL)
            .min(MAX_KEEPALIVE_INTERVAL.max(self.interval))
    }

    /// Warns once per interval configured below what servers accept.
    pub(crate) fn warn_if_too_frequent(interval: Duration) {
        if interval < KEEPALIVE_WARN_BELOW {
            tracing::warn!(
                ?interval,
                "HTTP/2 keepalive interval below 10 s: grpc-core and grpc-go servers by default \
                 accept a ping only every 5 minutes while they send no data (a quiet stream such \
                 as a health Watch counts), and answer more with GOAWAY too_many_pings, failing \
                 the calls in flight; towline doubles the interval for that target each time \
                 (gRFC A8). Raise the interval, or the server's permitted ping interval \
                 (grpc.http2.min_recv_ping_interval_without_data_ms, grpc-go \
                 keepalive.EnforcementPolicy.MinTime)"
            );
        }
    }
}

/// How many times each target has answered our keepalive with GOAWAY `too_many_pings`, for the
/// life of the process: every connector's next connection to it pings half as often (gRFC A8,
/// as grpc-go and grpc-java do per channel). Keyed by `host:port`.
fn ping_strikes() -> std::sync::MutexGuard<'static, HashMap<String, u32>> {
    static STRIKES: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    STRIKES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

fn target_key(target: &Uri) -> String {
    // Every Unix socket key has the authority `localhost`: its path tells them apart.
    if crate::channel::target::unix_socket(target).is_some() {
        return target.to_string();
    }
    target
        .authority()
        .map_or_else(|| target.to_string(), ToString::to_string)
}

/// Records that `target` answered our keepalive with GOAWAY `ENHANCE_YOUR_CALM`
/// `too_many_pings` ([`is_too_many_pings`](crate::status::is_too_many_pings)): later connections
/// to it ping half as often (gRFC A8). Call once per connection that received it: the layers
/// that own connections (pool, balancer) do, when the first call on it fails so.
pub(crate) fn note_too_many_pings(target: &Uri) {
    let key = target_key(target);
    let doublings = {
        let mut strikes = ping_strikes();
        let count = strikes.entry(key.clone()).or_insert(0);
        *count = count.saturating_add(1).min(31);
        *count
    };
    tracing::warn!(
        target = %key,
        doublings,
        "server closed the connection with GOAWAY ENHANCE_YOUR_CALM (too_many_pings): its \
         keepalive policy allows fewer pings; new connections to it ping half as often (gRFC A8)"
    );
}

/// How often new connections from a connector configured with keepalive `interval` ping
/// `target` now: `interval` doubled once for every `too_many_pings` GOAWAY `target` has sent
/// (gRFC A8). For logs and tests.
pub fn keepalive_interval_for(target: &Uri, interval: Duration) -> Duration {
    Keepalive {
        interval,
        timeout: Duration::ZERO,
        while_idle: false,
    }
    .interval_for(target)
}

impl Connect {
    /// A connector with the default settings.
    pub fn new() -> Self {
        Connect {
            configure: None,
            keepalive: None,
            lazy: false,
        }
    }

    /// HTTP/2 keepalive: a PING every `interval` while calls are open, the connection closed if
    /// no answer comes within `timeout` (a dead peer found in interval + timeout instead of at
    /// the calls' deadlines). Off by default.
    ///
    /// **What servers accept** (gRFC A8): grpc-core (C++, Python, Ruby, PHP servers) and grpc-go
    /// servers by default accept a ping only every **5 minutes** while they send no data,
    /// calls open or not, and answer more with GOAWAY `ENHANCE_YOUR_CALM` `too_many_pings`,
    /// closing the connection (and failing the calls on it) after the third; grpc-js and
    /// hyper/tonic servers do not enforce. A ping is only sent after `interval` with nothing
    /// received, so busy connections never ping; a quiet long call or a health `Watch` does.
    /// towline answers `too_many_pings` as grpc-go and grpc-java do: the interval for that
    /// target doubles for every later connection (up to 1 h) and stays doubled, with a warning.
    /// Below 10 s (grpc-go's floor) it warns when set. Choose an interval the servers permit
    /// (their `grpc.http2.min_recv_ping_interval_without_data_ms`, grpc-go's
    /// `EnforcementPolicy.MinTime`), or raise that on servers you own to what you need.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        Keepalive::warn_if_too_frequent(interval);
        self.keepalive = Some(Keepalive {
            interval,
            timeout,
            while_idle: self.keepalive.is_some_and(|k| k.while_idle),
        });
        self
    }

    /// Also ping while no call is open (default false): finds a dead idle connection before
    /// the next call does, at the cost of pings servers may count against you.
    pub fn keepalive_while_idle(mut self, enabled: bool) -> Self {
        if let Some(keepalive) = &mut self.keepalive {
            keepalive.while_idle = enabled;
        }
        self
    }

    pub(crate) fn with_keepalive(mut self, keepalive: Option<Keepalive>) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Applies `f` to each target's [`Endpoint`], after the defaults and after every earlier
    /// `configure` or `try_configure`: keepalive, window sizes, timeouts, TLS, user agent.
    /// Calls compose, so settings made earlier (the connect timeout of
    /// [`PoolConfig::connector`](crate::pool::PoolConfig::connector), say) survive unless `f`
    /// sets the same thing again.
    ///
    /// A panic in `f` fails that connect with a [`ConfigureError`] ("Connect::configure
    /// panicked: …") instead of unwinding through the layer that connects (a balancer's endpoint
    /// task, a pool's), which retries it with its backoff and shows the reason. Settings that
    /// can fail (`tls_config`, `user_agent`) are better set with
    /// [`try_configure`](Self::try_configure).
    pub fn configure(self, f: impl Fn(Endpoint) -> Endpoint + Send + Sync + 'static) -> Self {
        self.try_configure(move |endpoint| Ok::<_, BoxError>(f(endpoint)))
    }

    /// Like [`configure`](Self::configure), for settings that can fail: an `Err` from `f` fails
    /// that connect with a [`ConfigureError`] whose source is that error, so `f` can use `?`.
    /// Runs after every earlier `configure` or `try_configure`, as `configure` does.
    ///
    /// ```
    /// # use towline::connect::Connect;
    /// let connect = Connect::new().try_configure(|endpoint| endpoint.user_agent("my-app/1.0"));
    /// ```
    pub fn try_configure<E>(
        mut self,
        f: impl Fn(Endpoint) -> Result<Endpoint, E> + Send + Sync + 'static,
    ) -> Self
    where
        E: Into<BoxError>,
    {
        let f = move |endpoint| f(endpoint).map_err(Into::into);
        self.configure = Some(match self.configure.take() {
            // Composed, not replaced: the pool's and the channel builder's settings stay.
            Some(earlier) => Arc::new(move |endpoint| f(earlier(endpoint)?)),
            None => Arc::new(f),
        });
        self
    }

    /// TLS with `config` on every connection, composed with the other settings like
    /// [`try_configure`](Self::try_configure). Targets must be `https://`: tonic speaks TLS
    /// only to `https://` URIs and would send plaintext HTTP/2 to an `http://` one (which a TLS
    /// server answers with "frame with invalid size"), so such a target fails its connect with
    /// a [`ConfigureError`] saying so; a Unix socket fails too (tonic has no TLS over UDS).
    /// [`Channel::builder(..).tls(..)`](crate::channel::ChannelBuilder::tls) sets the scheme
    /// for you.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(self, config: tonic::transport::ClientTlsConfig) -> Self {
        self.try_configure(move |endpoint: Endpoint| {
            if endpoint.uri().scheme_str() != Some("https") {
                return Err(format!(
                    "TLS is configured but the target {} is not https://",
                    endpoint.uri()
                )
                .into());
            }
            endpoint.tls_config(config.clone()).map_err(BoxError::from)
        })
    }

    /// Resolve at once with a channel that connects on its first call (`Endpoint::connect_lazy`).
    pub fn lazy(mut self) -> Self {
        self.lazy = true;
        self
    }

    /// The endpoint this connector would use for `target`.
    ///
    /// # Panics
    ///
    /// When the [`configure`](Self::configure) function panics or the
    /// [`try_configure`](Self::try_configure) function fails; [`try_endpoint`](Self::try_endpoint)
    /// returns the error instead, as connecting does.
    pub fn endpoint(&self, target: Uri) -> Endpoint {
        match self.try_endpoint(target) {
            Ok(endpoint) => endpoint,
            Err(err) => panic!("{}", crate::status::describe_error(&err)),
        }
    }

    /// The endpoint this connector would use for `target`, or why the configure function could
    /// not make it (it panicked, or returned an error).
    pub fn try_endpoint(&self, target: Uri) -> Result<Endpoint, ConfigureError> {
        let endpoint = match crate::channel::target::unix_socket(&target) {
            None => Endpoint::from(target.clone()),
            Some(socket) => unix_endpoint(socket)
                .map_err(|err| ConfigureError(ConfigureFailure::Failed(err)))?,
        };
        let mut endpoint = endpoint
            .tcp_nodelay(true)
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        if let Some(keepalive) = &self.keepalive {
            endpoint = keepalive.apply(&target, endpoint);
        }
        let Some(configure) = &self.configure else {
            return Ok(endpoint);
        };
        // The closure is the user's: a panic in it must fail this connect, not unwind through
        // the task that connects (a balancer's endpoint task, a pool's). Unwind safety: the
        // closure sees only the endpoint it is handed and returns a new one; a panic leaves
        // nothing of ours half-updated.
        match std::panic::catch_unwind(AssertUnwindSafe(|| configure(endpoint))) {
            Ok(Ok(endpoint)) => Ok(endpoint),
            Ok(Err(err)) => Err(ConfigureError(ConfigureFailure::Failed(err))),
            Err(panic) => Err(ConfigureError(ConfigureFailure::Panicked(panic_message(
                &*panic,
            )))),
        }
    }
}

/// A tonic endpoint for the Unix socket a discovery key names (see
/// [`unix_key`](crate::channel::unix_key)): tonic connects to `unix:<path>`, an abstract name
/// being a path with a leading NUL. Requests carry the authority `localhost`, as gRPC sends to
/// Unix sockets (tonic's own placeholder is `tonic`).
fn unix_endpoint(socket: Result<String, String>) -> Result<Endpoint, BoxError> {
    let path = socket.map_err(|problem| format!("bad Unix socket key: {problem}"))?;
    let endpoint = Endpoint::from_shared(format!("unix:{path}"))?;
    Ok(endpoint.origin(Uri::from_static("http://localhost")))
}

/// The message a panic was raised with, if it was a string (as `panic!` and `expect` make it).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(a panic with no message)".to_owned()
    }
}

/// Why [`Connect`] could not make a target's [`Endpoint`]: its [`configure`](Connect::configure)
/// function panicked, or its [`try_configure`](Connect::try_configure) function returned an
/// error (its message follows, its source is this error's source). The connect fails with a
/// `tonic::transport::Error` whose source chain holds it; a balancer shows it in the endpoint's
/// reason and retries with its reconnect backoff.
#[derive(Debug)]
pub struct ConfigureError(ConfigureFailure);

#[derive(Debug)]
enum ConfigureFailure {
    Panicked(String),
    Failed(BoxError),
}

impl ConfigureError {
    /// Whether the configure function panicked (rather than returned an error).
    pub fn is_panic(&self) -> bool {
        matches!(self.0, ConfigureFailure::Panicked(_))
    }
}

impl fmt::Display for ConfigureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            ConfigureFailure::Panicked(message) => {
                write!(f, "Connect::configure panicked: {message}")
            }
            // Its words here and its own source below: a reason shown as one line (a balancer
            // endpoint's) says what failed even when the user's error has no source.
            ConfigureFailure::Failed(err) => write!(f, "Connect::try_configure failed: {err}"),
        }
    }
}

impl std::error::Error for ConfigureError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0 {
            ConfigureFailure::Panicked(_) => None,
            ConfigureFailure::Failed(err) => err.source(),
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
            .field("keepalive", &self.keepalive)
            .field("lazy", &self.lazy)
            .finish()
    }
}

impl tower_service::Service<Uri> for Connect {
    type Response = Channel;
    /// When the configure function panicked or failed, the source chain holds a
    /// [`ConfigureError`] saying so.
    type Error = Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Uri) -> ConnectFuture {
        let endpoint = match self.try_endpoint(target.clone()) {
            Ok(endpoint) => endpoint,
            Err(err) => {
                // tonic's `Error` has no public constructor: a connect through a connector that
                // refuses with the configure failure is how it gets one carrying that failure
                // as its source. Eager even for a lazy connector, so the failure is not hidden
                // until the first call.
                let endpoint = Endpoint::from(target);
                let refuse = Refuse(Some(err));
                return ConnectFuture {
                    state: ConnectState::Connecting {
                        future: Box::pin(
                            async move { endpoint.connect_with_connector(refuse).await },
                        ),
                    },
                };
            }
        };
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

/// A connector that opens nothing: it fails with why the endpoint could not be configured.
struct Refuse(Option<ConfigureError>);

impl tower_service::Service<Uri> for Refuse {
    type Response = NoIo;
    type Error = BoxError;
    type Future = std::future::Ready<Result<NoIo, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        // tonic calls it once per eager connect; a second call still fails.
        let err: BoxError = match self.0.take() {
            Some(err) => Box::new(err),
            None => "the endpoint could not be configured".into(),
        };
        std::future::ready(Err(err))
    }
}

/// The connection [`Refuse`] never makes.
enum NoIo {}

impl hyper::rt::Read for NoIo {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match *self {}
    }
}

impl hyper::rt::Write for NoIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match *self {}
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match *self {}
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match *self {}
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

    /// The `ConfigureError` in `err`'s source chain.
    fn configure_error(err: &Error) -> &ConfigureError {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(err) = next {
            if let Some(found) = err.downcast_ref::<ConfigureError>() {
                return found;
            }
            next = err.source();
        }
        panic!("no ConfigureError in {err:?}")
    }

    #[tokio::test]
    async fn a_panicking_configure_fails_the_connect_saying_so() {
        let backend = Backend::start().await.unwrap();
        let connect = Connect::new().configure(|_| panic!("no endpoint for you"));
        for connect in [connect.clone(), connect.lazy()] {
            let err = connect.oneshot(backend.uri()).await.unwrap_err();
            let err = configure_error(&err);
            assert!(err.is_panic());
            assert_eq!(
                err.to_string(),
                "Connect::configure panicked: no endpoint for you"
            );
        }
        assert_eq!(backend.connections_accepted(), 0);
    }

    #[tokio::test]
    async fn try_configure_fails_the_connect_with_its_error_and_succeeds_without_one() {
        let backend = Backend::start().await.unwrap();
        let failing = Connect::new().try_configure(|_| Err::<Endpoint, _>("no TLS roots"));
        let err = failing.oneshot(backend.uri()).await.unwrap_err();
        let err = configure_error(&err);
        assert!(!err.is_panic());
        assert_eq!(
            crate::status::describe_error(err),
            "Connect::try_configure failed: no TLS roots"
        );
        assert_eq!(backend.connections_accepted(), 0);

        let fine = Connect::new().try_configure(|e| e.user_agent("towline-test/2"));
        let channel = fine.oneshot(backend.uri()).await.unwrap();
        let reply = EchoClient::new(channel)
            .unary(EchoRequest::default())
            .await
            .unwrap();
        let agent = &reply.get_ref().request_headers["user-agent"];
        assert!(agent.starts_with("towline-test/2"), "{agent}");
    }
}
