//! The server side: one key under the prefix, on a lease kept alive in the background.

use std::fmt;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::client::{Cluster, ClusterConfig, pb, require_leader};
use super::{EtcdError, parse_value};
use crate::ConfigError;
use crate::backoff::Backoff;

/// The default lease TTL: a crashed server leaves every client's set within 10 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// The value [`Registration`] writes for an address: the JSON format of the
/// [module docs](super#the-value-format), `weight` and `metadata` left out when default.
///
/// ```
/// let value = towline::discover::etcd::encode_value("10.0.0.7:50051", 2, &Default::default());
/// assert_eq!(value, r#"{"addr":"10.0.0.7:50051","weight":2}"#);
/// ```
pub fn encode_value(
    addr: &str,
    weight: u32,
    metadata: &serde_json::Map<String, serde_json::Value>,
) -> String {
    let mut object = serde_json::Map::new();
    object.insert("addr".into(), addr.into());
    if weight != 1 {
        object.insert("weight".into(), weight.into());
    }
    if !metadata.is_empty() {
        object.insert("metadata".into(), metadata.clone().into());
    }
    serde_json::Value::Object(object).to_string()
}

/// Announces one endpoint under a prefix for as long as it lives; see the
/// [module docs](super).
///
/// [`RegistrationBuilder::register`] grants a lease with the TTL, puts the key with it, and
/// returns once that worked; a background task then keeps the lease alive (a `LeaseKeepAlive`
/// stream, a keepalive every TTL/3). When etcd is unreachable it reconnects with backoff, to the
/// next member first; when the lease is gone (it expired during a long outage, or someone
/// revoked it) it grants a new one and puts the key again.
///
/// - [`deregister`](Self::deregister): revokes the lease (the key goes at once) and stops.
/// - Drop: the same, best effort, in the background (on the runtime that registered).
/// - [`abandon`](Self::abandon), or a crash: keepalives stop, the lease expires within its TTL
///   and etcd deletes the key.
pub struct Registration {
    key: String,
    lease: watch::Receiver<Option<i64>>,
    stop: Option<oneshot::Sender<Stop>>,
    task: Option<JoinHandle<()>>,
}

/// How the background task ends.
enum Stop {
    /// Revoke the lease, and report how that went if asked.
    Revoke(Option<oneshot::Sender<Result<(), EtcdError>>>),
}

impl Registration {
    /// Registers `addr` (`host:port`, or `http://host:port`) under `prefix` in the etcd cluster
    /// whose client URLs are `endpoints` (`http://host:port` or `host:port`).
    pub fn builder<I>(
        endpoints: I,
        prefix: impl Into<String>,
        addr: impl Into<String>,
    ) -> RegistrationBuilder
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        RegistrationBuilder {
            cluster: ClusterConfig::new(
                endpoints
                    .into_iter()
                    .map(|e| e.as_ref().to_owned())
                    .collect(),
            ),
            prefix: prefix.into(),
            addr: addr.into(),
            name: None,
            weight: 1,
            metadata: serde_json::Map::new(),
            ttl: DEFAULT_TTL,
        }
    }

    /// The key written: the prefix and the name.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease the key is attached to now; `None` while registering again.
    pub fn lease_id(&self) -> Option<i64> {
        *self.lease.borrow()
    }

    /// Revokes the lease, so the key is deleted and every client removes the endpoint now, and
    /// stops the keepalives. An error means the revoke did not reach etcd (on any member): the
    /// key then goes when the lease expires, within its TTL.
    pub async fn deregister(mut self) -> Result<(), EtcdError> {
        let (tx, rx) = oneshot::channel();
        let Some(stop) = self.stop.take() else {
            return Ok(());
        };
        if stop.send(Stop::Revoke(Some(tx))).is_err() {
            return Err(EtcdError::other(
                "deregister",
                "the registration task is gone (its runtime stopped)",
            ));
        }
        rx.await.unwrap_or_else(|_| {
            Err(EtcdError::other(
                "deregister",
                "the registration task is gone (its runtime stopped)",
            ))
        })
    }

    /// Stops keeping the lease alive without revoking it, as a crash would: the key stays until
    /// the lease's TTL runs out. For tests of what clients do when a server dies, and for a
    /// process that hands its key over to a successor.
    pub fn abandon(mut self) {
        self.stop = None;
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // Best effort: the task revokes the lease on its own; if the runtime is gone the
            // lease expires instead.
            let _ = stop.send(Stop::Revoke(None));
        }
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("lease_id", &self.lease_id())
            .finish_non_exhaustive()
    }
}

/// Configures a [`Registration`]; defaults are documented on each method.
#[derive(Debug, Clone)]
#[must_use]
pub struct RegistrationBuilder {
    cluster: ClusterConfig,
    prefix: String,
    addr: String,
    name: Option<String>,
    weight: u32,
    metadata: serde_json::Map<String, serde_json::Value>,
    ttl: Duration,
}

impl RegistrationBuilder {
    /// The key under the prefix: `prefix + name`. Default: the address, so two registrations
    /// of one address share a key. Use an instance id to tell restarts apart.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The endpoint's weight, at least 1. Default 1.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Metadata written with the address. Default none.
    pub fn metadata(mut self, metadata: serde_json::Map<String, serde_json::Value>) -> Self {
        self.metadata = metadata;
        self
    }

    /// The lease's time to live, in whole seconds (rounded up), at least 1 s: how long after a
    /// crash the key lasts. etcd may raise a short TTL to its minimum (about 2 s with default
    /// settings). Default [`DEFAULT_TTL`] (10 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The bound on connecting to one member. Default
    /// [`DEFAULT_CONNECT_TIMEOUT`](super::DEFAULT_CONNECT_TIMEOUT) (3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.cluster.connect_timeout = timeout;
        self
    }

    /// The bound on one request (grant, put, revoke, a keepalive's answer). Default
    /// [`DEFAULT_REQUEST_TIMEOUT`](super::DEFAULT_REQUEST_TIMEOUT) (5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.cluster.request_timeout = timeout;
        self
    }

    /// The delay between attempts once every member has failed. Default
    /// [`default_backoff`](super::default_backoff): 200 ms doubling to 5 s, ±20 %.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.cluster.backoff = backoff;
        self
    }

    fn validate(self) -> Result<Registrar, ConfigError> {
        if self.prefix.is_empty() {
            return Err(ConfigError::new("etcd.prefix", "must not be empty"));
        }
        parse_value(self.addr.as_bytes(), &http::uri::Scheme::HTTP)
            .map_err(|why| ConfigError::new("etcd.addr", why))?;
        if self.weight == 0 {
            return Err(ConfigError::new("etcd.weight", "must be at least 1"));
        }
        let name = self.name.unwrap_or_else(|| self.addr.clone());
        if name.is_empty() {
            return Err(ConfigError::new("etcd.name", "must not be empty"));
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(ConfigError::new("etcd.ttl", "must be at least 1 s"));
        }
        let ttl = i64::try_from(self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0))
            .map_err(|_| ConfigError::new("etcd.ttl", "is too large"))?;
        let value = encode_value(&self.addr, self.weight, &self.metadata);
        Ok(Registrar {
            cluster: self.cluster.build()?,
            key: format!("{}{name}", self.prefix),
            value: value.into_bytes(),
            ttl,
            granted_ttl: ttl,
        })
    }

    /// Validates, grants a lease and puts the key (trying each member once), then keeps the
    /// lease alive in the background. Config errors name the field: `etcd.endpoints`,
    /// `etcd.prefix`, `etcd.addr`, `etcd.name`, `etcd.weight`, `etcd.ttl`,
    /// `etcd.connect_timeout`, `etcd.request_timeout`. Needs a Tokio runtime.
    pub async fn register(self) -> Result<Registration, RegisterError> {
        let mut registrar = self.validate()?;
        let mut last = None;
        let mut lease = None;
        for _ in 0..registrar.cluster.len() {
            match registrar.register_once().await {
                Ok(id) => {
                    lease = Some(id);
                    break;
                }
                Err(err) => {
                    registrar.cluster.failed();
                    last = Some(err);
                }
            }
        }
        let Some(lease) = lease else {
            return Err(RegisterError::Etcd(last.unwrap_or_else(|| {
                EtcdError::other("register", "no member to try")
            })));
        };
        let key = registrar.key.clone();
        let (lease_tx, lease_rx) = watch::channel(Some(lease));
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(registrar.run(lease, lease_tx, stop_rx));
        Ok(Registration {
            key,
            lease: lease_rx,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

/// What the background task knows.
struct Registrar {
    cluster: Cluster,
    key: String,
    value: Vec<u8>,
    /// The TTL asked for, in seconds.
    ttl: i64,
    /// The TTL etcd granted (it may raise a short one); keepalives go every third of it.
    granted_ttl: i64,
}

/// How keeping a lease alive ended, short of an error.
enum KeepAliveEnd {
    /// etcd says the lease is gone: register again.
    LeaseLost,
}

impl Registrar {
    /// Grants a lease and puts the key with it, on the member in use.
    async fn register_once(&mut self) -> Result<i64, EtcdError> {
        let conn = self.cluster.connect().await?;
        let grant = conn
            .call(
                "lease grant",
                conn.lease().lease_grant(pb::LeaseGrantRequest {
                    ttl: self.ttl,
                    id: 0,
                }),
            )
            .await?
            .into_inner();
        if !grant.error.is_empty() {
            return Err(EtcdError::new("lease grant", &conn.member, grant.error));
        }
        self.granted_ttl = grant.ttl.max(1);
        conn.call(
            "put",
            conn.kv().put(pb::PutRequest {
                key: self.key.clone().into_bytes(),
                value: self.value.clone(),
                lease: grant.id,
            }),
        )
        .await?;
        tracing::info!(key = %self.key, lease = grant.id, ttl = grant.ttl, member = %conn.member, "etcd registration: registered");
        Ok(grant.id)
    }

    /// Keeps `lease` alive on the member in use until the connection fails or the lease is gone.
    async fn keep_alive(&self, lease: i64, failures: &mut u32) -> Result<KeepAliveEnd, EtcdError> {
        let conn = self.cluster.connect().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let requests = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|request| (request, rx))
        });
        // Opening the stream waits for response headers, which etcd sends with its first
        // answer: queue the first keepalive before asking.
        let _ = tx.try_send(pb::LeaseKeepAliveRequest { id: lease });
        let mut answers = conn
            .call(
                "lease keepalive",
                conn.lease().lease_keep_alive(require_leader(requests)),
            )
            .await?
            .into_inner();
        let interval = Duration::from_secs(u64::try_from(self.granted_ttl).unwrap_or(1)) / 3;
        loop {
            let answer = conn
                .call("lease keepalive", answers.message())
                .await?
                .ok_or_else(|| {
                    EtcdError::new("lease keepalive", &conn.member, "the stream ended")
                })?;
            if answer.ttl <= 0 {
                return Ok(KeepAliveEnd::LeaseLost);
            }
            *failures = 0;
            tokio::time::sleep(interval).await;
            if tx
                .send(pb::LeaseKeepAliveRequest { id: lease })
                .await
                .is_err()
            {
                return Err(EtcdError::new(
                    "lease keepalive",
                    &conn.member,
                    "the request stream closed",
                ));
            }
        }
    }

    /// Revokes `lease`, trying each member once.
    async fn revoke(&mut self, lease: i64) -> Result<(), EtcdError> {
        let mut last = None;
        for _ in 0..self.cluster.len() {
            let attempt = async {
                let conn = self.cluster.connect().await?;
                conn.call(
                    "lease revoke",
                    conn.lease()
                        .lease_revoke(pb::LeaseRevokeRequest { id: lease }),
                )
                .await
            };
            match attempt.await {
                Ok(_) => {
                    tracing::info!(key = %self.key, lease, "etcd registration: lease revoked");
                    return Ok(());
                }
                // Revoking a lease that is already gone is what was wanted.
                Err(err) if err.to_string().contains("requested lease not found") => return Ok(()),
                Err(err) => {
                    self.cluster.failed();
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::other("lease revoke", "no member to try")))
    }

    async fn run(
        mut self,
        lease: i64,
        lease_tx: watch::Sender<Option<i64>>,
        mut stop: oneshot::Receiver<Stop>,
    ) {
        let mut current = Some(lease);
        let mut failures = 0u32;
        loop {
            let delay = if failures == 0 {
                Duration::ZERO
            } else {
                self.cluster.retry_delay(failures - 1)
            };
            // The step is written inside `select!` so that its borrow of `self` ends before the
            // stop branch revokes.
            let outcome = tokio::select! {
                outcome = async {
                    tokio::time::sleep(delay).await;
                    match current {
                        Some(lease) => self.keep_alive(lease, &mut failures).await.map(|end| match end {
                            KeepAliveEnd::LeaseLost => None,
                        }),
                        None => self.register_once().await.map(Some),
                    }
                } => outcome,
                stop = &mut stop => {
                    let Ok(Stop::Revoke(reply)) = stop else {
                        // The `Registration` is gone without a word (abandoned): stop quietly.
                        return;
                    };
                    let result = match current {
                        Some(lease) => self.revoke(lease).await,
                        None => Ok(()),
                    };
                    if let Err(err) = &result {
                        tracing::warn!(key = %self.key, "etcd registration: {err}; the key goes when its lease expires");
                    }
                    let _ = lease_tx.send(None);
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                    return;
                }
            };
            match outcome {
                Ok(Some(lease)) => {
                    if current != Some(lease) {
                        current = Some(lease);
                        let _ = lease_tx.send(Some(lease));
                    }
                    failures = 0;
                }
                Ok(None) => {
                    tracing::warn!(key = %self.key, lease = ?current, "etcd registration: the lease is gone; registering again");
                    current = None;
                    let _ = lease_tx.send(None);
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(key = %self.key, failures, "etcd registration: {err}; retrying");
                    self.cluster.failed();
                }
            }
        }
    }
}

/// Why [`RegistrationBuilder::register`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum RegisterError {
    /// The configuration cannot work.
    Config(ConfigError),
    /// No etcd member accepted the registration.
    Etcd(EtcdError),
}

impl From<ConfigError> for RegisterError {
    fn from(err: ConfigError) -> Self {
        RegisterError::Config(err)
    }
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegisterError::Config(err) => write!(f, "invalid etcd registration: {err}"),
            RegisterError::Etcd(err) => write!(f, "etcd registration failed: {err}"),
        }
    }
}

impl std::error::Error for RegisterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RegisterError::Config(err) => Some(err),
            RegisterError::Etcd(err) => Some(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(builder: RegistrationBuilder) -> String {
        match builder.validate() {
            Err(err) => err.field().to_owned(),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn builder_rejects_bad_config_naming_the_field() {
        let b = || Registration::builder(["127.0.0.1:2379"], "/svc/", "127.0.0.1:50051");
        assert_eq!(field(b().ttl(Duration::from_millis(500))), "etcd.ttl");
        assert_eq!(field(b().weight(0)), "etcd.weight");
        assert_eq!(field(b().name("")), "etcd.name");
        assert_eq!(
            field(Registration::builder(
                ["127.0.0.1:2379"],
                "/svc/",
                "no-port"
            )),
            "etcd.addr"
        );
        assert_eq!(
            field(Registration::builder(["127.0.0.1:2379"], "", "a:1")),
            "etcd.prefix"
        );
        assert_eq!(
            field(Registration::builder(["https://e:1"], "/svc/", "a:1")),
            "etcd.endpoints"
        );
    }

    #[test]
    fn the_key_is_prefix_and_name_and_the_ttl_rounds_up() {
        let Ok(r) = Registration::builder(["127.0.0.1:2379"], "/svc/", "127.0.0.1:50051")
            .ttl(Duration::from_millis(2500))
            .validate()
        else {
            panic!("rejected")
        };
        assert_eq!(r.key, "/svc/127.0.0.1:50051");
        assert_eq!(r.ttl, 3);
        let mut metadata = serde_json::Map::new();
        metadata.insert("zone".into(), "a".into());
        let value = encode_value("10.0.0.1:1", 1, &metadata);
        assert_eq!(value, r#"{"addr":"10.0.0.1:1","metadata":{"zone":"a"}}"#);
        let parsed = parse_value(value.as_bytes(), &http::uri::Scheme::HTTP).unwrap();
        assert_eq!(parsed.endpoint.weight, 1);
    }
}
