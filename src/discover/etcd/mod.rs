//! etcd discovery and registration (feature `etcd`, off by default).
//!
//! [`Etcd`] is a [`Discover`](super::Discover) source that follows a key prefix in an etcd v3
//! cluster: one key per endpoint. [`Registration`] is the server side: it puts its address under
//! the prefix, attached to a lease that it keeps alive in the background, so the key (and the
//! endpoint, in every client) goes away when the server stops — at once on a clean shutdown, within
//! the lease's TTL on a crash.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::time::Duration;
//! use towline::balance::{BalanceConfig, BalanceLayer};
//! use towline::discover::etcd::{Etcd, Registration};
//!
//! let etcd = ["http://127.0.0.1:2379", "http://127.0.0.1:22379"];
//!
//! // Server side: announce this instance while it runs.
//! let registration = Registration::builder(etcd, "/services/echo/", "10.0.0.7:50051")
//!     .weight(2)
//!     .ttl(Duration::from_secs(10))
//!     .register()
//!     .await?;
//!
//! // Client side: balance over whatever is registered.
//! let discovery = Etcd::builder(etcd, "/services/echo/").build()?;
//! let layer = BalanceLayer::new(discovery, BalanceConfig::default());
//! # drop(layer);
//!
//! // On shutdown: revoke the lease, so clients drop the endpoint now rather than after the TTL.
//! registration.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! # The value format
//!
//! Each key under the prefix names one endpoint; the key itself is free (a host name, an instance
//! id). The value is either a bare address, `host:port`, or a JSON object:
//!
//! ```json
//! {"addr": "10.0.0.7:50051", "weight": 2, "metadata": {"zone": "eu-west-1a"}}
//! ```
//!
//! - `addr` (required): `host:port` (IPv6 bracketed, `[2001:db8::1]:50051`), or a full
//!   `http://host:port`. A bare `host:port` gets the scheme set by [`EtcdBuilder::scheme`]
//!   (default `http`).
//! - `weight` (optional, default 1): an integer from 1 to 2³²−1, [`Endpoint::weight`].
//! - `metadata` (optional): a JSON object. It is checked and written by [`Registration`], but
//!   [`Endpoint`] has no field for it yet, so discovery does not pass it on.
//! - Other fields are ignored, so registrants may add some before clients know them.
//!
//! A value that does not parse (not UTF-8, bad JSON, no port, weight 0, …) is skipped: it is
//! logged (a `tracing` warning naming the key and why) and counted in the
//! [`INVALID_VALUES`] counter, and the watch goes on. Its key then names no endpoint: if it named
//! one before, that endpoint is removed, as it would be absent for a client starting now —
//! keeping the old address would make clients disagree depending on when they started.
//!
//! Several keys naming the same address are one endpoint (with the largest weight); it stays
//! while any of them does, so a restarted server that registers before its old lease expires
//! does not flap.
//!
//! # What is emitted
//!
//! The first read of the prefix inserts every endpoint. After that, only differences: a new
//! address is a [`Change::Insert`]; a new weight for an address is a [`Change::Insert`] again
//! (the balancer re-inserts it); a key whose address changes is an insert of the new address
//! and a remove of the old one; a deleted or expired key is a [`Change::Remove`]. Inserts come
//! before removes, so a balancer following the stream never sees an empty set in the middle of
//! a replacement.
//!
//! # No change missed, none repeated
//!
//! The prefix is read at a revision `R`, then watched from `R + 1`, so nothing that happens
//! between the two is lost. When the connection to etcd breaks (a member stops, a network
//! fault, the member loses its leader), **nothing is emitted**: the last known set keeps serving
//! while [`Etcd`] reconnects with backoff ([`EtcdBuilder::backoff`]) and resumes the watch from
//! the last revision it saw + 1, so the changes made meanwhile arrive as ordinary events. If that
//! revision was compacted in the meantime, etcd cancels the watch with `compact_revision` set;
//! the prefix is then read afresh and **only the difference** to the last set is emitted: an
//! endpoint that stayed is never removed and re-inserted.
//!
//! With several members, a failed member is left for the next one at once; the backoff applies
//! only once every member has failed in a row. Watches and keepalives ask etcd for a leader
//! (`hasleader`), so a member cut off from its quorum ends them instead of falling silent.
//!
//! # Work happens only while polled
//!
//! [`Etcd`] spawns nothing: its connection, reads and watch advance while the stream is polled
//! (the balancer polls it all the time), and dropping it closes them.
//!
//! # Errors
//!
//! Connection and call failures are not yielded: they are logged (`tracing` warnings naming the
//! member) and retried, since the set must stay and the balancer could do nothing else with
//! them. Configuration errors are found by [`EtcdBuilder::build`], as a
//! [`crate::ConfigError`] naming the field.
//!
//! [`Change::Insert`]: super::Change::Insert
//! [`Change::Remove`]: super::Change::Remove

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use futures::stream::BoxStream;
use http::Uri;
use http::uri::Scheme;
use metrics::Counter;
use tonic::Streaming;

use super::full_set::{Set, diff};
use super::{Endpoint, Update};
use crate::BoxError;
use crate::ConfigError;
use crate::backoff::Backoff;

mod client;
mod registration;

pub use client::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, EtcdError, default_backoff};
pub use registration::{
    DEFAULT_TTL, RegisterError, Registration, RegistrationBuilder, encode_value,
};

use client::{Cluster, ClusterConfig, Conn, pb, prefix_end, require_leader};

/// Counter of values under a watched prefix that did not parse, labelled `prefix`. Each read
/// of such a value counts once (a value seen by the watch, and again if the prefix is re-read).
pub const INVALID_VALUES: &str = "towline.discover.etcd.invalid_values";

/// Discovery from an etcd key prefix; see the [module docs](self).
pub struct Etcd {
    prefix: String,
    inner: BoxStream<'static, Result<Update, BoxError>>,
}

impl Etcd {
    /// Discovery of the endpoints under `prefix` (for example `/services/echo/`), from the etcd
    /// cluster whose client URLs are `endpoints` (`http://host:port` or `host:port`; several
    /// members for failover).
    pub fn builder<I>(endpoints: I, prefix: impl Into<String>) -> EtcdBuilder
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        EtcdBuilder {
            cluster: ClusterConfig::new(
                endpoints
                    .into_iter()
                    .map(|e| e.as_ref().to_owned())
                    .collect(),
            ),
            prefix: prefix.into(),
            scheme: "http".into(),
        }
    }

    /// The prefix followed.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl fmt::Debug for Etcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Etcd")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Stream for Etcd {
    type Item = Result<Update, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Configures an [`Etcd`] source; defaults are documented on each method.
#[derive(Debug, Clone)]
#[must_use]
pub struct EtcdBuilder {
    cluster: ClusterConfig,
    prefix: String,
    scheme: String,
}

impl EtcdBuilder {
    /// The scheme of discovered URIs whose value is a bare `host:port`. Default `http`.
    pub fn scheme(mut self, scheme: impl Into<String>) -> Self {
        self.scheme = scheme.into();
        self
    }

    /// The bound on connecting to one member. Default [`DEFAULT_CONNECT_TIMEOUT`] (3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.cluster.connect_timeout = timeout;
        self
    }

    /// The bound on one request: the read of the prefix and the start of the watch. Default
    /// [`DEFAULT_REQUEST_TIMEOUT`] (5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.cluster.request_timeout = timeout;
        self
    }

    /// The delay between reconnects once every member has failed. Default
    /// [`default_backoff`]: 200 ms doubling to 5 s, ±20 %.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.cluster.backoff = backoff;
        self
    }

    /// Validates the configuration. Errors name the field: `etcd.endpoints`, `etcd.prefix`,
    /// `etcd.scheme`, `etcd.connect_timeout`, `etcd.request_timeout`. Connects to nothing yet:
    /// the first poll does.
    pub fn build(self) -> Result<Etcd, ConfigError> {
        if self.prefix.is_empty() {
            // Following the whole keyspace is never what was meant, and a client would try to
            // read every key of the cluster as an endpoint.
            return Err(ConfigError::new("etcd.prefix", "must not be empty"));
        }
        let scheme = parse_scheme(&self.scheme)?;
        let cluster = self.cluster.build()?;
        metrics::describe_counter!(
            INVALID_VALUES,
            metrics::Unit::Count,
            "Values under a watched etcd prefix that did not parse and were skipped"
        );
        let watcher = Watcher {
            invalid: metrics::counter!(INVALID_VALUES, "prefix" => self.prefix.clone()),
            prefix: self.prefix.clone().into_bytes(),
            cluster,
            scheme,
            keys: BTreeMap::new(),
            emitted: BTreeMap::new(),
            revision: 0,
            reread: true,
            watch: None,
            pending: VecDeque::new(),
            failures: 0,
        };
        let inner = Box::pin(futures::stream::unfold(watcher, |mut watcher| async move {
            let update = watcher.next_update().await;
            Some((Ok(update), watcher))
        }));
        Ok(Etcd {
            prefix: self.prefix,
            inner,
        })
    }
}

fn parse_scheme(scheme: &str) -> Result<Scheme, ConfigError> {
    let parsed: Scheme = scheme
        .parse()
        .map_err(|_| ConfigError::new("etcd.scheme", format!("`{scheme}` is not a URI scheme")))?;
    if scheme.is_empty() || scheme.contains(|c: char| c.is_whitespace()) {
        return Err(ConfigError::new(
            "etcd.scheme",
            format!("`{scheme}` is not a URI scheme"),
        ));
    }
    Ok(parsed)
}

/// What one key names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Named {
    uri: Uri,
    endpoint: Endpoint,
}

/// Parses a value (see the module docs for the format); the error says why, for the log.
fn parse_value(value: &[u8], scheme: &Scheme) -> Result<Named, String> {
    let text = std::str::from_utf8(value)
        .map_err(|_| "not UTF-8".to_owned())?
        .trim();
    if !text.starts_with('{') {
        return Ok(Named {
            uri: parse_addr(text, scheme)?,
            endpoint: Endpoint::default(),
        });
    }
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let object = json.as_object().ok_or("not a JSON object")?;
    let addr = match object.get("addr") {
        Some(serde_json::Value::String(addr)) => addr,
        Some(_) => return Err("`addr` is not a string".into()),
        None => return Err("no `addr`".into()),
    };
    let weight = match object.get("weight") {
        None | Some(serde_json::Value::Null) => 1,
        Some(weight) => weight
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .filter(|&w| w >= 1)
            .ok_or_else(|| format!("`weight` {weight} is not an integer from 1 to 4294967295"))?,
    };
    match object.get("metadata") {
        None | Some(serde_json::Value::Null | serde_json::Value::Object(_)) => {}
        Some(_) => return Err("`metadata` is not a JSON object".into()),
    }
    Ok(Named {
        uri: parse_addr(addr, scheme)?,
        endpoint: Endpoint::weighted(weight),
    })
}

/// `host:port` (with `scheme`) or `scheme://host:port`, as a URI like DNS discovery's:
/// `scheme://host:port/`.
fn parse_addr(addr: &str, scheme: &Scheme) -> Result<Uri, String> {
    let (scheme, authority) = match addr.split_once("://") {
        Some((s, rest)) => (
            s.parse::<Scheme>()
                .map_err(|_| format!("`{addr}`: bad scheme"))?,
            rest.strip_suffix('/').unwrap_or(rest),
        ),
        None => (scheme.clone(), addr),
    };
    let authority: http::uri::Authority = authority
        .parse()
        .map_err(|_| format!("`{addr}` is not host:port"))?;
    if authority.host().is_empty() || authority.port_u16().is_none_or(|p| p == 0) {
        return Err(format!("`{addr}` is not host:port (with a port)"));
    }
    if authority.as_str().contains('@') {
        return Err(format!("`{addr}` carries user information"));
    }
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query("/")
        .build()
        .map_err(|e| format!("`{addr}`: {e}"))
}

/// The endpoints `keys` name: one per address, with the largest weight among its keys.
fn endpoints_of(keys: &BTreeMap<Vec<u8>, Named>) -> Set {
    let mut set = Set::new();
    for named in keys.values() {
        set.entry(named.uri.to_string())
            .and_modify(|(_, e)| {
                if named.endpoint.weight > e.weight {
                    *e = named.endpoint;
                }
            })
            .or_insert((named.uri.clone(), named.endpoint));
    }
    set
}

/// The state of one [`Etcd`] source: what is known, what was said, and the watch.
struct Watcher {
    prefix: Vec<u8>,
    cluster: Cluster,
    scheme: Scheme,
    invalid: Counter,
    /// Every key under the prefix with a valid value, as last read or watched.
    keys: BTreeMap<Vec<u8>, Named>,
    /// The set the consumer has been told about.
    emitted: Set,
    /// Every event up to this revision is applied to `keys`; 0 before the first read.
    revision: i64,
    /// The prefix must be read (again) before watching: at the start, and after a compaction.
    reread: bool,
    watch: Option<Streaming<pb::WatchResponse>>,
    /// Changes computed and not yet yielded.
    pending: VecDeque<Update>,
    /// Consecutive failed attempts to (re)establish the watch.
    failures: u32,
}

impl Watcher {
    async fn next_update(&mut self) -> Update {
        loop {
            if let Some(update) = self.pending.pop_front() {
                return update;
            }
            let Some(watch) = self.watch.as_mut() else {
                self.resync().await;
                continue;
            };
            let result = match watch.message().await {
                Ok(Some(response)) => self.on_response(response),
                Ok(None) => Err("the watch stream ended".into()),
                Err(status) => Err(describe_status(&status)),
            };
            if let Err(why) = result {
                self.watch = None;
                self.failures = 1;
                tracing::warn!(
                    prefix = %String::from_utf8_lossy(&self.prefix),
                    member = %self.cluster.member(),
                    revision = self.revision,
                    "etcd discovery: watch lost ({why}); keeping the last set and resuming the watch"
                );
                self.cluster.failed();
            }
        }
    }

    /// (Re)establishes the watch, reading the prefix first when needed; on failure waits and
    /// moves to the next member, leaving the set as it is.
    async fn resync(&mut self) {
        let delay = self.cluster.retry_delay(self.failures.saturating_sub(1));
        if self.failures > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match self.try_resync().await {
            Ok(()) => {
                if self.failures > 0 {
                    tracing::info!(
                        prefix = %String::from_utf8_lossy(&self.prefix),
                        member = %self.cluster.member(),
                        revision = self.revision,
                        "etcd discovery: watch resumed"
                    );
                }
                self.failures = 0;
            }
            Err(err) => {
                self.failures = self.failures.saturating_add(1);
                tracing::warn!(
                    prefix = %String::from_utf8_lossy(&self.prefix),
                    failures = self.failures,
                    "etcd discovery: {err}; keeping the last set and retrying"
                );
                self.cluster.failed();
            }
        }
    }

    async fn try_resync(&mut self) -> Result<(), EtcdError> {
        let conn = self.cluster.connect().await?;
        if self.reread {
            self.read_prefix(&conn).await?;
            self.reread = false;
        }
        let range_end = prefix_end(&self.prefix);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: self.prefix.clone(),
                    range_end,
                    start_revision: self.revision + 1,
                    // Lets the resume revision advance while the prefix is quiet, so a resume
                    // after an outage is less likely to land on a compacted revision.
                    progress_notify: true,
                    prev_kv: false,
                },
            )),
        };
        // The request stream stays open: the watch lives as long as it does.
        let requests =
            futures::stream::once(async move { create }).chain(futures::stream::pending());
        let mut stream = conn
            .call("watch", conn.watch().watch(require_leader(requests)))
            .await?
            .into_inner();
        let created = conn
            .call("watch", async { stream.message().await })
            .await?
            .ok_or_else(|| EtcdError::new("watch", &conn.member, "the stream ended at once"))?;
        if created.compact_revision > 0 {
            self.compacted(created.compact_revision);
            return Ok(());
        }
        if created.canceled || !created.created {
            return Err(EtcdError::new(
                "watch",
                &conn.member,
                format!("not created: {}", created.cancel_reason),
            ));
        }
        self.watch = Some(stream);
        Ok(())
    }

    /// Reads every key under the prefix and queues the difference to what was emitted.
    async fn read_prefix(&mut self, conn: &Conn) -> Result<(), EtcdError> {
        let request = pb::RangeRequest {
            key: self.prefix.clone(),
            range_end: prefix_end(&self.prefix),
            limit: 0,
            // 0: the newest revision, linearizable (a member without a leader refuses it).
            revision: 0,
            serializable: false,
        };
        let response = conn
            .call("read", conn.kv().range(request))
            .await?
            .into_inner();
        let revision = response
            .header
            .map(|h| h.revision)
            .filter(|&r| r > 0)
            .ok_or_else(|| EtcdError::new("read", &conn.member, "no revision in the response"))?;
        let mut keys = BTreeMap::new();
        for kv in response.kvs {
            if let Some(named) = self.parse(&kv) {
                keys.insert(kv.key, named);
            }
        }
        self.keys = keys;
        self.revision = revision;
        self.emit();
        Ok(())
    }

    /// Applies one watch response; an error means the watch is lost.
    fn on_response(&mut self, response: pb::WatchResponse) -> Result<(), String> {
        if response.compact_revision > 0 {
            self.compacted(response.compact_revision);
            return Ok(());
        }
        if response.canceled {
            return Err(format!("watch canceled: {}", response.cancel_reason));
        }
        if response.events.is_empty() {
            // A progress notification: every event up to its revision has been sent.
            if !response.created
                && let Some(header) = response.header
            {
                self.revision = self.revision.max(header.revision);
            }
            return Ok(());
        }
        for event in response.events {
            let Some(kv) = event.kv else { continue };
            self.revision = self.revision.max(kv.mod_revision);
            if event.r#type == pb::mvccpb::event::EventType::Delete as i32 {
                self.keys.remove(&kv.key);
            } else if let Some(named) = self.parse(&kv) {
                self.keys.insert(kv.key, named);
            } else {
                self.keys.remove(&kv.key);
            }
        }
        self.emit();
        Ok(())
    }

    /// The watch's start revision was compacted: read the prefix afresh and emit the difference.
    fn compacted(&mut self, compact_revision: i64) {
        tracing::info!(
            prefix = %String::from_utf8_lossy(&self.prefix),
            revision = self.revision,
            compact_revision,
            "etcd discovery: resume revision compacted; re-reading the prefix"
        );
        self.watch = None;
        self.reread = true;
    }

    fn parse(&self, kv: &pb::mvccpb::KeyValue) -> Option<Named> {
        match parse_value(&kv.value, &self.scheme) {
            Ok(named) => Some(named),
            Err(why) => {
                self.invalid.increment(1);
                tracing::warn!(
                    key = %String::from_utf8_lossy(&kv.key),
                    revision = kv.mod_revision,
                    "etcd discovery: skipping a value that does not parse: {why}"
                );
                None
            }
        }
    }

    fn emit(&mut self) {
        let now = endpoints_of(&self.keys);
        self.pending.extend(diff(&self.emitted, &now));
        self.emitted = now;
    }
}

fn describe_status(status: &tonic::Status) -> String {
    crate::status::describe_error(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::Change;

    fn http() -> Scheme {
        Scheme::HTTP
    }

    fn named(value: &str) -> Result<(String, u32), String> {
        parse_value(value.as_bytes(), &http()).map(|n| (n.uri.to_string(), n.endpoint.weight))
    }

    #[test]
    fn values_bare_or_json() {
        assert_eq!(
            named("127.0.0.1:50051"),
            Ok(("http://127.0.0.1:50051/".into(), 1))
        );
        assert_eq!(named(" [::1]:7\n"), Ok(("http://[::1]:7/".into(), 1)));
        assert_eq!(
            named(r#"{"addr":"10.0.0.1:80","weight":3,"metadata":{"zone":"a"},"extra":true}"#),
            Ok(("http://10.0.0.1:80/".into(), 3))
        );
        assert_eq!(
            named(r#"{"addr":"https://svc.example:443"}"#),
            Ok(("https://svc.example:443/".into(), 1))
        );
    }

    #[test]
    fn bad_values_say_why() {
        for (value, why) in [
            ("", "host:port"),
            ("10.0.0.1", "host:port"),
            ("10.0.0.1:0", "host:port"),
            ("{", "JSON"),
            ("[1]", "host:port"),
            ("{}", "addr"),
            (r#"{"addr":7}"#, "addr"),
            (r#"{"addr":"a:1","weight":0}"#, "weight"),
            (r#"{"addr":"a:1","weight":-2}"#, "weight"),
            (r#"{"addr":"a:1","weight":1.5}"#, "weight"),
            (r#"{"addr":"a:1","weight":4294967296}"#, "weight"),
            (r#"{"addr":"a:1","metadata":[]}"#, "metadata"),
            ("u@a:1", "user"),
        ] {
            let err = named(value).unwrap_err();
            assert!(err.contains(why), "{value:?}: {err}");
        }
        assert!(
            parse_value(b"\xff:1", &http())
                .unwrap_err()
                .contains("UTF-8")
        );
    }

    fn keys(entries: &[(&str, &str)]) -> BTreeMap<Vec<u8>, Named> {
        entries
            .iter()
            .map(|(k, v)| {
                (
                    k.as_bytes().to_vec(),
                    parse_value(v.as_bytes(), &http()).unwrap(),
                )
            })
            .collect()
    }

    fn plain(changes: &[Update]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Insert(uri, e) => format!("+{uri} {}", e.weight),
                Change::Remove(uri) => format!("-{uri}"),
            })
            .collect()
    }

    #[test]
    fn weight_change_reinserts_address_change_inserts_then_removes() {
        let before = endpoints_of(&keys(&[("a", "10.0.0.1:1"), ("b", "10.0.0.2:1")]));
        let after = endpoints_of(&keys(&[
            ("a", r#"{"addr":"10.0.0.1:1","weight":5}"#),
            ("b", "10.0.0.3:1"),
        ]));
        assert_eq!(
            plain(&diff(&before, &after)),
            [
                "+http://10.0.0.1:1/ 5",
                "+http://10.0.0.3:1/ 1",
                "-http://10.0.0.2:1/"
            ]
        );
        assert!(diff(&after, &after.clone()).is_empty());
    }

    #[test]
    fn an_address_under_two_keys_is_one_endpoint_with_the_largest_weight() {
        let both = endpoints_of(&keys(&[
            ("old", "10.0.0.1:1"),
            ("new", r#"{"addr":"10.0.0.1:1","weight":4}"#),
        ]));
        assert_eq!(both.len(), 1);
        assert_eq!(both.values().next().unwrap().1.weight, 4);
        let one = endpoints_of(&keys(&[("new", r#"{"addr":"10.0.0.1:1","weight":4}"#)]));
        assert!(
            diff(&both, &one).is_empty(),
            "the old key going must not flap it"
        );
    }

    #[test]
    fn builder_rejects_bad_config_naming_the_field() {
        let field = |b: EtcdBuilder| b.build().unwrap_err().field().to_owned();
        assert_eq!(field(Etcd::builder(["127.0.0.1:2379"], "")), "etcd.prefix");
        assert_eq!(
            field(Etcd::builder(Vec::<String>::new(), "/p/")),
            "etcd.endpoints"
        );
        assert_eq!(
            field(Etcd::builder(["127.0.0.1:2379"], "/p/").scheme("a b")),
            "etcd.scheme"
        );
        assert_eq!(
            field(Etcd::builder(["127.0.0.1:2379"], "/p/").connect_timeout(Duration::ZERO)),
            "etcd.connect_timeout"
        );
        let ok = Etcd::builder(["127.0.0.1:2379"], "/p/").build().unwrap();
        assert_eq!(ok.prefix(), "/p/");
    }

    #[test]
    fn etcd_is_a_send_unpin_discover() {
        fn check<T: crate::discover::Discover + Unpin>() {}
        check::<Etcd>();
    }
}
