//! Foreign gRPC servers as child processes: a [`Peer`] is grpc-core (Python `grpcio`) or grpc-js
//! (Node `@grpc/grpc-js`) serving the testkit's `Echo`, `Log` and `grpc.health.v1` services, with
//! the same kind of run-time controls as the in-process [`Backend`](super::Backend).
//!
//! The in-process backend is tonic and hyper, the same HTTP/2 stack as the client under test, so
//! it cannot show what other implementations do: their keepalive enforcement, GOAWAY on graceful
//! stop and on `max_connection_age`, how they send `grpc-retry-pushback-ms`. A peer can.
//!
//! The servers live in `tests/peers/` of the towline repository (or in the folder named by
//! [`PEERS_DIR_ENV`]) and need `bash tests/peers/install.sh` first, which installs a pinned
//! Python venv and `node_modules` there. Tests call [`require_peer`] first: without the install
//! it says so loudly and skips, and under `CI=true` it fails the test instead.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use std::time::Duration;
//! use towline::testkit::peer::{Peer, PeerKind, require_peer};
//!
//! for kind in PeerKind::ALL {
//!     if !require_peer(kind, "peer_example") {
//!         continue;
//!     }
//!     let peer = Peer::builder(kind).id("primary").start().await?;
//!     let channel = tonic::transport::Endpoint::from(peer.uri()).connect_lazy();
//!     peer.fail_next(1, tonic::Code::Unavailable, Some("100")).await?; // with pushback
//!     peer.set_latency(Duration::from_millis(20)).await?;
//!     peer.set_health("*", false).await?;             // NOT_SERVING for "" and Echo
//!     peer.graceful_stop(Duration::from_secs(1)).await?; // GOAWAY sent, listener closed
//!     peer.wait_stopped().await?;
//!     peer.restart().await?;                           // a new process, same port
//!     # drop(channel);
//! }
//! # Ok(()) }
//! ```
//!
//! Each peer answers commands on its stdin (see `tests/peers/README.md`); this module is the
//! typed side of that protocol. A peer exits when its [`Peer`] is dropped, and on its own when
//! this process dies (its stdin closes), so no server outlives a test.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;

/// The environment variable naming the folder with the peer servers, instead of the
/// repository's `tests/peers`.
pub const PEERS_DIR_ENV: &str = "TOWLINE_PEERS_DIR";

/// The request header, in `EchoResponse::request_headers`, in which a peer reports how many
/// milliseconds were left of the call's deadline when its handler started. Absent when the call
/// had no deadline.
pub const DEADLINE_REMAINING_HEADER: &str = "x-deadline-remaining-ms";

/// Same variable as the testkit's `CI_ENV`: `true` or `1` turns a missing install into a failure.
const CI_ENV: &str = "CI";

/// How long a peer may take to print `LISTENING` after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one control command may take to be answered.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How many of a peer's last stderr lines are kept for error messages.
const STDERR_TAIL: usize = 40;

/// Which gRPC implementation a [`Peer`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKind {
    /// grpc-core, the C core under Python, C++, Ruby and PHP: Python `grpcio` (asyncio server).
    GrpcCore,
    /// grpc-js, Node's pure-JavaScript gRPC: `@grpc/grpc-js`.
    GrpcJs,
}

impl PeerKind {
    /// Every kind, for tests that run against each.
    pub const ALL: [PeerKind; 2] = [PeerKind::GrpcCore, PeerKind::GrpcJs];

    /// The server script, in the peers folder.
    fn script(self) -> &'static str {
        match self {
            PeerKind::GrpcCore => "grpc_core_server.py",
            PeerKind::GrpcJs => "grpc_js_server.js",
        }
    }

    /// The interpreter that runs [`script`](Self::script).
    fn interpreter(self, dir: &Path) -> PathBuf {
        match self {
            PeerKind::GrpcCore if cfg!(windows) => dir.join(".venv/Scripts/python.exe"),
            PeerKind::GrpcCore => dir.join(".venv/bin/python"),
            PeerKind::GrpcJs => PathBuf::from("node"),
        }
    }

    fn index(self) -> usize {
        match self {
            PeerKind::GrpcCore => 0,
            PeerKind::GrpcJs => 1,
        }
    }
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerKind::GrpcCore => "grpc-core",
            PeerKind::GrpcJs => "grpc-js",
        })
    }
}

/// The folder with the peer servers and their installs: [`PEERS_DIR_ENV`] if set, else
/// `tests/peers` in towline's source tree.
pub fn peers_dir() -> PathBuf {
    std::env::var_os(PEERS_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers"))
}

/// The folder with the testkit's `.proto` files, which the peers load at run time.
fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto")
}

/// Whether peers of `kind` can run here: `Ok(())`, or why not. Probed once per kind.
pub fn peer_support(kind: PeerKind) -> Result<(), String> {
    static SUPPORT: [OnceLock<Result<(), String>>; 2] = [OnceLock::new(), OnceLock::new()];
    SUPPORT[kind.index()]
        .get_or_init(|| probe_support(kind))
        .clone()
}

fn probe_support(kind: PeerKind) -> Result<(), String> {
    let dir = peers_dir();
    let script = dir.join(kind.script());
    if !script.is_file() {
        return Err(format!("{} not found", script.display()));
    }
    // Import what the server imports, with the interpreter it runs on.
    let probe = match kind {
        PeerKind::GrpcCore => "import grpc, grpc_health.v1.health, grpc_tools.protoc",
        PeerKind::GrpcJs => {
            "require('@grpc/grpc-js'); require('@grpc/proto-loader'); require('grpc-health-check')"
        }
    };
    let flag = match kind {
        PeerKind::GrpcCore => "-c",
        PeerKind::GrpcJs => "-e",
    };
    let interpreter = kind.interpreter(&dir);
    // node -e resolves modules from the working directory.
    match std::process::Command::new(&interpreter)
        .args([flag, probe])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{kind} packages are missing in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(err) => Err(format!("cannot run {}: {err}", interpreter.display())),
    }
}

/// Call first in a test that needs a [`Peer`] of `kind`: `true` when it can run.
///
/// Otherwise it prints a loud notice naming `test` and returns `false` so the test can return
/// early, or, when the environment variable `CI` is `true` or `1`, panics: in CI a foreign
/// server test that cannot run is a failure, not a pass.
pub fn require_peer(kind: PeerKind, test: &str) -> bool {
    let Err(why) = peer_support(kind) else {
        return true;
    };
    let in_ci = std::env::var(CI_ENV).is_ok_and(|v| v == "true" || v == "1");
    let notice =
        format!("{test}: FOREIGN SERVER TEST NOT RUN: {kind}: {why} (run tests/peers/install.sh)");
    assert!(!in_ci, "{notice} ({CI_ENV}=true, so this is a failure)");
    // Straight to stderr, not eprintln!: the test harness captures that for passing tests, and
    // this notice must be seen.
    let _ = io::Write::write_all(
        &mut io::stderr().lock(),
        format!("\n!!!!!!!! {notice} !!!!!!!!\n\n").as_bytes(),
    );
    false
}

/// Configures a [`Peer`] before it starts.
#[derive(Debug, Clone)]
pub struct PeerBuilder {
    kind: PeerKind,
    id: Option<String>,
    port: u16,
    health: bool,
    max_concurrent_streams: Option<u32>,
    max_connection_age: Option<Duration>,
    max_connection_age_grace: Option<Duration>,
    permit_keepalive: Option<Duration>,
}

impl PeerBuilder {
    /// The id the peer reports in `EchoResponse::backend`. Default: its address, `127.0.0.1:PORT`.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The loopback port to listen on. Default: 0, a free port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Register no `grpc.health.v1` service: health calls get `UNIMPLEMENTED`.
    pub fn without_health_service(mut self) -> Self {
        self.health = false;
        self
    }

    /// The HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` the server announces
    /// (`grpc.max_concurrent_streams`).
    pub fn max_concurrent_streams(mut self, max: u32) -> Self {
        self.max_concurrent_streams = Some(max);
        self
    }

    /// Send GOAWAY on each connection this long after it opened (`grpc.max_connection_age_ms`).
    pub fn max_connection_age(mut self, age: Duration) -> Self {
        self.max_connection_age = Some(age);
        self
    }

    /// After a max-age GOAWAY, how long calls in flight may still run
    /// (`grpc.max_connection_age_grace_ms`).
    pub fn max_connection_age_grace(mut self, grace: Duration) -> Self {
        self.max_connection_age_grace = Some(grace);
        self
    }

    /// Accept client keepalive pings as often as every `interval`, also without calls in flight.
    /// Without this each implementation keeps its default: grpc-core answers pings more frequent
    /// than every 5 minutes without data with GOAWAY `too_many_pings`; grpc-js enforces nothing.
    pub fn permit_keepalive(mut self, interval: Duration) -> Self {
        self.permit_keepalive = Some(interval);
        self
    }

    /// Spawns the server and waits (up to 10 s) until it listens.
    pub async fn start(self) -> io::Result<Peer> {
        let process = Process::spawn(&self, self.port, self.id.as_deref()).await?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, process.port));
        let id = self.id.clone().unwrap_or_else(|| addr.to_string());
        Ok(Peer {
            kind: self.kind,
            id,
            addr,
            config: self,
            process: Mutex::new(Arc::new(process)),
        })
    }

    fn args(&self, port: u16, id: Option<&str>) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            peers_dir().join(self.kind.script()).into(),
            "--port".into(),
            port.to_string().into(),
            "--proto-dir".into(),
            proto_dir().into(),
        ];
        if let Some(id) = id {
            args.extend(["--id".into(), id.into()]);
        }
        if !self.health {
            args.push("--no-health".into());
        }
        let mut number = |flag: &str, value: Option<u128>| {
            if let Some(value) = value {
                args.extend([flag.into(), value.to_string().into()]);
            }
        };
        number(
            "--max-concurrent-streams",
            self.max_concurrent_streams.map(u128::from),
        );
        number(
            "--max-connection-age-ms",
            self.max_connection_age.map(|d| d.as_millis()),
        );
        number(
            "--max-connection-age-grace-ms",
            self.max_connection_age_grace.map(|d| d.as_millis()),
        );
        number(
            "--permit-keepalive-ms",
            self.permit_keepalive.map(|d| d.as_millis()),
        );
        args
    }
}

/// A foreign gRPC server in a child process, on a loopback port, with run-time controls.
///
/// It serves `towline.testkit.v1.Echo`, `towline.testkit.v1.Log` and (unless
/// [`without_health_service`](PeerBuilder::without_health_service)) `grpc.health.v1.Health`
/// for `""` and `towline.testkit.v1.Echo`, `SERVING` at start. `EchoResponse::request_headers`
/// also carries [`DEADLINE_REMAINING_HEADER`], and the request header
/// [`LATENCY_HEADER`](super::LATENCY_HEADER) delays a single call, as on the testkit backend.
///
/// Controls act on `Echo` and `Log` calls only, never on health checks. Every control is a
/// command to the process, answered within 5 s or failed with an error naming the peer.
/// Dropping the `Peer` kills the process.
pub struct Peer {
    kind: PeerKind,
    id: String,
    addr: SocketAddr,
    config: PeerBuilder,
    /// The current process; [`restart`](Peer::restart) replaces it.
    process: Mutex<Arc<Process>>,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("addr", &self.addr)
            .field("pid", &self.current().pid)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// Configures a peer of `kind` before starting it.
    pub fn builder(kind: PeerKind) -> PeerBuilder {
        PeerBuilder {
            kind,
            id: None,
            port: 0,
            health: true,
            max_concurrent_streams: None,
            max_connection_age: None,
            max_connection_age_grace: None,
            permit_keepalive: None,
        }
    }

    /// Starts a peer of `kind` with the default settings on a free loopback port.
    pub async fn start(kind: PeerKind) -> io::Result<Peer> {
        Peer::builder(kind).start().await
    }

    /// Which implementation this is.
    pub fn kind(&self) -> PeerKind {
        self.kind
    }

    /// This peer's id, as reported in `EchoResponse::backend`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The address it listens on, kept across [`restart`](Self::restart).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, ready for `tonic::transport::Endpoint::from`.
    pub fn uri(&self) -> http::Uri {
        http::Uri::try_from(format!("http://{}", self.addr))
            .expect("a socket address makes a valid URI")
    }

    /// Whether the current process is still running.
    pub fn is_running(&self) -> bool {
        self.current().exited.borrow().is_none()
    }

    /// Sets the `grpc.health.v1` status of `service` (`"*"`: both `""` and
    /// `towline.testkit.v1.Echo`) to `SERVING` or `NOT_SERVING`; `Watch` streams see it at once.
    pub async fn set_health(&self, service: &str, serving: bool) -> io::Result<()> {
        let service = if service.is_empty() { "\"\"" } else { service };
        if service.contains(char::is_whitespace) {
            return Err(self.invalid(format!("service name {service:?} has whitespace")));
        }
        let status = if serving { "SERVING" } else { "NOT_SERVING" };
        self.command(&format!("health {service} {status}"))
            .await
            .map(drop)
    }

    /// Adds this much latency to every `Echo` and `Log` call (zero clears it).
    pub async fn set_latency(&self, latency: Duration) -> io::Result<()> {
        self.command(&format!("latency {}", latency.as_millis()))
            .await
            .map(drop)
    }

    /// Fails the next `n` `Echo`/`Log` calls with `code`. With `pushback`, each failure carries
    /// the trailer `grpc-retry-pushback-ms` with that value as given (`"100"`, `"-1"`); `"a,b"`
    /// sends the header twice, `a` then `b`.
    ///
    /// grpc-js sends any value as given, and several values. grpc-core parses this header as an
    /// integer when the application sets it: of several values only the last is sent, and a
    /// value that is not an `i64` (`"abc"`, `"1.5"`) goes out as `-9223372036854775808`.
    pub async fn fail_next(
        &self,
        n: u64,
        code: tonic::Code,
        pushback: Option<&str>,
    ) -> io::Result<()> {
        let mut line = format!("fail {n} {}", i32::from(code));
        if let Some(pushback) = pushback {
            if pushback.is_empty() || pushback.contains(char::is_whitespace) {
                return Err(
                    self.invalid(format!("pushback {pushback:?} is empty or has whitespace"))
                );
            }
            line.push(' ');
            line.push_str(pushback);
        }
        self.command(&line).await.map(drop)
    }

    /// Removes the latency and the pending failures.
    pub async fn clear_faults(&self) -> io::Result<()> {
        self.command("clear").await.map(drop)
    }

    /// How many `Echo` and `Log` calls reached the current process's handlers, failed ones
    /// included (health checks excluded). Starts again from 0 after a restart.
    pub async fn calls(&self) -> io::Result<u64> {
        let answer = self.command("calls").await?;
        answer
            .parse()
            .map_err(|_| self.error(format!("`calls` answered {answer:?}, not a number")))
    }

    /// Begins a graceful shutdown (grpc-core `server.stop(grace)`, grpc-js `tryShutdown`, then
    /// `forceShutdown` after `grace`) and returns once it has begun: the listener refuses new
    /// connections and open ones have been sent GOAWAY. Calls in flight run on for up to
    /// `grace`; [`wait_stopped`](Self::wait_stopped) waits for the end.
    pub async fn graceful_stop(&self, grace: Duration) -> io::Result<()> {
        self.command(&format!("stop {}", grace.as_millis()))
            .await
            .map(drop)
    }

    /// Waits until the current process has exited: after [`graceful_stop`](Self::graceful_stop)
    /// once it finished, or after [`kill`](Self::kill). Unbounded: wrap it in a timeout.
    pub async fn wait_stopped(&self) -> io::Result<()> {
        self.current().wait_exited().await.map(drop)
    }

    /// Kills the process with SIGKILL, as a crash would: connections reset, the port closes.
    /// Returns at once; [`wait_stopped`](Self::wait_stopped) waits until it is gone.
    pub fn kill(&self) {
        self.current().kill();
    }

    /// Starts a new process on the same port, with the same id and settings, after
    /// [`kill`](Self::kill) or [`graceful_stop`](Self::graceful_stop). A process still running is
    /// killed first. The new process starts afresh: no faults, call count 0, `SERVING`.
    pub async fn restart(&self) -> io::Result<()> {
        let old = self.current();
        old.kill();
        match timeout(START_TIMEOUT, old.wait_exited()).await {
            Ok(result) => drop(result?),
            Err(_) => return Err(self.error("the old process did not exit within 10 s".into())),
        }
        let process = Process::spawn(&self.config, self.addr.port(), Some(&self.id)).await?;
        *self.process.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(process);
        Ok(())
    }

    fn current(&self) -> Arc<Process> {
        self.process
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends one command and returns the `VALUE` of its `ok VALUE` answer (empty for `ok`).
    async fn command(&self, line: &str) -> io::Result<String> {
        let process = self.current();
        let mut control = timeout(COMMAND_TIMEOUT, process.control.lock())
            .await
            .map_err(|_| self.error(format!("`{line}`: another command is stuck")))?;
        if let Some(why) = &control.broken {
            return Err(self.error(format!("`{line}`: control channel unusable: {why}")));
        }
        let answer = match timeout(COMMAND_TIMEOUT, control.exchange(line)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(err)) => {
                control.broken = Some(err.to_string());
                return Err(self.error(format!("`{line}`: {err}{}", process.stderr_tail_text())));
            }
            Err(_) => {
                // A late answer would be taken for the next command's: stop using the channel.
                control.broken = Some(format!("`{line}` was not answered"));
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} peer {}: `{line}` not answered within {COMMAND_TIMEOUT:?}{}",
                        self.kind,
                        self.id,
                        process.stderr_tail_text()
                    ),
                ));
            }
        };
        match answer.split_once(' ').unwrap_or((answer.as_str(), "")) {
            ("ok", value) => Ok(value.to_owned()),
            ("err", why) => Err(self.error(format!("`{line}` refused: {why}"))),
            _ => Err(self.error(format!("`{line}`: unexpected answer {answer:?}"))),
        }
    }

    fn error(&self, message: String) -> io::Error {
        io::Error::other(format!("{} peer {}: {message}", self.kind, self.id))
    }

    fn invalid(&self, message: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} peer {}: {message}", self.kind, self.id),
        )
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.current().kill();
    }
}

/// One server process: its control channel and the tasks that watch it.
struct Process {
    pid: Option<u32>,
    port: u16,
    control: tokio::sync::Mutex<Control>,
    /// Asks the supervisor task to kill the process (also when dropped).
    kill: mpsc::UnboundedSender<()>,
    /// `Some` once the process has exited.
    exited: watch::Receiver<Option<ExitStatus>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

/// The process's stdin and the answers read from its stdout.
struct Control {
    stdin: ChildStdin,
    answers: mpsc::UnboundedReceiver<String>,
    /// Why the channel cannot be used any more (an answer went missing, the process died).
    broken: Option<String>,
}

impl Control {
    async fn exchange(&mut self, line: &str) -> io::Result<String> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        self.answers
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the process exited"))
    }
}

impl Process {
    /// Spawns the server of `config.kind` on `port` and waits until it prints `LISTENING`.
    async fn spawn(config: &PeerBuilder, port: u16, id: Option<&str>) -> io::Result<Process> {
        let kind = config.kind;
        let dir = peers_dir();
        let name = id.map_or_else(|| format!("{kind}:{port}"), |id| format!("{kind} {id}"));
        let mut child = Command::new(kind.interpreter(&dir))
            .args(config.args(port, id))
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Also killed if the runtime drops the supervisor task without our asking.
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!(
                        "{name}: cannot spawn {} (run tests/peers/install.sh): {err}",
                        kind.interpreter(&dir).display()
                    ),
                )
            })?;
        let pid = child.id();
        let missing = || io::Error::other(format!("{name}: no stdio pipe"));
        let stdin = child.stdin.take().ok_or_else(missing)?;
        let stdout = child.stdout.take().ok_or_else(missing)?;
        let stderr = child.stderr.take().ok_or_else(missing)?;

        // stderr: forwarded to ours, prefixed, and the last lines kept for error messages.
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let tail = stderr_tail.clone();
        let prefix = name.clone();
        let stderr_task = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{prefix}] {line}");
                let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });

        // stdout: LISTENING once, then one answer per command; STOPPED is left for the exit.
        let (listening_tx, listening_rx) = oneshot::channel();
        let (answers_tx, answers) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut listening_tx = Some(listening_tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(port) = line.strip_prefix("LISTENING ") {
                    if let Some(tx) = listening_tx.take() {
                        let _ = tx.send(port.trim().parse::<u16>());
                    }
                } else if line != "STOPPED" {
                    let _ = answers_tx.send(line);
                }
            }
        });

        // The supervisor owns the child: it reaps it, and kills it when asked or when the
        // Process is dropped (the channel closes).
        let (kill, mut kill_rx) = mpsc::unbounded_channel::<()>();
        let (exited_tx, exited) = watch::channel(None);
        tokio::spawn(async move {
            supervise(&mut child, &mut kill_rx, &exited_tx).await;
        });

        let process = Process {
            pid,
            port,
            control: tokio::sync::Mutex::new(Control {
                stdin,
                answers,
                broken: None,
            }),
            kill,
            exited,
            stderr_tail,
        };
        let failure = match timeout(START_TIMEOUT, listening_rx).await {
            Ok(Ok(Ok(listening))) if port == 0 || listening == port => {
                return Ok(Process {
                    port: listening,
                    ..process
                });
            }
            Ok(Ok(Ok(listening))) => format!("listens on {listening}, not on {port}"),
            Ok(Ok(Err(err))) => format!("printed a bad LISTENING line: {err}"),
            Ok(Err(_)) => {
                // It exited (stdout closed) first: wait for its stderr, to say why.
                let status = timeout(Duration::from_secs(2), process.wait_exited()).await;
                let _ = timeout(Duration::from_secs(1), stderr_task).await;
                match status {
                    Ok(Ok(Some(status))) => format!("exited before listening ({status})"),
                    _ => "closed its stdout before listening".to_owned(),
                }
            }
            Err(_) => format!("not listening after {START_TIMEOUT:?}"),
        };
        process.kill();
        Err(io::Error::other(format!(
            "{name}: {failure}{}",
            process.stderr_tail_text()
        )))
    }

    fn kill(&self) {
        // The supervisor is gone only once the process was reaped.
        let _ = self.kill.send(());
    }

    /// Waits until the process has exited; its exit status if the supervisor saw it.
    async fn wait_exited(&self) -> io::Result<Option<ExitStatus>> {
        let mut exited = self.exited.clone();
        match exited.wait_for(Option::is_some).await {
            Ok(status) => Ok(*status),
            // The supervisor task was dropped with its runtime, which killed the child.
            Err(_) => Ok(None),
        }
    }

    /// `"\n<stderr lines>"` for an error message, or nothing when stderr was quiet.
    fn stderr_tail_text(&self) -> String {
        let tail = self
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if tail.is_empty() {
            return String::new();
        }
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        format!("; its stderr ended with:\n{}", lines.join("\n"))
    }
}

/// Reaps `child`, killing it first when asked (or when every sender is gone), and publishes its
/// exit status.
async fn supervise(
    child: &mut Child,
    kill_rx: &mut mpsc::UnboundedReceiver<()>,
    exited: &watch::Sender<Option<ExitStatus>>,
) {
    let mut killed = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = kill_rx.recv(), if !killed => {
                killed = true;
                let _ = child.start_kill();
            }
        }
    };
    // An error from wait() (no such child) means it is gone all the same.
    let _ = exited.send(Some(status.unwrap_or_else(|_| ExitStatus::default())));
}
