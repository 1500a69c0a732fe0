//! Real network faults: a [`NetNs`] is a Linux network namespace joined to this process's
//! namespace by a veth pair on its own private subnet, so a [`Backend`](super::Backend) bound
//! inside it has an address of its own whose packets can be dropped, cut or delayed by the kernel.
//!
//! Needs root and `ip` from iproute2. Tests call [`require_netns`] first: without the privileges
//! it says so loudly and skips, and under `CI=true` it fails the test instead, so a CI run can
//! never pass by skipping.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use towline::testkit::{Backend, NetNs, require_netns};
//!
//! if !require_netns("blackhole_example") {
//!     return Ok(());
//! }
//! let ns = NetNs::create()?;                     // 198.18.N.2 inside, 198.18.N.1 here
//! let backend = Backend::builder().netns(&ns).start().await?;
//! ns.blackhole()?;                               // its replies now vanish
//! ns.heal()?;
//! # drop(backend); Ok(()) }
//! ```
//!
//! The subnets come from 198.18.0.0/15, the range RFC 2544 sets aside for benchmarking, so they
//! never clash with a real network. Faults act on the namespace's side where they can, because
//! the host side has a default route: a host-side link taken down would send the backend's
//! traffic to the default gateway instead of dropping it.
// The crate denies unsafe code; this module alone needs it, for `geteuid(2)` and `setns(2)`,
// which have no safe wrapper in std or tokio.
#![allow(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

/// The environment variable that, set to `true` or `1`, turns a missing privilege into a failure.
pub const CI_ENV: &str = "CI";

/// Whether this process can create network namespaces: `Ok(())`, or why not. Probed once.
pub fn netns_support() -> Result<(), String> {
    static SUPPORT: OnceLock<Result<(), String>> = OnceLock::new();
    SUPPORT.get_or_init(probe_support).clone()
}

fn probe_support() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("network namespaces need root (run as root, or in CI's root container)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(format!(
                "`ip -V` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Err(err) => return Err(format!("`ip` from iproute2 is not installed ({err})")),
    }
    // Root in a container without CAP_SYS_ADMIN still cannot create namespaces: try one.
    let probe = format!("towline-probe-{}", std::process::id());
    ip(&["netns", "add", &probe]).map_err(|err| format!("cannot create a namespace: {err}"))?;
    let _ = ip(&["netns", "del", &probe]);
    Ok(())
}

/// Call first in a test that needs [`NetNs`]: `true` when namespaces work.
///
/// Otherwise it prints a loud notice naming `test` and returns `false` so the test can return
/// early, or, when the environment variable [`CI_ENV`] is `true` or `1`, panics: in CI a fault
/// test that cannot run is a failure, not a pass.
pub fn require_netns(test: &str) -> bool {
    let Err(why) = netns_support() else {
        return true;
    };
    let in_ci = std::env::var(CI_ENV).is_ok_and(|v| v == "true" || v == "1");
    let notice = format!("{test}: NETWORK FAULT TEST NOT RUN: {why}");
    assert!(!in_ci, "{notice} ({CI_ENV}=true, so this is a failure)");
    // Straight to stderr, not eprintln!: the test harness captures that for passing tests, and
    // this notice must be seen.
    let _ = writeln!(io::stderr().lock(), "\n!!!!!!!! {notice} !!!!!!!!\n");
    false
}

/// A network namespace with one veth link to this process's namespace, deleted on drop.
///
/// Inside: [`addr`](Self::addr) (`198.18.N.2`); here: [`host_addr`](Self::host_addr)
/// (`198.18.N.1`). Faults switch on and off at run time and [`heal`](Self::heal) clears them all.
pub struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    subnet: u16,
    faults: Mutex<[bool; 3]>,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Blackhole = 0,
    LinkDown = 1,
    Partition = 2,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl NetNs {
    /// Creates the namespace, the veth pair and the addresses, with loopback and both link ends up.
    ///
    /// Runs `ip`, so it blocks for a few milliseconds. Namespaces left behind by an earlier
    /// process that died before dropping its `NetNs` are removed first.
    pub fn create() -> io::Result<NetNs> {
        remove_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // 512 /24 subnets in 198.18.0.0/15; the pid spreads concurrent processes apart.
        let subnet = ((pid.wrapping_mul(16).wrapping_add(n)) % 512) as u16;
        let ns = NetNs {
            name: format!("towline-{pid}-{n}"),
            host_if: format!("tl{pid}x{n}h"),
            ns_if: format!("tl{pid}x{n}n"),
            subnet,
            faults: Mutex::new([false; 3]),
        };
        if ns.host_if.len() > 15 {
            return Err(io::Error::other(format!(
                "interface name {} is longer than 15 bytes",
                ns.host_if
            )));
        }
        // From here on, Drop cleans up whatever part was created.
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.host_addr()),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ns.ip_in(&[
            "addr",
            "add",
            &format!("{}/24", ns.addr()),
            "dev",
            &ns.ns_if,
        ])?;
        ns.ip_in(&["link", "set", &ns.ns_if, "up"])?;
        ns.ip_in(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address inside the namespace, where its backends listen.
    pub fn addr(&self) -> Ipv4Addr {
        self.subnet_addr(2)
    }

    /// This side's address on the link.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.subnet_addr(1)
    }

    /// Binds a listener inside the namespace. The socket stays in the namespace whichever thread
    /// or runtime later uses it.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        bind_in(&self.name, addr)
    }

    /// Silently drops every packet the namespace sends back: `ip route add blackhole` for this
    /// side's address, inside the namespace. Requests still arrive; no reply, SYN-ACK or RST
    /// leaves, so the caller sees only silence, as behind a dead router.
    pub fn blackhole(&self) -> io::Result<()> {
        self.set(Fault::Blackhole, true)
    }

    /// Takes the namespace's end of the link down, as a pulled cable: packets to it are lost.
    pub fn link_down(&self) -> io::Result<()> {
        self.set(Fault::LinkDown, true)
    }

    /// Cuts the link both ways with a `tc tbf` qdisc on each end whose bucket is smaller than any
    /// packet, while both ends stay up: a network partition.
    pub fn partition(&self) -> io::Result<()> {
        self.set(Fault::Partition, true)
    }

    /// Clears every fault.
    pub fn heal(&self) -> io::Result<()> {
        for fault in [Fault::Blackhole, Fault::LinkDown, Fault::Partition] {
            self.set(fault, false)?;
        }
        Ok(())
    }

    fn set(&self, fault: Fault, on: bool) -> io::Result<()> {
        let mut active = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        if active[fault as usize] == on {
            return Ok(());
        }
        let host = format!("{}/32", self.host_addr());
        let (add_or_del, down_or_up) = if on { ("add", "down") } else { ("del", "up") };
        match fault {
            Fault::Blackhole => self.ip_in(&["route", add_or_del, "blackhole", &host])?,
            Fault::LinkDown => self.ip_in(&["link", "set", &self.ns_if, down_or_up])?,
            Fault::Partition => {
                let tbf: &[&str] = if on {
                    &[
                        "root", "tbf", "rate", "8bit", "burst", "1", "latency", "1ms",
                    ]
                } else {
                    &["root"]
                };
                let mut host_side = vec!["qdisc", add_or_del, "dev", &self.host_if];
                host_side.extend_from_slice(tbf);
                run("tc", &host_side)?;
                let mut ns_side = vec!["-n", &self.name, "qdisc", add_or_del, "dev", &self.ns_if];
                ns_side.extend_from_slice(tbf);
                run("tc", &ns_side)?;
            }
        }
        active[fault as usize] = on;
        Ok(())
    }

    fn ip_in(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn subnet_addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(
            198,
            18 + (self.subnet / 256) as u8,
            (self.subnet % 256) as u8,
            host,
        )
    }
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetNs")
            .field("name", &self.name)
            .field("addr", &self.addr())
            .field("host_addr", &self.host_addr())
            .finish()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Sockets bound inside keep a namespace alive after `ip netns del`, and its veth with it:
        // delete the link first so the subnet's route goes now, not when the last socket closes.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Binds a non-blocking listener inside the namespace `name`.
pub(super) fn bind_in(name: &str, addr: SocketAddr) -> io::Result<TcpListener> {
    let path = format!("/run/netns/{name}");
    // setns changes only the calling thread's namespace, so bind on a thread of its own.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = File::open(&path)?;
                // SAFETY: a valid namespace fd and a flag; affects this thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                // std sets SO_REUSEADDR, so a restart need not wait out TIME_WAIT.
                let listener = TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("bind thread panicked")))
    })
}

/// Deletes namespaces named `towline-PID-N` whose process is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some((pid, n)) = name
            .strip_prefix("towline-")
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = ip(&["link", "del", &format!("tl{pid}x{n}h")]);
        let _ = ip(&["netns", "del", name]);
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
