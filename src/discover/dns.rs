//! DNS discovery: A/AAAA or SRV records, re-resolved on an interval (feature `dns`, on by default).
//!
//! [`Dns`] is a [`Discover`](super::Discover) source built on
//! [hickory-resolver](https://docs.rs/hickory-resolver). Each resolution is diffed against the last
//! good set and only what changed is emitted: [`Change::Insert`] for a new address or one whose
//! weight changed (a re-insert), [`Change::Remove`] for an address that is gone. The first
//! resolution emits the full set. Inserts are emitted before removes, so a balancer following the
//! stream never sees an empty set in the middle of a replacement.
//!
//! - [`Dns::a_aaaa`]`(host, port)`: A and AAAA records, each address becomes `scheme://ip:port`
//!   (IPv6 bracketed: `http://[2001:db8::1]:50051`), weight 1. An IP literal as `host` is used as
//!   is, with no query.
//! - [`Dns::srv`]`(name)`: SRV records; each target is resolved to its A/AAAA addresses, the port
//!   comes from the SRV record and the SRV weight becomes [`Endpoint::weighted`] (0 is raised to 1).
//!   When several records lead to the same `ip:port` their weights are added. SRV priority is not
//!   interpreted: every target is used. A target of `.` ("service not available here",
//!   RFC 2782), or one with no A/AAAA records, contributes no address; a target whose lookup
//!   fails makes the whole resolution fail (see below).
//!
//! # Errors keep the last good set
//!
//! When a resolution fails (timeout, SERVFAIL, refused, no name server reachable, …) nothing is
//! removed: the stream yields the error as an `Err` item (the balancer logs it and keeps its
//! endpoints, as gRPC keeps the last good resolution), then keeps re-resolving. Failed resolutions
//! are retried sooner than the interval: after 1 s, then 2 s, 4 s, … up to the interval; a success
//! resets that backoff.
//!
//! An A/AAAA or SRV resolution is all or nothing: if any of its queries fails (say AAAA times out
//! while A answers) the whole resolution is an error and the last good set stays, rather than
//! removing the addresses of the query that failed.
//!
//! # Empty answers: kept by default, a choice
//!
//! An authoritative empty answer (NXDOMAIN, or the name exists with no records of the type) is
//! *by default treated like an error*: the last good set is kept and a [`ResolveError`] with
//! [`ResolveError::is_no_records`] is yielded. An empty answer is arguably a real change — the
//! operator removed the service — but in practice it far more often comes from a mistake or a
//! moment in a deploy (a zone being republished, a record renamed before its replacement exists,
//! split-horizon DNS answering from the wrong view), and removing every endpoint turns that DNS
//! blip into a total outage, while keeping stale endpoints costs at most failed connections, which
//! health checks and outlier ejection already handle. Where an empty answer must empty the set, opt
//! in with [`DnsBuilder::on_empty_answer`]`(`[`EmptyAnswer::RemoveAll`]`)`.
//!
//! # Interval and caching
//!
//! The interval runs from the end of one resolution to the start of the next. Default
//! [`DEFAULT_INTERVAL`] (30 s); a non-zero interval below [`MIN_INTERVAL`] (1 s) is raised to it,
//! so a misconfiguration cannot turn every client into a DNS load generator. The resolver caches
//! answers for their TTL, so a re-resolution within a record's TTL sees the cached answer.
//! Each resolution is bounded by [`DnsBuilder::timeout`] (default [`DEFAULT_TIMEOUT`], 10 s).
//! A name without a trailing dot is subject to the resolver's search list (as in
//! `/etc/resolv.conf`); write `svc.example.com.` to query exactly that name.
//!
//! # Work happens only while polled
//!
//! [`Dns`] is a plain [`Stream`] (a two-state machine: waiting on a `tokio::time` timer, or
//! resolving); it spawns nothing. Dropping it cancels any query in flight and stops all work.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::time::Duration;
//! use futures::StreamExt;
//! use towline::discover::dns::Dns;
//!
//! let mut discovery = Dns::srv("_grpc._tcp.echo.example.com")
//!     .interval(Duration::from_secs(10))
//!     .build()?;
//! while let Some(change) = discovery.next().await {
//!     println!("{change:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! [`Change::Insert`]: super::Change::Insert
//! [`Change::Remove`]: super::Change::Remove

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::Stream;
use futures::future::{BoxFuture, Future};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};
use http::Uri;
use http::uri::Scheme;
use tokio::time::Sleep;

use super::{Endpoint, Update, full_set};
use crate::BoxError;

/// The hickory-resolver crate this module is built on, to build a resolver for
/// [`DnsBuilder::resolver`] without depending on a matching version yourself.
pub use hickory_resolver;

use crate::ConfigError;

/// The default time between resolutions.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// The shortest interval honoured; a shorter non-zero interval is raised to this.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The default bound on one resolution (every query it makes).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry delay after a failed resolution; it doubles up to the interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The resolved set: address → weight. Ordered so changes come out in a stable order.
type Resolved = BTreeMap<SocketAddr, u32>;

type Resolve = Arc<dyn Fn() -> BoxFuture<'static, Result<Resolved, ResolveError>> + Send + Sync>;

/// What an authoritative empty answer (NXDOMAIN or no records) does. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EmptyAnswer {
    /// Keep the last good set and yield a [`ResolveError`] (the default).
    #[default]
    KeepLast,
    /// Treat it as a real change: remove every endpoint.
    RemoveAll,
}

/// A DNS discovery source; see the [module docs](self).
pub struct Dns {
    resolve: Resolve,
    /// What is resolved, for errors: `A/AAAA host` or `SRV name`.
    query: String,
    scheme: Scheme,
    interval: Duration,
    empty: EmptyAnswer,
    /// The last good set, what the consumer has been told.
    current: Resolved,
    /// Changes computed but not yet yielded.
    pending: VecDeque<Update>,
    /// Consecutive failed resolutions, for the retry backoff.
    failures: u32,
    state: State,
}

enum State {
    /// Not polled yet: the first resolution starts on the first poll (no runtime needed before).
    Start,
    /// Waiting for the next resolution.
    Waiting(Pin<Box<Sleep>>),
    /// A resolution is in flight.
    Resolving(BoxFuture<'static, Result<Resolved, ResolveError>>),
}

impl Dns {
    /// Discovery from the A and AAAA records of `host`, every address on `port`.
    pub fn a_aaaa(host: impl Into<String>, port: u16) -> DnsBuilder {
        DnsBuilder::new(Query::Host {
            host: host.into(),
            port,
        })
    }

    /// Discovery from the SRV records of `name` (for example `_grpc._tcp.svc.example.com`).
    pub fn srv(name: impl Into<String>) -> DnsBuilder {
        DnsBuilder::new(Query::Srv { name: name.into() })
    }

    /// The interval in force (after raising it to [`MIN_INTERVAL`]).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn retry_delay(&self) -> Duration {
        if self.failures == 0 {
            return self.interval;
        }
        let factor = 1u32 << (self.failures - 1).min(16);
        FIRST_RETRY.saturating_mul(factor).min(self.interval)
    }

    /// Handles a finished resolution: queues changes, returns an error to yield if any.
    fn resolved(&mut self, result: Result<Resolved, ResolveError>) -> Option<ResolveError> {
        let result = match result {
            Ok(set) if set.is_empty() && self.empty == EmptyAnswer::KeepLast => {
                Err(ResolveError::no_records(self.query.clone()))
            }
            other => other,
        };
        match result {
            Ok(set) => {
                self.failures = 0;
                self.pending.extend(diff(&self.current, &set, &self.scheme));
                self.current = set;
                None
            }
            Err(err) => {
                self.failures = self.failures.saturating_add(1);
                Some(err)
            }
        }
    }
}

impl fmt::Debug for Dns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Start => "start",
            State::Waiting(_) => "waiting",
            State::Resolving(_) => "resolving",
        };
        f.debug_struct("Dns")
            .field("query", &self.query)
            .field("scheme", &self.scheme)
            .field("interval", &self.interval)
            .field("on_empty_answer", &self.empty)
            .field("current", &self.current)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl Stream for Dns {
    type Item = Result<Update, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match &mut this.state {
                State::Start => this.state = State::Resolving((this.resolve)()),
                State::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state = State::Resolving((this.resolve)());
                }
                State::Resolving(resolving) => {
                    let result = ready!(resolving.as_mut().poll(cx));
                    let error = this.resolved(result);
                    let delay = this.retry_delay();
                    this.state = State::Waiting(Box::pin(tokio::time::sleep(delay)));
                    if let Some(error) = error {
                        return Poll::Ready(Some(Err(error.into())));
                    }
                }
            }
        }
    }
}

/// Changes that take `old` to `new`: inserts (new addresses, changed weights) first, then removes.
fn diff(old: &Resolved, new: &Resolved, scheme: &Scheme) -> Vec<Update> {
    let endpoints = |set: &Resolved| {
        full_set::set_of(
            set.iter()
                .map(|(addr, weight)| (uri(scheme, *addr), Endpoint::weighted(*weight))),
        )
    };
    full_set::diff(&endpoints(old), &endpoints(new))
}

fn uri(scheme: &Scheme, addr: SocketAddr) -> Uri {
    // `SocketAddr`'s Display brackets IPv6; the scheme was checked at build time.
    format!("{scheme}://{addr}")
        .parse()
        .expect("scheme://ip:port is a valid URI")
}

/// What to resolve.
#[derive(Debug, Clone)]
enum Query {
    Host { host: String, port: u16 },
    Srv { name: String },
}

/// Where the resolver comes from.
#[derive(Clone)]
enum Source {
    System,
    Nameservers(Vec<SocketAddr>),
    Resolver(Box<TokioResolver>),
}

/// Builds a [`Dns`] source; from [`Dns::a_aaaa`] or [`Dns::srv`].
#[derive(Clone)]
#[must_use = "call .build() to get the discovery stream"]
pub struct DnsBuilder {
    query: Query,
    scheme: String,
    interval: Duration,
    timeout: Duration,
    empty: EmptyAnswer,
    source: Source,
    conflicting_source: bool,
}

impl fmt::Debug for DnsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            Source::System => "system".to_string(),
            Source::Nameservers(addrs) => format!("{addrs:?}"),
            Source::Resolver(_) => "custom resolver".to_string(),
        };
        f.debug_struct("DnsBuilder")
            .field("query", &self.query)
            .field("scheme", &self.scheme)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("on_empty_answer", &self.empty)
            .field("resolver", &source)
            .finish()
    }
}

impl DnsBuilder {
    fn new(query: Query) -> Self {
        DnsBuilder {
            query,
            scheme: "http".into(),
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            empty: EmptyAnswer::KeepLast,
            source: Source::System,
            conflicting_source: false,
        }
    }

    /// The URI scheme of every endpoint. Default `http`.
    pub fn scheme(mut self, scheme: impl Into<String>) -> Self {
        self.scheme = scheme.into();
        self
    }

    /// Time from the end of one resolution to the start of the next. Default [`DEFAULT_INTERVAL`]
    /// (30 s); must not be zero; below [`MIN_INTERVAL`] (1 s) it is raised to that.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Bound on one resolution, all of its queries together; past it the resolution is an error
    /// (and the last good set is kept). Default [`DEFAULT_TIMEOUT`] (10 s); must not be zero.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What an authoritative empty answer does. Default [`EmptyAnswer::KeepLast`].
    pub fn on_empty_answer(mut self, empty: EmptyAnswer) -> Self {
        self.empty = empty;
        self
    }

    /// Query this name server (UDP, and TCP for truncated answers) instead of the system's
    /// configuration; call again to add more. The hosts file is not consulted. Conflicts with
    /// [`resolver`](Self::resolver).
    pub fn nameserver(mut self, addr: SocketAddr) -> Self {
        match &mut self.source {
            Source::Nameservers(addrs) => addrs.push(addr),
            Source::System => self.source = Source::Nameservers(vec![addr]),
            Source::Resolver(_) => self.conflicting_source = true,
        }
        self
    }

    /// Resolve with this hickory resolver (any configuration: DoT, custom hosts, options).
    /// Conflicts with [`nameserver`](Self::nameserver).
    pub fn resolver(mut self, resolver: TokioResolver) -> Self {
        if matches!(self.source, Source::Nameservers(_)) {
            self.conflicting_source = true;
        }
        self.source = Source::Resolver(Box::new(resolver));
        self
    }

    /// Checks the configuration and builds the stream. Without [`nameserver`](Self::nameserver)
    /// or [`resolver`](Self::resolver) this reads the system configuration (`/etc/resolv.conf`).
    ///
    /// A bad setting is a [`ConfigError`] naming it: `dns.host`, `dns.port`, `dns.name`,
    /// `dns.scheme`, `dns.interval`, `dns.timeout`, `dns.nameserver` or `dns.resolver`.
    pub fn build(self) -> Result<Dns, ConfigError> {
        let query = self.validate_query()?;
        let scheme = valid_scheme(&self.scheme).ok_or_else(|| {
            ConfigError::new(
                "dns.scheme",
                format!("{:?} is not a URI scheme", self.scheme),
            )
        })?;
        if self.interval.is_zero() {
            return Err(ConfigError::new(
                "dns.interval",
                "must be greater than zero",
            ));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new("dns.timeout", "must be greater than zero"));
        }
        if self.conflicting_source {
            return Err(ConfigError::new(
                "dns.resolver",
                "set either `resolver` or `nameserver`, not both",
            ));
        }
        let resolver = match self.source {
            Source::Resolver(resolver) => *resolver,
            Source::Nameservers(addrs) => nameserver_resolver(&addrs)
                .map_err(|e| ConfigError::new("dns.nameserver", e.to_string()))?,
            Source::System => TokioResolver::builder_tokio()
                .and_then(|builder| builder.build())
                .map_err(|e| {
                    ConfigError::new("dns.resolver", format!("system configuration: {e}"))
                })?,
        };
        let timeout = self.timeout;
        let described = query.describe();
        let query = Arc::new(query);
        let resolve: Resolve = Arc::new(move || {
            let resolver = resolver.clone();
            let query = query.clone();
            Box::pin(async move {
                match tokio::time::timeout(timeout, query.resolve(&resolver)).await {
                    Ok(result) => result,
                    Err(_) => Err(ResolveError::new(query.describe(), Kind::Timeout(timeout))),
                }
            })
        });
        Ok(Dns::from_parts(
            resolve,
            described,
            scheme,
            self.interval,
            self.empty,
        ))
    }

    fn validate_query(&self) -> Result<Parsed, ConfigError> {
        match &self.query {
            Query::Host { host, port } => {
                if host.is_empty() {
                    return Err(ConfigError::new("dns.host", "must not be empty"));
                }
                if *port == 0 {
                    return Err(ConfigError::new("dns.port", "must not be zero"));
                }
                let literal = host.trim_start_matches('[').trim_end_matches(']');
                let target = match literal.parse::<IpAddr>() {
                    Ok(ip) => Target::Ip(ip),
                    Err(_) => Target::Name(parse_name("dns.host", host)?),
                };
                Ok(Parsed::Host {
                    target,
                    port: *port,
                })
            }
            Query::Srv { name } => {
                if name.is_empty() {
                    return Err(ConfigError::new("dns.name", "must not be empty"));
                }
                Ok(Parsed::Srv {
                    name: parse_name("dns.name", name)?,
                })
            }
        }
    }
}

/// RFC 3986: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`, and one `http::Uri` accepts.
fn valid_scheme(scheme: &str) -> Option<Scheme> {
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !(first_ok && rest_ok) {
        return None;
    }
    let parsed: Uri = format!("{scheme}://127.0.0.1:1").parse().ok()?;
    parsed.scheme().cloned()
}

fn parse_name(field: &'static str, name: &str) -> Result<Name, ConfigError> {
    Name::from_utf8(name)
        .map_err(|e| ConfigError::new(field, format!("{name:?} is not a DNS name: {e}")))
}

fn nameserver_resolver(addrs: &[SocketAddr]) -> Result<TokioResolver, NetError> {
    let servers = addrs
        .iter()
        .map(|addr| {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut options = ResolverOpts::default();
    options.use_hosts_file = ResolveHosts::Never;
    TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        TokioRuntimeProvider::default(),
    )
    .with_options(options)
    .build()
}

impl Dns {
    fn from_parts(
        resolve: Resolve,
        query: String,
        scheme: Scheme,
        interval: Duration,
        empty: EmptyAnswer,
    ) -> Dns {
        Dns {
            resolve,
            query,
            scheme,
            interval: interval.max(MIN_INTERVAL),
            empty,
            current: Resolved::new(),
            pending: VecDeque::new(),
            failures: 0,
            state: State::Start,
        }
    }
}

/// A validated query.
#[derive(Debug)]
enum Parsed {
    Host { target: Target, port: u16 },
    Srv { name: Name },
}

#[derive(Debug)]
enum Target {
    Ip(IpAddr),
    Name(Name),
}

impl Parsed {
    fn describe(&self) -> String {
        match self {
            Parsed::Host {
                target: Target::Ip(ip),
                ..
            } => format!("A/AAAA {ip}"),
            Parsed::Host {
                target: Target::Name(name),
                ..
            } => format!("A/AAAA {name}"),
            Parsed::Srv { name } => format!("SRV {name}"),
        }
    }

    async fn resolve(&self, resolver: &TokioResolver) -> Result<Resolved, ResolveError> {
        let wrap = |e: NetError| ResolveError::new(self.describe(), Kind::Resolver(e));
        let mut set = Resolved::new();
        match self {
            Parsed::Host {
                target: Target::Ip(ip),
                port,
            } => {
                set.insert(SocketAddr::new(*ip, *port), 1);
            }
            Parsed::Host {
                target: Target::Name(name),
                port,
            } => {
                for ip in lookup_ips(resolver, name).await.map_err(wrap)? {
                    set.insert(SocketAddr::new(ip, *port), 1);
                }
            }
            Parsed::Srv { name } => {
                let records = match resolver.srv_lookup(name.clone()).await {
                    Ok(lookup) => lookup
                        .answers()
                        .iter()
                        .filter_map(|record| match &record.data {
                            RData::SRV(srv) if !srv.target.is_root() => {
                                Some((srv.target.clone(), srv.port, srv.weight))
                            }
                            _ => None,
                        })
                        .collect(),
                    Err(e) if e.is_no_records_found() => Vec::new(),
                    Err(e) => return Err(wrap(e)),
                };
                let targets: BTreeSet<&Name> = records.iter().map(|(target, ..)| target).collect();
                let addresses =
                    futures::future::join_all(targets.iter().map(|target| async move {
                        lookup_ips(resolver, target)
                            .await
                            .map(|ips| (*target, ips))
                            .map_err(|e| {
                                ResolveError::new(
                                    format!("{} (target {target})", self.describe()),
                                    Kind::Resolver(e),
                                )
                            })
                    }))
                    .await
                    .into_iter()
                    .collect::<Result<BTreeMap<&Name, Vec<IpAddr>>, _>>()?;
                for (target, port, weight) in &records {
                    for ip in &addresses[target] {
                        let total = set.entry(SocketAddr::new(*ip, *port)).or_insert(0);
                        *total = total.saturating_add(u32::from(*weight).max(1));
                    }
                }
            }
        }
        Ok(set)
    }
}

/// A and AAAA together; "no records" for one or both is an empty part, any other error fails.
async fn lookup_ips(resolver: &TokioResolver, name: &Name) -> Result<Vec<IpAddr>, NetError> {
    let (v4, v6) = futures::join!(
        resolver.ipv4_lookup(name.clone()),
        resolver.ipv6_lookup(name.clone())
    );
    let mut ips = Vec::new();
    for lookup in [v4, v6] {
        match lookup {
            Ok(lookup) => ips.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })),
            Err(e) if e.is_no_records_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(ips)
}

/// A resolution that failed; the stream yields it (boxed) and keeps the last good set.
#[derive(Debug)]
pub struct ResolveError {
    query: String,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    NoRecords,
    Timeout(Duration),
    Resolver(NetError),
}

impl ResolveError {
    fn new(query: String, kind: Kind) -> Self {
        ResolveError { query, kind }
    }

    fn no_records(query: String) -> Self {
        ResolveError::new(query, Kind::NoRecords)
    }

    /// The answer was authoritative and empty (NXDOMAIN or no records of the type), and
    /// [`EmptyAnswer::KeepLast`] is in force.
    pub fn is_no_records(&self) -> bool {
        matches!(self.kind, Kind::NoRecords)
    }

    /// The resolution did not finish within [`DnsBuilder::timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Kind::Timeout(_))
    }
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DNS discovery: {}: ", self.query)?;
        match &self.kind {
            Kind::NoRecords => f.write_str("no records; keeping the last good set"),
            Kind::Timeout(t) => write!(f, "no answer within {t:?}; keeping the last good set"),
            Kind::Resolver(e) => write!(f, "{e}; keeping the last good set"),
        }
    }
}

impl std::error::Error for ResolveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::Resolver(e) => Some(e),
            _ => None,
        }
    }
}

/// The error [`DnsBuilder::build`] returned before it returned [`ConfigError`], the error every
/// towline builder returns.
#[deprecated(
    since = "0.1.0",
    note = "DnsBuilder::build returns towline::ConfigError"
)]
pub type BuildError = ConfigError;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::Change;
    use futures::StreamExt;
    use std::sync::Mutex;
    use tokio::time::Instant;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn set(entries: &[(&str, u32)]) -> Resolved {
        entries.iter().map(|(a, w)| (addr(a), *w)).collect()
    }

    fn http() -> Scheme {
        Scheme::HTTP
    }

    fn insert(uri: &str, weight: u32) -> (String, Option<u32>) {
        (uri.to_string(), Some(weight))
    }

    fn remove(uri: &str) -> (String, Option<u32>) {
        (uri.to_string(), None)
    }

    fn plain(changes: &[Update]) -> Vec<(String, Option<u32>)> {
        changes
            .iter()
            .map(|change| match change {
                Change::Insert(uri, endpoint) => (uri.to_string(), Some(endpoint.weight)),
                Change::Remove(uri) => (uri.to_string(), None),
            })
            .collect()
    }

    #[test]
    fn dns_is_a_send_unpin_discover() {
        fn check<T: crate::discover::Discover + Unpin>() {}
        check::<Dns>();
    }

    #[test]
    fn first_diff_inserts_everything() {
        let new = set(&[("10.0.0.2:80", 1), ("10.0.0.1:80", 3)]);
        assert_eq!(
            plain(&diff(&Resolved::new(), &new, &http())),
            [
                insert("http://10.0.0.1:80/", 3),
                insert("http://10.0.0.2:80/", 1)
            ]
        );
    }

    #[test]
    fn diff_of_equal_sets_is_empty() {
        let a = set(&[("10.0.0.1:80", 1), ("[2001:db8::1]:80", 2)]);
        assert!(diff(&a, &a.clone(), &http()).is_empty());
    }

    #[test]
    fn diff_inserts_new_then_removes_gone() {
        let old = set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        let new = set(&[("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]);
        assert_eq!(
            plain(&diff(&old, &new, &http())),
            [
                insert("http://10.0.0.3:80/", 1),
                remove("http://10.0.0.1:80/")
            ]
        );
    }

    #[test]
    fn diff_reinserts_an_address_whose_weight_changed() {
        let old = set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 5)]);
        let new = set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 7)]);
        assert_eq!(
            plain(&diff(&old, &new, &http())),
            [insert("http://10.0.0.2:80/", 7)]
        );
    }

    #[test]
    fn diff_to_empty_removes_all_and_ports_distinguish_endpoints() {
        let old = set(&[("10.0.0.1:80", 1), ("10.0.0.1:81", 1)]);
        assert_eq!(
            plain(&diff(&old, &Resolved::new(), &http())),
            [remove("http://10.0.0.1:80/"), remove("http://10.0.0.1:81/")]
        );
    }

    #[test]
    fn uris_bracket_ipv6_and_use_the_scheme() {
        let https = Scheme::HTTPS;
        assert_eq!(
            uri(&https, addr("[2001:db8::1]:50051")).to_string(),
            "https://[2001:db8::1]:50051/"
        );
        assert_eq!(
            uri(&http(), addr("192.0.2.7:8080")),
            "http://192.0.2.7:8080".parse::<Uri>().unwrap()
        );
    }

    /// A `Dns` whose resolutions return the scripted results in order (then the last one forever),
    /// recording when each resolution started.
    fn scripted(
        interval: Duration,
        empty: EmptyAnswer,
        script: Vec<Result<Resolved, &'static str>>,
    ) -> (Dns, Arc<Mutex<Vec<Instant>>>) {
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let starts = Arc::new(Mutex::new(Vec::new()));
        let recorded = starts.clone();
        let resolve: Resolve = Arc::new(move || {
            recorded.lock().unwrap().push(Instant::now());
            let mut script = script.lock().unwrap();
            let next = if script.len() > 1 {
                script.pop_front().unwrap()
            } else {
                script.front().cloned().unwrap()
            };
            Box::pin(async move {
                next.map_err(|e| {
                    ResolveError::new("A/AAAA test".into(), Kind::Resolver(NetError::Message(e)))
                })
            })
        });
        let dns = Dns::from_parts(resolve, "A/AAAA test".into(), http(), interval, empty);
        (dns, starts)
    }

    async fn next_change(dns: &mut Dns) -> (String, Option<u32>) {
        let change = dns.next().await.unwrap().unwrap();
        plain(&[change]).pop().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn errors_keep_the_set_and_retry_with_backoff_up_to_the_interval() {
        let one = set(&[("10.0.0.1:80", 1)]);
        let two = set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        let (mut dns, starts) = scripted(
            Duration::from_secs(5),
            EmptyAnswer::KeepLast,
            vec![
                Ok(one.clone()),
                Err("servfail"),
                Err("servfail"),
                Err("servfail"),
                Err("servfail"),
                Ok(two),
            ],
        );
        let t0 = Instant::now();
        assert_eq!(
            next_change(&mut dns).await,
            insert("http://10.0.0.1:80/", 1)
        );
        for _ in 0..4 {
            let err = dns.next().await.unwrap().unwrap_err();
            assert!(err.to_string().contains("servfail"), "{err}");
            assert_eq!(dns.current, one, "an error must not change the set");
        }
        // Nothing removed; the recovery inserts only the new address.
        assert_eq!(
            next_change(&mut dns).await,
            insert("http://10.0.0.2:80/", 1)
        );
        let offsets: Vec<u64> = starts
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.duration_since(t0).as_secs())
            .collect();
        // interval 5 s after the success, then retries after 1 s, 2 s, 4 s, 5 s (capped).
        assert_eq!(offsets, [0, 5, 6, 8, 12, 17]);
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_answers_yield_nothing_and_the_interval_has_a_floor() {
        let one = set(&[("10.0.0.1:80", 1)]);
        let (mut dns, starts) = scripted(
            Duration::from_millis(10),
            EmptyAnswer::KeepLast,
            vec![Ok(one)],
        );
        assert_eq!(dns.interval(), MIN_INTERVAL);
        let t0 = Instant::now();
        assert_eq!(
            next_change(&mut dns).await,
            insert("http://10.0.0.1:80/", 1)
        );
        let idle = tokio::time::timeout(Duration::from_millis(3500), dns.next()).await;
        assert!(idle.is_err(), "same answer must emit nothing, got {idle:?}");
        let offsets: Vec<u128> = starts
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.duration_since(t0).as_millis())
            .collect();
        assert_eq!(offsets, [0, 1000, 2000, 3000]);
    }

    #[tokio::test(start_paused = true)]
    async fn empty_answer_is_an_error_by_default() {
        let one = set(&[("10.0.0.1:80", 1)]);
        let (mut dns, _) = scripted(
            Duration::from_secs(1),
            EmptyAnswer::KeepLast,
            vec![Ok(one.clone()), Ok(Resolved::new())],
        );
        assert_eq!(
            next_change(&mut dns).await,
            insert("http://10.0.0.1:80/", 1)
        );
        let err = dns.next().await.unwrap().unwrap_err();
        let err = err.downcast::<ResolveError>().unwrap();
        assert!(err.is_no_records(), "{err}");
        assert_eq!(dns.current, one);
    }

    #[tokio::test(start_paused = true)]
    async fn empty_answer_removes_all_when_asked() {
        let one = set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        let (mut dns, _) = scripted(
            Duration::from_secs(1),
            EmptyAnswer::RemoveAll,
            vec![Ok(one), Ok(Resolved::new())],
        );
        assert_eq!(
            next_change(&mut dns).await,
            insert("http://10.0.0.1:80/", 1)
        );
        assert_eq!(
            next_change(&mut dns).await,
            insert("http://10.0.0.2:80/", 1)
        );
        assert_eq!(next_change(&mut dns).await, remove("http://10.0.0.1:80/"));
        assert_eq!(next_change(&mut dns).await, remove("http://10.0.0.2:80/"));
        let idle = tokio::time::timeout(Duration::from_secs(3), dns.next()).await;
        assert!(
            idle.is_err(),
            "an empty set stays empty quietly, got {idle:?}"
        );
    }

    #[test]
    fn builder_rejects_bad_config_naming_the_field() {
        let field = |b: DnsBuilder| b.build().unwrap_err().field().to_owned();
        let ns = addr("127.0.0.1:53");
        assert_eq!(field(Dns::a_aaaa("", 80).nameserver(ns)), "dns.host");
        assert_eq!(
            field(Dns::a_aaaa("svc.example", 0).nameserver(ns)),
            "dns.port"
        );
        assert_eq!(field(Dns::srv("").nameserver(ns)), "dns.name");
        assert_eq!(field(Dns::srv("a..b").nameserver(ns)), "dns.name");
        let zero = Dns::srv("_grpc._tcp.svc.example").interval(Duration::ZERO);
        assert_eq!(field(zero.nameserver(ns)), "dns.interval");
        let zero = Dns::srv("_grpc._tcp.svc.example").timeout(Duration::ZERO);
        assert_eq!(field(zero.nameserver(ns)), "dns.timeout");
        assert_eq!(
            field(Dns::srv("x.example").scheme("").nameserver(ns)),
            "dns.scheme"
        );
        assert_eq!(
            field(Dns::srv("x.example").scheme("a b").nameserver(ns)),
            "dns.scheme"
        );
        let message = Dns::srv("x.example")
            .interval(Duration::ZERO)
            .nameserver(ns)
            .build()
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("dns.interval: "), "{message}");
    }

    #[test]
    fn builder_defaults_and_literal_hosts() {
        let ns = addr("127.0.0.1:53");
        let dns = Dns::a_aaaa("svc.example", 80)
            .nameserver(ns)
            .build()
            .unwrap();
        assert_eq!(dns.interval(), DEFAULT_INTERVAL);
        assert_eq!(dns.scheme, Scheme::HTTP);
        assert_eq!(dns.empty, EmptyAnswer::KeepLast);
        let dns = Dns::a_aaaa("[::1]", 80)
            .scheme("https")
            .interval(Duration::from_secs(90))
            .nameserver(ns)
            .build()
            .unwrap();
        assert_eq!(dns.interval(), Duration::from_secs(90));
        assert_eq!(dns.query, "A/AAAA ::1");
    }

    #[tokio::test]
    async fn an_ip_literal_host_resolves_without_a_query() {
        // The name server is a closed port: a query would fail; a literal needs none.
        let mut dns = Dns::a_aaaa("[::1]", 50051)
            .nameserver(addr("127.0.0.1:9"))
            .build()
            .unwrap();
        assert_eq!(
            next_change(&mut dns).await,
            insert("http://[::1]:50051/", 1)
        );
    }
}
