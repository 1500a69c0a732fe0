use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{FutureExt as _, Stream};
use http::{HeaderName, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tonic::{Code, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::ServiceExt;

use super::pb::echo_server::{Echo, EchoServer};
use super::pb::log_server::LogServer;
use super::pb::{EchoRequest, EchoResponse};
use super::produce::LogService;

/// The response header in which every backend names itself.
pub const BACKEND_HEADER: &str = "towline-backend";

/// The response header in which a backend numbers the connection that carried the call
/// (1, 2, … in the order it accepted them, across restarts).
pub const CONNECTION_HEADER: &str = "towline-testkit-connection";

/// A request header that adds latency, in milliseconds, to that one call.
pub const LATENCY_HEADER: &str = "towline-testkit-latency-ms";

/// The gRPC service name the backend's health status is also reported under.
pub const ECHO_SERVICE: &str = "towline.testkit.v1.Echo";

/// An in-process tonic server on a loopback port that serves `towline.testkit.v1.Echo` and
/// `grpc.health.v1.Health`, with faults that tests switch on and off at run time.
///
/// Faults apply to `Echo` calls only, never to health checks, so a test can make a backend slow
/// or failing while it still reports `SERVING` (or the other way round). Like a real server it
/// honours the caller's `grpc-timeout`: a call slower than its deadline ends at the deadline with
/// `DEADLINE_EXCEEDED`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// use towline::testkit::{Backend, pb::{echo_client::EchoClient, EchoRequest}};
///
/// let backend = Backend::start().await?;
/// backend.fail_next(1, tonic::Code::Unavailable);
///
/// let channel = tonic::transport::Endpoint::from(backend.uri()).connect_lazy();
/// let mut client = EchoClient::new(channel);
/// let err = client.unary(EchoRequest::default()).await.unwrap_err();
/// assert_eq!(err.code(), tonic::Code::Unavailable);
/// let ok = client.unary(EchoRequest::default()).await.unwrap();
/// assert_eq!(ok.get_ref().backend, backend.id());
/// assert_eq!(backend.calls(), 2);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Backend {
    id: Arc<str>,
    addr: SocketAddr,
    binder: Binder,
    max_concurrent_streams: Option<u32>,
    serve_health: bool,
    shared: Arc<Shared>,
    health: HealthReporter,
    server: Mutex<Option<JoinHandle<()>>>,
}

/// Configures a [`Backend`] before it starts.
#[derive(Debug, Clone, Default)]
pub struct BackendBuilder {
    id: Option<String>,
    addr: Option<SocketAddr>,
    binder: Binder,
    max_concurrent_streams: Option<u32>,
    without_health: bool,
}

impl BackendBuilder {
    /// The id the backend reports in [`BACKEND_HEADER`] and in `EchoResponse::backend`.
    /// Default: its address, `127.0.0.1:PORT`.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The address to listen on. Default: `127.0.0.1:0`, a free loopback port.
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// Listen inside the network namespace `ns`, on a free port of its address (or on the port
    /// of [`addr`](Self::addr) if one was set), so that `ns`'s faults cut this backend off.
    /// [`restart`](Backend::restart) binds inside it again.
    #[cfg(target_os = "linux")]
    pub fn netns(mut self, ns: &super::NetNs) -> Self {
        let port = self.addr.map_or(0, |addr| addr.port());
        self.addr = Some(SocketAddr::from((ns.addr(), port)));
        self.binder = Binder::Netns(ns.name().into());
        self
    }

    /// The HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` the server announces. Default: hyper's (200).
    pub fn max_concurrent_streams(mut self, max: u32) -> Self {
        self.max_concurrent_streams = Some(max);
        self
    }

    /// Serve no `grpc.health.v1` service: health calls get `UNIMPLEMENTED`, as from a server
    /// that never registered it.
    pub fn without_health_service(mut self) -> Self {
        self.without_health = true;
        self
    }

    /// Binds the listener and starts serving.
    pub async fn start(self) -> io::Result<Backend> {
        let listener = self
            .binder
            .bind(self.addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))))?;
        let addr = listener.local_addr()?;
        let id: Arc<str> = self.id.unwrap_or_else(|| addr.to_string()).into();
        let health = HealthReporter::new();
        health
            .set_service_status(ECHO_SERVICE, ServingStatus::Serving)
            .await;
        let backend = Backend {
            shared: Arc::new(Shared::new(id.clone())),
            id,
            addr,
            binder: self.binder,
            max_concurrent_streams: self.max_concurrent_streams,
            serve_health: !self.without_health,
            health,
            server: Mutex::new(None),
        };
        backend.serve(listener);
        Ok(backend)
    }
}

impl Backend {
    /// Starts a backend with the default settings on a free loopback port.
    pub async fn start() -> io::Result<Backend> {
        Backend::builder().start().await
    }

    /// Configures a backend before starting it.
    pub fn builder() -> BackendBuilder {
        BackendBuilder::default()
    }

    /// Starts `n` backends with ids `backend-0` … `backend-{n-1}`.
    pub async fn start_many(n: usize) -> io::Result<Vec<Backend>> {
        let mut backends = Vec::with_capacity(n);
        for i in 0..n {
            backends.push(
                Backend::builder()
                    .id(format!("backend-{i}"))
                    .start()
                    .await?,
            );
        }
        Ok(backends)
    }

    /// This backend's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The address it listens on (kept across [`stop`](Self::stop) and [`restart`](Self::restart)).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, ready for `tonic::transport::Endpoint::from`.
    pub fn uri(&self) -> Uri {
        Uri::try_from(format!("http://{}", self.addr)).expect("a socket address makes a valid URI")
    }

    /// Adds this much latency to every `Echo` call, before it answers or fails.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults().latency = Latency::Fixed(latency);
    }

    /// Adds a latency drawn uniformly from `min..=max` to each `Echo` call.
    pub fn set_latency_range(&self, min: Duration, max: Duration) {
        self.shared.faults().latency = Latency::Uniform(min, max.max(min));
    }

    /// Fails the next `n` `Echo` calls with `code`, as Trailers-Only responses.
    pub fn fail_next(&self, n: u64, code: Code) {
        let mut faults = self.shared.faults();
        faults.fail_next = n;
        faults.fail_next_code = code;
    }

    /// Fails this fraction (0.0 to 1.0, clamped) of `Echo` calls with `code`, chosen at random.
    pub fn fail_fraction(&self, fraction: f64, code: Code) {
        let mut faults = self.shared.faults();
        faults.fail_fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        faults.fail_fraction_code = code;
    }

    /// Attaches `grpc-retry-pushback-ms: VALUE` (gRFC A6 server pushback) to every injected
    /// failure, or stops attaching it (`None`). The value is sent as given, so a test can send a
    /// negative or malformed one. A value that is not a valid header value is sent as `invalid`.
    pub fn set_pushback(&self, value: Option<&str>) {
        *self.shared.pushback() = value.map(|v| {
            tonic::metadata::MetadataValue::try_from(v)
                .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("invalid"))
        });
    }

    /// Removes every fault: no added latency, no failures, no pushback.
    pub fn clear_faults(&self) {
        *self.shared.faults() = Faults::default();
        *self.shared.pushback() = None;
    }

    /// Sets the `grpc.health.v1` status of both the server (`""`) and [`ECHO_SERVICE`];
    /// `Watch` streams see the change at once.
    pub async fn set_health(&self, status: ServingStatus) {
        self.health.set_service_status("", status).await;
        self.health.set_service_status(ECHO_SERVICE, status).await;
    }

    /// How many `Echo` calls reached this backend, failed ones included (health checks excluded).
    /// `Log.Produce` calls count here too.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }

    /// How many records `Log.Produce` calls have accepted (records of failed calls and rejected
    /// records excluded). `Log.Produce` shares `Echo`'s faults: latency, fail next, fail fraction.
    pub fn records(&self) -> u64 {
        self.shared.records.load(Ordering::Relaxed)
    }

    /// How many TCP connections the backend has accepted since it first started.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// How many of its connections are open now.
    pub fn open_connections(&self) -> u64 {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    /// Drops the connection numbered `number` ([`CONNECTION_HEADER`]: 1, 2, … in the order
    /// they were accepted) at once, as a crash of that one connection would: its calls fail,
    /// the others go on. Returns whether it was open.
    pub fn drop_connection(&self, number: u64) -> bool {
        let handle = self
            .shared
            .connection_tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&number);
        handle.map(|task| task.abort()).is_some()
    }

    /// Whether the backend is listening.
    pub fn is_running(&self) -> bool {
        self.server_slot().is_some()
    }

    /// Closes the listener and every open connection at once, as a crashed process would: calls
    /// in flight fail, new connections are refused.
    pub async fn stop(&self) {
        let server = self.server_slot().take();
        if let Some(server) = server {
            server.abort();
            // Aborting the accept loop drops its JoinSet, which aborts every connection task.
            let _ = server.await;
        }
    }

    /// Listens again on the same address after [`stop`](Self::stop). Faults, counters and health
    /// status carry over. Does nothing if it is already running.
    pub async fn restart(&self) -> io::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let listener = self.binder.bind(self.addr)?;
        self.serve(listener);
        Ok(())
    }

    fn serve(&self, listener: TcpListener) {
        let health = HealthServer::new(HealthService::from_health_reporter(self.health.clone()));
        let service = Dispatch {
            echo: EchoServer::new(EchoService {
                shared: self.shared.clone(),
            }),
            log: LogServer::new(LogService {
                shared: self.shared.clone(),
            }),
            health: self.serve_health.then_some(health),
            backend: HeaderValue::from_str(&self.id)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid-id")),
            connection: HeaderValue::from_static("0"),
        };
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        if let Some(max) = self.max_concurrent_streams {
            http2.max_concurrent_streams(max);
        }
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let number = shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
                        let open = OpenConnection::new(shared.clone());
                        let mut service = service.clone();
                        service.connection = HeaderValue::from(number);
                        let conn = http2.serve_connection(
                            TokioIo::new(stream),
                            hyper_util::service::TowerToHyperService::new(service),
                        );
                        let tasks = shared.clone();
                        let task = connections.spawn(async move {
                            let _ = conn.await;
                            tasks.forget_connection(number);
                            // Also dropped, and so counted, when stop() aborts the task.
                            drop(open);
                        });
                        shared
                            .connection_tasks
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(number, task);
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        *self.server_slot() = Some(task);
    }

    fn server_slot(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        self.server.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(server) = self.server_slot().take() {
            server.abort();
        }
    }
}

/// Where a backend's listener is bound.
#[derive(Debug, Clone, Default)]
enum Binder {
    /// In this process's network namespace.
    #[default]
    Here,
    /// Inside the named network namespace.
    #[cfg(target_os = "linux")]
    Netns(Arc<str>),
}

impl Binder {
    fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        match self {
            Binder::Here => bind(addr),
            #[cfg(target_os = "linux")]
            Binder::Netns(name) => TcpListener::from_std(super::netns::bind_in(name, addr)?),
        }
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Restarting on the same port must not wait out TIME_WAIT of the connections stop() closed.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[derive(Debug)]
pub(super) struct Shared {
    id: Arc<str>,
    faults: Mutex<Faults>,
    /// `grpc-retry-pushback-ms` for injected failures.
    pushback: Mutex<Option<tonic::metadata::AsciiMetadataValue>>,
    calls: AtomicU64,
    connections: AtomicU64,
    /// Records accepted by `Log.Produce`.
    pub(super) records: AtomicU64,
    open_connections: AtomicU64,
    /// The open connections' tasks, by number, for `drop_connection`.
    connection_tasks: Mutex<std::collections::HashMap<u64, tokio::task::AbortHandle>>,
}

/// Counts one open connection for as long as it lives.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(shared)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
enum Latency {
    Fixed(Duration),
    Uniform(Duration, Duration),
}

#[derive(Debug, Clone, Copy)]
struct Faults {
    latency: Latency,
    fail_next: u64,
    fail_next_code: Code,
    fail_fraction: f64,
    fail_fraction_code: Code,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency: Latency::Fixed(Duration::ZERO),
            fail_next: 0,
            fail_next_code: Code::Unavailable,
            fail_fraction: 0.0,
            fail_fraction_code: Code::Unavailable,
        }
    }
}

impl Shared {
    fn new(id: Arc<str>) -> Self {
        Shared {
            id,
            faults: Mutex::new(Faults::default()),
            pushback: Mutex::new(None),
            calls: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            records: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            connection_tasks: Mutex::default(),
        }
    }

    fn forget_connection(&self, number: u64) {
        self.connection_tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&number);
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pushback(&self) -> std::sync::MutexGuard<'_, Option<tonic::metadata::AsciiMetadataValue>> {
        self.pushback.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the call, waits out its latency, then lets it through or fails it.
    /// Returns the call's 1-based number.
    pub(super) async fn admit(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<u64, Status> {
        let number = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let (latency, failure) = {
            let mut faults = self.faults();
            let latency = match faults.latency {
                Latency::Fixed(latency) => latency,
                Latency::Uniform(min, max) => {
                    let span = (max - min).as_micros() as u64;
                    min + Duration::from_micros(fastrand::u64(0..=span))
                }
            };
            let failure = if faults.fail_next > 0 {
                faults.fail_next -= 1;
                Some(faults.fail_next_code)
            } else if faults.fail_fraction > 0.0 && fastrand::f64() < faults.fail_fraction {
                Some(faults.fail_fraction_code)
            } else {
                None
            };
            (latency, failure)
        };
        let per_call = metadata
            .get(LATENCY_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
        let latency = latency + per_call;
        // Like any gRPC server, give up at the caller's deadline.
        let deadline = metadata
            .get(crate::deadline::GRPC_TIMEOUT.as_str())
            .and_then(|v| crate::deadline::parse(v.as_bytes()));
        if let Some(deadline) = deadline.filter(|d| *d <= latency) {
            tokio::time::sleep(deadline).await;
            return Err(Status::deadline_exceeded(format!(
                "testkit: {} gave up at the caller's deadline",
                self.id
            )));
        }
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match failure {
            Some(code) => {
                let mut status =
                    Status::new(code, format!("testkit: injected failure on {}", self.id));
                if let Some(pushback) = self.pushback().clone() {
                    status
                        .metadata_mut()
                        .insert("grpc-retry-pushback-ms", pushback);
                }
                Err(status)
            }
            None => Ok(number),
        }
    }

    fn respond(
        &self,
        number: u64,
        req: &EchoRequest,
        metadata: &tonic::metadata::MetadataMap,
    ) -> EchoResponse {
        let request_headers = metadata
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        EchoResponse {
            message: req.message.clone(),
            payload: req.payload.clone(),
            backend: self.id.to_string(),
            request_headers,
            call_number: number,
        }
    }
}

struct EchoService {
    shared: Arc<Shared>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoResponse>, Status> {
        let number = self.shared.admit(request.metadata()).await?;
        let response = self
            .shared
            .respond(number, request.get_ref(), request.metadata());
        Ok(tonic::Response::new(response))
    }

    type ServerStreamStream = ResponseStream;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::ServerStreamStream>, Status> {
        let number = self.shared.admit(request.metadata()).await?;
        let response = self
            .shared
            .respond(number, request.get_ref(), request.metadata());
        let count = request.get_ref().count.max(1);
        let interval = Duration::from_millis(u64::from(request.get_ref().interval_ms));
        let stream = futures::stream::unfold(0, move |sent| {
            let response = response.clone();
            async move {
                if sent == count {
                    return None;
                }
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                Some((Ok(response), sent + 1))
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn client_stream(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoResponse>, Status> {
        let number = self.shared.admit(request.metadata()).await?;
        let metadata = request.metadata().clone();
        let mut stream = request.into_inner();
        let mut merged = EchoRequest::default();
        while let Some(message) = stream.message().await? {
            merged.message.push_str(&message.message);
            merged.payload.extend_from_slice(&message.payload);
        }
        Ok(tonic::Response::new(
            self.shared.respond(number, &merged, &metadata),
        ))
    }
}

/// Routes health checks to tonic-health, `Log` calls to the log and everything else to `Echo`,
/// and stamps every response with the backend's id.
#[derive(Clone)]
struct Dispatch {
    echo: EchoServer<EchoService>,
    log: LogServer<LogService>,
    health: Option<HealthServer<HealthService>>,
    backend: HeaderValue,
    connection: HeaderValue,
}

impl tower::Service<Request<Incoming>> for Dispatch {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let backend = self.backend.clone();
        let connection = self.connection.clone();
        let health = self
            .health
            .as_ref()
            .filter(|_| req.uri().path().starts_with("/grpc.health.v1.Health/"));
        // Without a health service, Echo's router answers UNIMPLEMENTED for health paths.
        let response = if let Some(health) = health {
            health.clone().oneshot(req).boxed()
        } else if req.uri().path().starts_with("/towline.testkit.v1.Log/") {
            self.log.clone().oneshot(req).boxed()
        } else {
            self.echo.clone().oneshot(req).boxed()
        };
        Box::pin(async move {
            let mut response = response.await?;
            response
                .headers_mut()
                .insert(HeaderName::from_static(BACKEND_HEADER), backend);
            response
                .headers_mut()
                .insert(HeaderName::from_static(CONNECTION_HEADER), connection);
            Ok(response)
        })
    }
}
