//! Real etcd members as child processes: an [`EtcdCluster`] of one or more members on loopback,
//! each with its own data dir, that can be SIGKILLed and restarted on the same ports and data,
//! and driven with `etcdctl`. Needs `etcd` (Debian `etcd-server`) and `etcdctl` (`etcd-client`)
//! on the PATH; call [`require_etcd`] (tests, benches) or [`etcd_support`] first.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use towline::discover::etcd::Etcd;
//! use towline::testkit::{EtcdCluster, require_etcd};
//!
//! if !require_etcd("etcd_example") {
//!     return Ok(());
//! }
//! let mut etcd = EtcdCluster::start(1).await?;
//! etcd.put("/services/echo/a", "127.0.0.1:50051").await?;
//! let discovery = Etcd::builder(etcd.urls(), "/services/echo/").build();
//! etcd.kill(0);                 // SIGKILL, as a crash
//! etcd.restart(0).await?;       // same ports, same data dir
//! # drop(discovery); Ok(()) }
//! ```

use std::io::{self, BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// How long a member may take to start serving (a loaded machine, a cluster electing a leader).
const READY_WITHIN: Duration = Duration::from_secs(20);
/// Log lines kept per member, for the error when it does not start.
const LOG_LINES: usize = 2000;

/// Whether `etcd` and `etcdctl` run here: `Ok(())`, or why not.
pub fn etcd_support() -> Result<(), String> {
    let missing: Vec<String> = [("etcd", "--version"), ("etcdctl", "version")]
        .into_iter()
        .filter_map(|(bin, arg)| match Command::new(bin).arg(arg).output() {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!("`{bin} {arg}` exited with {}", out.status)),
            Err(err) => Some(format!("`{bin}` cannot run ({err})")),
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} (apt-get install etcd-server etcd-client)",
            missing.join("; ")
        ))
    }
}

/// Call first in a test that needs an [`EtcdCluster`]: `true` when `etcd` and `etcdctl` run.
///
/// Otherwise it prints a loud notice naming `test` and returns `false` so the test can return
/// early, or, when the environment variable `CI` is `true` or `1`, panics: in CI a test that
/// cannot run is a failure, not a pass.
pub fn require_etcd(test: &str) -> bool {
    let Err(why) = etcd_support() else {
        return true;
    };
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let notice = format!("{test}: ETCD TEST NOT RUN: {why}");
    assert!(!in_ci, "{notice} (CI=true, so this is a failure)");
    // Straight to stderr, not eprintln!: the test harness captures that for passing tests.
    let _ = writeln!(io::stderr().lock(), "\n!!!!!!!! {notice} !!!!!!!!\n");
    false
}

/// `n` distinct free loopback ports. The listeners are held until all are bound: a port freed
/// and asked for again at once can come back from the kernel twice (a member once got the same
/// port for its client and peer URLs, and could not start).
fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Set once the member's current process logs that it serves clients.
type Ready = Arc<(Mutex<bool>, Condvar)>;

struct Member {
    name: String,
    client: u16,
    peer: u16,
    data_dir: PathBuf,
    child: Option<Child>,
    ready: Ready,
    log: Arc<Mutex<Vec<String>>>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }
}

/// etcd members on loopback, each with its data dir under one temporary directory; killed and
/// the directory removed on drop.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("dir", &self.dir)
            .field("urls", &self.urls())
            .finish_non_exhaustive()
    }
}

impl EtcdCluster {
    /// Starts `size` members (a new cluster) and waits until each serves clients.
    pub async fn start(size: usize) -> io::Result<EtcdCluster> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let token = format!(
            "towline-etcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&token);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let size = size.max(1);
        let ports = free_ports(2 * size)?;
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
                data_dir: dir.join(format!("m{i}")),
                child: None,
                ready: Arc::default(),
                log: Arc::default(),
            })
            .collect::<Vec<_>>();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
            token,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i)?;
        }
        for i in 0..cluster.members.len() {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let m = &mut self.members[i];
        let peer_url = format!("http://127.0.0.1:{}", m.peer);
        let mut child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--advertise-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let ready: Ready = Arc::default();
        m.ready = ready.clone();
        let log = m.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Logged once the member has joined its cluster (a leader exists) and serves.
                if line.contains("serving client traffic")
                    || line.contains("ready to serve client requests")
                {
                    *ready.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
                    ready.1.notify_all();
                }
                let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                if log.len() < LOG_LINES {
                    log.push(line);
                }
            }
        });
        m.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&self, i: usize) -> io::Result<()> {
        let ready = self.members[i].ready.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let guard = ready.0.lock().unwrap_or_else(PoisonError::into_inner);
            let (guard, _) = ready
                .1
                .wait_timeout_while(guard, READY_WITHIN, |ready| !*ready)
                .unwrap_or_else(PoisonError::into_inner);
            *guard
        })
        .await
        .map_err(io::Error::other)?;
        if ok {
            return Ok(());
        }
        let log = self.members[i]
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join("\n");
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("etcd member {i} not ready within {READY_WITHIN:?}; its log:\n{log}"),
        ))
    }

    /// SIGKILLs member `i`, as a crash; its data dir stays. Nothing if it is not running.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again (killing it first if it runs): same ports, same data dir; returns
    /// once it serves clients.
    pub async fn restart(&mut self, i: usize) -> io::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_ready(i).await
    }

    /// Every member's client URL (`http://127.0.0.1:PORT`), running or not.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Member `i`'s client port.
    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client
    }

    fn running_urls(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::client_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `etcdctl` (API v3) with `args` against the running members; returns its stdout.
    /// Tried up to 5 times, 300 ms apart: right after a member is killed or restarted a request
    /// may time out while the cluster elects a leader. Use it for idempotent commands.
    pub async fn ctl(&self, args: &[&str]) -> io::Result<String> {
        let mut last = String::new();
        for attempt in 0..5 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let out = tokio::process::Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", self.running_urls()))
                .arg("--command-timeout=5s")
                .args(args)
                .stdin(Stdio::null())
                .output()
                .await?;
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(io::Error::other(format!(
            "etcdctl {args:?} failed 5 times; last: {last}"
        )))
    }

    /// Puts `key`; returns the store's revision after it.
    pub async fn put(&self, key: &str, value: &str) -> io::Result<i64> {
        let out = self.ctl(&["put", "-w", "json", key, value]).await?;
        header_revision(&out)
    }

    /// Deletes `key`.
    pub async fn del(&self, key: &str) -> io::Result<()> {
        self.ctl(&["del", key]).await.map(drop)
    }

    /// The store's current revision.
    pub async fn revision(&self) -> io::Result<i64> {
        let out = self
            .ctl(&["get", "-w", "json", "--keys-only", "--limit", "1", "/"])
            .await?;
        header_revision(&out)
    }

    /// Compacts every revision before `revision` (physically: the revisions are gone when it
    /// returns).
    pub async fn compact(&self, revision: i64) -> io::Result<()> {
        self.ctl(&["compact", &revision.to_string(), "--physical"])
            .await
            .map(drop)
    }

    /// Every key under `prefix` with its value, in key order. Keys and values are read as text,
    /// one line each (as `etcdctl get` prints them).
    pub async fn get_prefix(&self, prefix: &str) -> io::Result<Vec<(String, String)>> {
        let out = self.ctl(&["get", "--prefix", prefix]).await?;
        let mut lines = out.lines();
        let mut pairs = Vec::new();
        while let Some(key) = lines.next() {
            pairs.push((key.to_owned(), lines.next().unwrap_or_default().to_owned()));
        }
        Ok(pairs)
    }
}

fn header_revision(etcdctl_json: &str) -> io::Result<i64> {
    serde_json::from_str::<serde_json::Value>(etcdctl_json)
        .ok()
        .and_then(|json| json["header"]["revision"].as_i64())
        .ok_or_else(|| io::Error::other(format!("no revision in etcdctl's {etcdctl_json:?}")))
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
