//! The few etcd v3 calls towline makes, on one cluster member at a time, failing over to the next.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::BoxError;
use crate::ConfigError;
use crate::backoff::{Backoff, Jitter};
use crate::status::describe_error;

/// The code generated from the vendored protos in `proto/etcd` (client side only).
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub(crate) mod pb {
    pub(crate) mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub(crate) mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub(crate) use etcdserverpb::*;
}

/// The default bound on connecting to one etcd member.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The default bound on one etcd request (a read, a put, a lease grant, the start of a watch).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on the connection to etcd: a member that vanishes without closing the connection
/// (power loss, partition) is noticed within about interval + timeout, not at the next TCP timeout.
/// 10 s stays above etcd's default `--grpc-keepalive-min-time` (5 s), so etcd never complains.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The default reconnect backoff: 200 ms, doubling, at most 5 s, ±20 % jitter. A registry
/// outage is rare and short, and a client that waits minutes after it ends serves a stale set
/// for minutes; 5 s caps that while keeping a cluster of clients from hammering etcd.
pub fn default_backoff() -> Backoff {
    Backoff::new(
        Jitter::Grpc,
        Duration::from_millis(200),
        Duration::from_secs(5),
        2.0,
    )
    .expect("valid constants")
}

/// Where etcd is and how to talk to it: shared by [`Etcd`](super::Etcd) and
/// [`Registration`](super::Registration).
#[derive(Clone)]
pub(crate) struct Cluster {
    members: Arc<[Uri]>,
    /// The member in use; advanced by [`failed`](Self::failed).
    current: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) backoff: Backoff,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("members", &self.members)
            .field("current", &self.members[self.current])
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// The connection settings both builders share, before validation.
#[derive(Debug, Clone)]
pub(crate) struct ClusterConfig {
    pub(crate) endpoints: Vec<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) backoff: Backoff,
}

impl ClusterConfig {
    pub(crate) fn new(endpoints: Vec<String>) -> Self {
        ClusterConfig {
            endpoints,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            backoff: default_backoff(),
        }
    }

    /// Validates: at least one endpoint, each `http://host:port` or `host:port`; timeouts > 0.
    pub(crate) fn build(self) -> Result<Cluster, ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::new(
                "etcd.endpoints",
                "must name at least one etcd member",
            ));
        }
        let members = self
            .endpoints
            .iter()
            .map(|e| member_uri(e))
            .collect::<Result<Vec<_>, _>>()?;
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::new(
                "etcd.connect_timeout",
                "must be greater than zero",
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::new(
                "etcd.request_timeout",
                "must be greater than zero",
            ));
        }
        Ok(Cluster {
            members: members.into(),
            // Clients of one cluster spread over its members rather than all starting on the first.
            current: fastrand::usize(..self.endpoints.len()),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            backoff: self.backoff,
        })
    }
}

fn member_uri(endpoint: &str) -> Result<Uri, ConfigError> {
    let bad = |why: String| ConfigError::new("etcd.endpoints", format!("`{endpoint}`: {why}"));
    let text = endpoint.trim();
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let uri: Uri = with_scheme
        .parse()
        .map_err(|e| bad(format!("not a URI ({e})")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https (TLS to etcd) is not supported yet; use http on a trusted network".into(),
            ));
        }
        _ => return Err(bad("the scheme must be http".into())),
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("no host".into()));
    };
    if authority.host().is_empty() || authority.port_u16().is_none() {
        return Err(bad("must be host:port".into()));
    }
    Ok(uri)
}

impl Cluster {
    /// The member calls go to.
    pub(crate) fn member(&self) -> &Uri {
        &self.members[self.current]
    }

    /// How many members there are.
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    /// The member in use failed: the next call goes to the next one.
    pub(crate) fn failed(&mut self) {
        self.current = (self.current + 1) % self.members.len();
    }

    /// How long to wait before attempt `failures + 1`: the other members are tried at once
    /// (failover should not wait), then the backoff applies once every member has failed.
    pub(crate) fn retry_delay(&self, failures: u32) -> Duration {
        let members = u32::try_from(self.members.len()).unwrap_or(u32::MAX);
        if failures < members {
            Duration::ZERO
        } else {
            self.backoff.delay(failures - members + 1, Duration::ZERO)
        }
    }

    /// A connection to the member in use.
    pub(crate) async fn connect(&self) -> Result<Conn, EtcdError> {
        let member = self.member().clone();
        let channel = Endpoint::from(member.clone())
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(|e| EtcdError::new("connect", &member, e))?;
        Ok(Conn {
            member,
            channel,
            timeout: self.request_timeout,
        })
    }
}

/// A connection to one member.
#[derive(Debug, Clone)]
pub(crate) struct Conn {
    pub(crate) member: Uri,
    pub(crate) channel: Channel,
    pub(crate) timeout: Duration,
}

impl Conn {
    /// Runs `call` bounded by the request timeout, naming `what` and the member in errors.
    pub(crate) async fn call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(status)) => Err(EtcdError::new(what, &self.member, status)),
            Err(_) => Err(EtcdError::new(
                what,
                &self.member,
                format!("no answer within {:?}", self.timeout),
            )),
        }
    }

    pub(crate) fn kv(&self) -> pb::kv_client::KvClient<Channel> {
        pb::kv_client::KvClient::new(self.channel.clone())
            // A large prefix reads in one response; etcd's own default limit is 2 GiB.
            .max_decoding_message_size(MAX_MESSAGE)
    }

    pub(crate) fn watch(&self) -> pb::watch_client::WatchClient<Channel> {
        pb::watch_client::WatchClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
    }

    pub(crate) fn lease(&self) -> pb::lease_client::LeaseClient<Channel> {
        pb::lease_client::LeaseClient::new(self.channel.clone())
    }
}

const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// A streaming request that asks `hasleader`: etcd then ends the stream when the member loses
/// its leader (as etcd's own Go client does with `WithRequireLeader`), so a watch or a keepalive
/// on a member cut off from the quorum fails over instead of going quietly silent.
pub(crate) fn require_leader<T>(stream: T) -> tonic::Request<T>
where
    T: Stream + Send + 'static,
{
    let mut request = tonic::Request::new(stream);
    request.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

/// `[prefix, prefix_end(prefix))` is every key starting with `prefix`: the prefix with its last
/// byte below 0xff incremented (and what follows dropped). All 0xff: `\0`, etcd's "to the end".
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A failed etcd call: what was attempted, on which member, and why.
#[derive(Debug)]
pub struct EtcdError {
    // Boxed: errors travel in `Result`s that are otherwise small.
    inner: Box<Inner>,
}

#[derive(Debug)]
struct Inner {
    what: String,
    member: Option<Uri>,
    source: BoxError,
}

impl EtcdError {
    pub(crate) fn new(what: impl Into<String>, member: &Uri, source: impl Into<BoxError>) -> Self {
        EtcdError {
            inner: Box::new(Inner {
                what: what.into(),
                member: Some(member.clone()),
                source: source.into(),
            }),
        }
    }

    pub(crate) fn other(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        EtcdError {
            inner: Box::new(Inner {
                what: what.into(),
                member: None,
                source: source.into(),
            }),
        }
    }

    /// The member the call went to, if it got that far.
    pub fn member(&self) -> Option<&Uri> {
        self.inner.member.as_ref()
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd {}", self.inner.what)?;
        if let Some(member) = &self.inner.member {
            write!(f, " on {member}")?;
        }
        write!(f, ": {}", describe_error(&*self.inner.source))
    }
}

impl std::error::Error for EtcdError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"/svc/"), b"/svc0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn members_parse_with_or_without_scheme() {
        let cluster = ClusterConfig::new(vec!["127.0.0.1:2379".into()])
            .build()
            .unwrap();
        assert_eq!(cluster.member().to_string(), "http://127.0.0.1:2379/");
        let field = |e: &str| ClusterConfig::new(vec![e.into()]).build().unwrap_err();
        for bad in [
            "",
            "127.0.0.1",
            "https://etcd:2379",
            "ftp://etcd:1",
            "a b:1",
        ] {
            assert_eq!(field(bad).field(), "etcd.endpoints", "{bad}");
        }
        let none = ClusterConfig::new(vec![]).build().unwrap_err();
        assert_eq!(none.field(), "etcd.endpoints");
        let mut zero = ClusterConfig::new(vec!["etcd:2379".into()]);
        zero.request_timeout = Duration::ZERO;
        assert_eq!(zero.build().unwrap_err().field(), "etcd.request_timeout");
    }

    #[test]
    fn failover_is_immediate_until_every_member_failed() {
        let cluster = ClusterConfig::new(vec!["a:1".into(), "b:1".into(), "c:1".into()])
            .build()
            .unwrap();
        assert_eq!(cluster.retry_delay(0), Duration::ZERO);
        assert_eq!(cluster.retry_delay(2), Duration::ZERO);
        assert!(cluster.retry_delay(3) >= Duration::from_millis(160));
    }
}
