//! Active health checks over `grpc.health.v1`: a `Watch` stream per connection (gRFC A17), or a
//! periodic `Check` with HAProxy-style `rise`/`fall` thresholds.
//!
//! The balancer runs the configured check on each endpoint's connection and sends it calls only
//! while the check says `SERVING`.
//!
//! - **Watch** (gRFC A17): one server-streaming call per connection; every status the server
//!   pushes takes effect at once. `SERVING` means ready, anything else not ready. A server without
//!   the health service (`UNIMPLEMENTED`) is treated as healthy and logged once, never retried.
//!   Other stream errors mark the endpoint not ready and re-watch with exponential backoff,
//!   reset after a message.
//! - **Check**: a `Check` call every `interval` (± `jitter`) bounded by `timeout`. The first
//!   answer decides the initial state; after that `rise` successes in a row make the endpoint
//!   healthy and `fall` failures in a row make it unhealthy (HAProxy's `rise 2 fall 3`).
//!
//! ```
//! use std::time::Duration;
//! use towline::health::HealthCheck;
//!
//! let watch = HealthCheck::watch("my.package.MyService");
//! let poll = HealthCheck::check("")
//!     .interval(Duration::from_secs(2))
//!     .timeout(Duration::from_secs(1))
//!     .rise(2)
//!     .fall(3);
//! assert!(poll.validate().is_ok());
//! let err = HealthCheck::check("").rise(0).build().unwrap_err();
//! assert_eq!(err.to_string(), "health_check.rise: must be greater than zero");
//! // A watch has no interval: a check-mode setting on it is an error, not ignored.
//! let err = watch.interval(Duration::from_secs(5)).build().unwrap_err();
//! assert_eq!(err.field(), "health_check.interval");
//! ```
//!
//! A check is validated when the balancer's config is built
//! ([`BalanceConfigBuilder::build`](crate::balance::BalanceConfigBuilder::build)), or earlier
//! with [`HealthCheck::build`].

use std::time::Duration;

use bytes::Bytes;
use tonic::Code;
use tonic::body::Body;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::backoff::{Backoff, Jitter};
use crate::{BoxError, ConfigError};

/// Which active health check to run on each endpoint, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    service: String,
    mode: Mode,
    /// The first check-mode setting given to a watch, which has none: an error at build time
    /// rather than a setting silently ignored.
    watch_setting: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Watch,
    Check(CheckPolicy),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct CheckPolicy {
    interval: Duration,
    timeout: Duration,
    rise: u32,
    fall: u32,
    jitter: f64,
}

impl HealthCheck {
    /// `grpc.health.v1.Health/Watch` for `service` (`""` is the whole server).
    pub fn watch(service: impl Into<String>) -> Self {
        HealthCheck {
            service: service.into(),
            mode: Mode::Watch,
            watch_setting: None,
        }
    }

    /// Periodic `grpc.health.v1.Health/Check` for `service`. Defaults: every 2 s with ±10%
    /// jitter, 1 s timeout, `rise 2 fall 3`.
    pub fn check(service: impl Into<String>) -> Self {
        HealthCheck {
            service: service.into(),
            mode: Mode::Check(CheckPolicy {
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                rise: 2,
                fall: 3,
                jitter: 0.1,
            }),
            watch_setting: None,
        }
    }

    /// Changes a check-mode setting; on a watch, which has none, remembers it for the error.
    fn with_policy(mut self, field: &'static str, set: impl FnOnce(&mut CheckPolicy)) -> Self {
        match &mut self.mode {
            Mode::Check(policy) => set(policy),
            Mode::Watch => {
                self.watch_setting.get_or_insert(field);
            }
        }
        self
    }

    /// Time between checks (check mode). Must be > 0. It runs from the end of one check to the
    /// start of the next, so it need not exceed the timeout: checks never overlap.
    pub fn interval(self, value: Duration) -> Self {
        self.with_policy("health_check.interval", |p| p.interval = value)
    }

    /// How long one check may take before it counts as failed (check mode). Must be > 0.
    pub fn timeout(self, value: Duration) -> Self {
        self.with_policy("health_check.timeout", |p| p.timeout = value)
    }

    /// Successes in a row that make an unhealthy endpoint healthy (check mode). Must be > 0.
    pub fn rise(self, value: u32) -> Self {
        self.with_policy("health_check.rise", |p| p.rise = value)
    }

    /// Failures in a row that make a healthy endpoint unhealthy (check mode). Must be > 0.
    pub fn fall(self, value: u32) -> Self {
        self.with_policy("health_check.fall", |p| p.fall = value)
    }

    /// Spread each interval by up to ± this fraction, so that many clients do not check in
    /// lockstep (check mode). Between 0 and 1.
    pub fn jitter(self, value: f64) -> Self {
        self.with_policy("health_check.jitter", |p| p.jitter = value)
    }

    /// The health service name checked.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Checks every field and returns the check, as every towline builder's `build` does. The
    /// balancer's config builder checks it too: calling this is only needed to fail earlier.
    pub fn build(self) -> Result<HealthCheck, ConfigError> {
        self.validate()?;
        Ok(self)
    }

    /// Checks every field; the balancer's config builder calls this. Errors name the field:
    /// `health_check.interval`, `.timeout`, `.rise`, `.fall` or `.jitter`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(field) = self.watch_setting {
            return Err(ConfigError::new(
                field,
                "applies to a periodic Check only; a Watch has no such setting \
                 (use HealthCheck::check)",
            ));
        }
        if let Mode::Check(CheckPolicy {
            interval,
            timeout,
            rise,
            fall,
            jitter,
        }) = &self.mode
        {
            if interval.is_zero() {
                return Err(ConfigError::new(
                    "health_check.interval",
                    "must be greater than zero",
                ));
            }
            if timeout.is_zero() {
                return Err(ConfigError::new(
                    "health_check.timeout",
                    "must be greater than zero",
                ));
            }
            if *rise == 0 {
                return Err(ConfigError::new(
                    "health_check.rise",
                    "must be greater than zero",
                ));
            }
            if *fall == 0 {
                return Err(ConfigError::new(
                    "health_check.fall",
                    "must be greater than zero",
                ));
            }
            if !(0.0..=1.0).contains(jitter) {
                return Err(ConfigError::new(
                    "health_check.jitter",
                    "must be between 0 and 1",
                ));
            }
        }
        Ok(())
    }
}

/// What a health check concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Serving,
    NotServing(String),
}

/// Runs `check` over one endpoint service, reporting verdicts as they change, until a connection
/// the service does not manage itself (a bare tonic `Channel`) fails: then returns that error so
/// the caller reconnects.
///
/// A service that keeps its own connections (a [`Pool`](crate::pool::Pool)) answers a lost
/// connection with its own status, marked [`PoolConnectionError`](crate::pool::PoolConnectionError):
/// that is no health verdict. `trouble` is called so
/// the caller can look at the service's readiness, the last verdict stands, and the check goes on
/// over the service's other (or next) connection. Likewise a `Watch` stream that had delivered a
/// status and then ended (its connection's GOAWAY at a server's max connection age, a graceful
/// restart) is watched again without a verdict: only what the new stream says counts.
pub(crate) async fn run<S, RB>(
    check: &HealthCheck,
    service: S,
    mut report: impl FnMut(Verdict),
    mut trouble: impl FnMut(),
) -> BoxError
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<RB>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError> + Send,
{
    let mut client = HealthClient::new(service);
    let mut last: Option<Verdict> = None;
    let mut report = move |verdict: Option<Verdict>| match verdict {
        // A new stream or connection: whatever it says next is reported, even if unchanged,
        // since the balancer may have forgotten the verdict meanwhile.
        None => last = None,
        Some(verdict) => {
            if last.as_ref() != Some(&verdict) {
                last = Some(verdict.clone());
                report(verdict);
            }
        }
    };
    let request = || HealthCheckRequest {
        service: check.service.clone(),
    };
    match check.mode {
        Mode::Watch => {
            // Re-watch after 100 ms doubling to 10 s, ±20%; any message starts it over (gRFC A17).
            let backoff = Backoff::new(
                Jitter::Grpc,
                Duration::from_millis(100),
                Duration::from_secs(10),
                2.0,
            )
            .expect("a valid backoff");
            let mut failures = 0u32;
            loop {
                let mut delivered = false;
                let ended = match client.watch(request()).await {
                    Ok(response) => {
                        report(None);
                        let mut stream = response.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(message)) => {
                                    failures = 0;
                                    delivered = true;
                                    report(Some(verdict(&message)));
                                }
                                Ok(None) => break Failure::Other("health watch ended".into()),
                                Err(status) => break classify(status, "health watch failed"),
                            }
                        }
                    }
                    Err(status) if status.code() == Code::Unimplemented => {
                        tracing::warn!(
                            service = %check.service,
                            "endpoint does not implement grpc.health.v1 Watch; treating it as healthy"
                        );
                        report(Some(Verdict::Serving));
                        return std::future::pending().await;
                    }
                    Err(status) => classify(status, "health watch failed"),
                };
                match ended {
                    Failure::OwnConnection(err) => return err,
                    // Not the server's verdict: the connection under the stream went away.
                    Failure::ServiceUnavailable(_) => trouble(),
                    // A stream that had spoken and then ended: watched again, verdict kept.
                    Failure::Other(_) if delivered => trouble(),
                    Failure::Other(reason) => report(Some(Verdict::NotServing(reason))),
                }
                failures = failures.saturating_add(1);
                tokio::time::sleep(backoff.delay(failures, Duration::ZERO)).await;
            }
        }
        Mode::Check(CheckPolicy {
            interval,
            timeout,
            rise,
            fall,
            jitter,
        }) => {
            let (mut successes, mut failures, mut first) = (0u32, 0u32, true);
            loop {
                let outcome = match tokio::time::timeout(timeout, client.check(request())).await {
                    Ok(Ok(response)) => match verdict(response.get_ref()) {
                        Verdict::Serving => Ok(()),
                        Verdict::NotServing(reason) => Err(reason),
                    },
                    Ok(Err(status)) if status.code() == Code::Unimplemented => Ok(()),
                    Ok(Err(status)) => match classify(status, "health check failed") {
                        Failure::OwnConnection(err) => return err,
                        Failure::ServiceUnavailable(reason) => {
                            trouble();
                            Err(reason)
                        }
                        Failure::Other(reason) => Err(reason),
                    },
                    Err(_) => Err(format!(
                        "health check timed out after {}",
                        crate::status::HumanDuration(timeout)
                    )),
                };
                match outcome {
                    Ok(()) => {
                        successes = successes.saturating_add(1);
                        failures = 0;
                        if first || successes >= rise {
                            report(Some(Verdict::Serving));
                        }
                    }
                    Err(reason) => {
                        failures = failures.saturating_add(1);
                        successes = 0;
                        if first || failures >= fall {
                            report(Some(Verdict::NotServing(reason)));
                        }
                    }
                }
                first = false;
                let spread = 1.0 + jitter * (2.0 * fastrand::f64() - 1.0);
                // `try_from` rather than `mul_f64`: a huge interval must not overflow (it means "rarely").
                let pause = Duration::try_from_secs_f64(interval.as_secs_f64() * spread)
                    .unwrap_or(Duration::MAX);
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Why a health call or stream failed.
enum Failure {
    /// A bare connection broke (tonic `Channel`): only a new connection helps.
    OwnConnection(BoxError),
    /// The service answered `UNAVAILABLE` itself (a pool whose connection broke or is not back
    /// yet): a matter of its readiness, not of health.
    ServiceUnavailable(String),
    /// The health service failed or ended the call.
    Other(String),
}

fn classify(status: tonic::Status, what: &str) -> Failure {
    let source = std::error::Error::source(&status);
    let chain = || std::iter::successors(source, |e| e.source());
    let reason = || format!("{what}: {}", crate::status::describe_error(&status));
    // A pool's status about one of its connections: the pool replaces it by itself.
    if chain().any(|e| e.is::<crate::pool::PoolConnectionError>()) {
        return Failure::ServiceUnavailable(reason());
    }
    // A bare connection (tonic `Channel`) failed: under the call (the service's own error), or
    // under the stream (tonic reports that as `UNKNOWN` over the transport error). Only a new
    // connection helps: a `Channel` stays "ready" while it reconnects lazily.
    let transport_failed =
        source.is_some_and(|s| crate::status::code_from_error(s) == Code::Unavailable);
    if transport_failed {
        return Failure::OwnConnection(Box::new(status));
    }
    Failure::Other(reason())
}

fn verdict(response: &HealthCheckResponse) -> Verdict {
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => Verdict::Serving,
        Ok(status) => Verdict::NotServing(format!("health status {}", status.as_str_name())),
        Err(_) => Verdict::NotServing(format!("health status {}", response.status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_check_settings_name_the_field() {
        let cases = [
            (
                HealthCheck::check("").interval(Duration::ZERO),
                "health_check.interval",
            ),
            (
                HealthCheck::check("").timeout(Duration::ZERO),
                "health_check.timeout",
            ),
            (HealthCheck::check("").rise(0), "health_check.rise"),
            (HealthCheck::check("").fall(0), "health_check.fall"),
            (HealthCheck::check("").jitter(1.5), "health_check.jitter"),
            (
                HealthCheck::check("").jitter(f64::NAN),
                "health_check.jitter",
            ),
        ];
        for (check, field) in cases {
            assert_eq!(check.clone().validate().unwrap_err().field(), field);
            assert_eq!(check.build().unwrap_err().field(), field);
        }
        assert!(HealthCheck::watch("x").validate().is_ok());
        let good = HealthCheck::check("x").rise(1).fall(1).jitter(0.0);
        assert_eq!(good.clone().build(), Ok(good));
    }

    #[test]
    fn a_check_setting_on_a_watch_is_an_error_not_ignored() {
        let second = Duration::from_secs(1);
        let cases = [
            (
                HealthCheck::watch("").interval(second),
                "health_check.interval",
            ),
            (
                HealthCheck::watch("").timeout(second),
                "health_check.timeout",
            ),
            (HealthCheck::watch("").rise(1), "health_check.rise"),
            (HealthCheck::watch("").fall(1), "health_check.fall"),
            (HealthCheck::watch("").jitter(0.5), "health_check.jitter"),
            // The first one set is named.
            (
                HealthCheck::watch("").fall(1).interval(second),
                "health_check.fall",
            ),
        ];
        for (check, field) in cases {
            let err = check.build().unwrap_err();
            assert_eq!(err.field(), field);
            assert!(err.problem().contains("Watch"), "{err}");
        }
    }
}
