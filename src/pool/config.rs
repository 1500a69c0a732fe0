//! [`PoolConfig`]: every knob of a pool, validated once when it is built.

use std::time::Duration;

use tonic::transport::Endpoint;

use crate::ConfigError;
use crate::connect::{Connect, DEFAULT_CONNECT_TIMEOUT, Keepalive};

use crate::backoff::Backoff;

/// Default [`PoolConfigBuilder::min_connections`]: one connection kept warm.
pub const DEFAULT_MIN_CONNECTIONS: usize = 1;
/// Default [`PoolConfigBuilder::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 4;
/// Default [`PoolConfigBuilder::max_streams_per_connection`]: the `SETTINGS_MAX_CONCURRENT_STREAMS`
/// most gRPC servers and proxies announce (grpc-java, grpc-c++ via proxies, Envoy).
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: usize = 100;
/// Default [`PoolConfigBuilder::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`PoolConfigBuilder::wait_timeout`]: as long as a first connect may take, so a call
/// made while the pool is still connecting is never failed before the connect had its chance.
pub const DEFAULT_WAIT_TIMEOUT: Duration = DEFAULT_CONNECT_TIMEOUT;

/// How a pool opens, grows, reaps and re-opens connections to its one target.
///
/// Build it with [`PoolConfig::builder`]; [`PoolConfig::default`] is the builder's defaults.
///
/// | setting | default |
/// |---|---|
/// | `min_connections` / `max_connections` | 1 / 4 |
/// | `max_streams_per_connection` | 100 |
/// | `idle_timeout` (connections above `min`) | 60 s |
/// | `connect_timeout` | 20 s |
/// | `wait_timeout` (a call waiting for a connection) | 20 s |
/// | reconnect backoff | 1 s initial, ×1.6, ±20 % jitter, 120 s max (gRPC connection-backoff) |
/// | connect | eager |
/// | HTTP/2 keepalive | off (see [`PoolConfigBuilder::keepalive`]) |
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) max_streams: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) wait_timeout: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) lazy: bool,
    pub(crate) keepalive: Option<Keepalive>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min: DEFAULT_MIN_CONNECTIONS,
            max: DEFAULT_MAX_CONNECTIONS,
            max_streams: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            backoff: Backoff::grpc_connection(),
            lazy: false,
            keepalive: None,
        }
    }
}

impl PoolConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> PoolConfigBuilder {
        PoolConfigBuilder {
            config: PoolConfig::default(),
            keepalive_while_idle: None,
        }
    }

    /// Connections kept open even when idle.
    pub fn min_connections(&self) -> usize {
        self.min
    }

    /// The most connections the pool opens.
    pub fn max_connections(&self) -> usize {
        self.max
    }

    /// Calls one connection carries before the pool prefers to open another.
    pub fn max_streams_per_connection(&self) -> usize {
        self.max_streams
    }

    /// How long a call waits for a connection while none is up.
    pub fn wait_timeout(&self) -> Duration {
        self.wait_timeout
    }

    /// How long one connection attempt may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// How long a connection above `min_connections` may stay idle before it is closed.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Applies this configuration's endpoint settings (connect timeout, HTTP/2 keepalive, the
    /// interval doubled for every `too_many_pings` the endpoint's target sent, gRFC A8) to a
    /// tonic [`Endpoint`]. The pool itself is generic over its connector and cannot reach the
    /// endpoint: pass this to [`Connect::configure`], or use [`PoolConfig::connector`].
    pub fn configure_endpoint(&self, endpoint: Endpoint) -> Endpoint {
        let endpoint = endpoint.connect_timeout(self.connect_timeout);
        match &self.keepalive {
            Some(keepalive) => {
                let target = endpoint.uri().clone();
                keepalive.apply(&target, endpoint)
            }
            None => endpoint,
        }
    }

    /// A [`Connect`] whose endpoints carry this configuration's connect timeout and keepalive.
    /// It connects eagerly: the pool decides when to connect, and a connect that fails must fail
    /// its attempt so the pool can back off.
    pub fn connector(&self) -> Connect {
        let timeout = self.connect_timeout;
        Connect::new()
            .with_keepalive(self.keepalive)
            .configure(move |endpoint| endpoint.connect_timeout(timeout))
    }
}

/// Builds a [`PoolConfig`]; [`build`](Self::build) rejects settings that cannot work.
#[derive(Debug, Clone)]
pub struct PoolConfigBuilder {
    config: PoolConfig,
    keepalive_while_idle: Option<bool>,
}

impl PoolConfigBuilder {
    /// A fixed-size pool: exactly `n` connections, opened up front (unless lazy) and never reaped.
    pub fn size(mut self, n: usize) -> Self {
        self.config.min = n;
        self.config.max = n;
        self
    }

    /// Connections kept open even when idle (default 1). May be 0: then every connection is
    /// reaped once idle, and the next call opens one again.
    pub fn min_connections(mut self, n: usize) -> Self {
        self.config.min = n;
        self
    }

    /// The most connections the pool opens (default 4).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max = n;
        self
    }

    /// Calls one connection should carry at most (default 100).
    ///
    /// h2 knows the server's `SETTINGS_MAX_CONCURRENT_STREAMS`, but tonic's `Channel` does not
    /// expose it, so the pool works from this configured figure: set it to what your server
    /// announces. When every open connection is at 90 % of it the pool opens another (up to
    /// `max_connections`); when every connection is full and another is being opened, calls wait
    /// for it; at `max_connections` calls go to the least-loaded connection anyway and h2 queues
    /// them.
    pub fn max_streams_per_connection(mut self, n: usize) -> Self {
        self.config.max_streams = n;
        self
    }

    /// How long a connection above `min_connections` may stay idle before it is closed (default 60 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// How long one connection attempt may take before it counts as failed (default 20 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// How long a call waits for a connection while none is up before it fails with
    /// `UNAVAILABLE` (default 20 s).
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.config.wait_timeout = timeout;
        self
    }

    /// The reconnect backoff (validated when it is built). Default:
    /// [`Backoff::grpc_connection`], 1 s × 1.6 up to 120 s, ±20% jitter.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Open connections only when the first call needs one (default: eager, `min_connections`
    /// opened as soon as the pool is made, and making it fails if none of them can be opened).
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.config.lazy = lazy;
        self
    }

    /// HTTP/2 keepalive: a PING every `interval`, the connection closed if no answer within
    /// `timeout`. Applied by [`PoolConfig::configure_endpoint`] / [`PoolConfig::connector`].
    /// What servers accept, and how towline adapts to `too_many_pings`: [`Connect::keepalive`].
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        Keepalive::warn_if_too_frequent(interval);
        self.config.keepalive = Some(Keepalive {
            interval,
            timeout,
            while_idle: false,
        });
        self
    }

    /// Send keepalive PINGs also while no call is in flight (default false). Takes effect with
    /// [`keepalive`](Self::keepalive), before or after it.
    pub fn keepalive_while_idle(mut self, enabled: bool) -> Self {
        self.keepalive_while_idle = Some(enabled);
        self
    }

    /// Checks the settings and returns the configuration.
    pub fn build(self) -> Result<PoolConfig, ConfigError> {
        let mut c = self.config;
        if let (Some(keepalive), Some(while_idle)) = (&mut c.keepalive, self.keepalive_while_idle) {
            keepalive.while_idle = while_idle;
        }
        if c.max == 0 {
            return Err(ConfigError::new(
                "pool.max_connections",
                "must be at least 1",
            ));
        }
        if c.min > c.max {
            return Err(ConfigError::new(
                "pool.min_connections",
                format!("{} is more than max_connections ({})", c.min, c.max),
            ));
        }
        if c.max_streams == 0 {
            return Err(ConfigError::new(
                "pool.max_streams_per_connection",
                "must be at least 1",
            ));
        }
        for (field, value) in [
            ("pool.idle_timeout", c.idle_timeout),
            ("pool.connect_timeout", c.connect_timeout),
            ("pool.wait_timeout", c.wait_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(field, "must be more than zero"));
            }
        }
        if let Some(Keepalive {
            interval, timeout, ..
        }) = c.keepalive
        {
            if interval.is_zero() {
                return Err(ConfigError::new(
                    "pool.keepalive.interval",
                    "must be more than zero",
                ));
            }
            if timeout.is_zero() {
                return Err(ConfigError::new(
                    "pool.keepalive.timeout",
                    "must be more than zero",
                ));
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(builder: PoolConfigBuilder) -> String {
        builder.build().expect_err("invalid").field().to_owned()
    }

    #[test]
    fn defaults_are_valid_and_documented() {
        let c = PoolConfig::builder().build().unwrap();
        assert_eq!((c.min, c.max, c.max_streams), (1, 4, 100));
        assert_eq!(c.connect_timeout, Duration::from_secs(20));
        assert_eq!(c.wait_timeout, Duration::from_secs(20));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.backoff, Backoff::grpc_connection());
        assert!(!c.lazy);
    }

    #[test]
    fn bad_settings_fail_naming_the_field() {
        let b = PoolConfig::builder;
        assert_eq!(field_of(b().size(0)), "pool.max_connections");
        assert_eq!(
            field_of(b().min_connections(5).max_connections(2)),
            "pool.min_connections"
        );
        assert_eq!(
            field_of(b().max_streams_per_connection(0)),
            "pool.max_streams_per_connection"
        );
        assert_eq!(
            field_of(b().idle_timeout(Duration::ZERO)),
            "pool.idle_timeout"
        );
        assert_eq!(
            field_of(b().connect_timeout(Duration::ZERO)),
            "pool.connect_timeout"
        );
        assert_eq!(
            field_of(b().wait_timeout(Duration::ZERO)),
            "pool.wait_timeout"
        );
        let s = Duration::from_secs(1);
        assert_eq!(
            field_of(b().keepalive(Duration::ZERO, s)),
            "pool.keepalive.interval"
        );
        assert_eq!(
            field_of(b().keepalive(s, Duration::ZERO)),
            "pool.keepalive.timeout"
        );
        let err = b().size(0).build().unwrap_err();
        assert_eq!(err.to_string(), "pool.max_connections: must be at least 1");
    }

    #[test]
    fn min_zero_and_fixed_sizes_are_valid() {
        let c = PoolConfig::builder().min_connections(0).build().unwrap();
        assert_eq!((c.min, c.max), (0, 4));
        let c = PoolConfig::builder().size(8).build().unwrap();
        assert_eq!((c.min, c.max), (8, 8));
    }
}
