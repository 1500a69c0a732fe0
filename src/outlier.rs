//! Passive health: eject endpoints whose calls fail more than their peers' (gRFC A50 outlier
//! detection), or that fail many calls in a row (failure accrual, for sets too small for
//! statistics).
//!
//! The balancer counts the outcome of every call an endpoint answered (calls that fail because
//! the connection broke are not counted: the balancer already takes that endpoint out and
//! reconnects it with backoff, and an ejection on top would keep it out long after it is back).
//! Every `interval` it runs gRFC A50's
//! algorithm over those counts: success-rate ejection (success rate below
//! `mean − stdev × stdev_factor / 1000`) and failure-percentage ejection (failure rate above a
//! threshold), each among endpoints with enough requests and only when enough endpoints qualify.
//! An ejected endpoint gets no calls for `base_ejection_time × multiplier` (capped by
//! `max_ejection_time`); the multiplier grows with each ejection and shrinks with each clean
//! interval. Never more than `max_ejection_percent` of endpoints are ejected (at least one may be).
//!
//! ```
//! use std::time::Duration;
//! use towline::outlier::OutlierDetection;
//!
//! let detection = OutlierDetection::builder()
//!     .interval(Duration::from_secs(5))
//!     .consecutive_failures(Some(5))
//!     .build()
//!     .unwrap();
//! # let _ = detection;
//! let err = OutlierDetection::builder().max_ejection_percent(150).build().unwrap_err();
//! assert!(err.to_string().contains("max_ejection_percent"));
//! ```

use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use crate::ConfigError;
use crate::deadline::instant_after;

/// gRFC A50 outlier detection settings, with failure accrual. Build with [`OutlierDetection::builder`].
#[derive(Debug, Clone)]
pub struct OutlierDetection {
    pub(crate) interval: Duration,
    pub(crate) base_ejection_time: Duration,
    pub(crate) max_ejection_time: Duration,
    pub(crate) max_ejection_percent: u32,
    pub(crate) success_rate: Option<SuccessRateEjection>,
    pub(crate) failure_percentage: Option<FailurePercentageEjection>,
    pub(crate) consecutive_failures: Option<u32>,
    pub(crate) failure_codes: Vec<Code>,
}

/// Eject endpoints whose success rate is far below the mean (gRFC A50 `successRateEjection`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct SuccessRateEjection {
    /// Eject below `mean − stdev × stdev_factor / 1000`. Default 1900.
    pub stdev_factor: u32,
    /// Percent chance an outlier is really ejected. Default 100.
    pub enforcement_percentage: u32,
    /// Endpoints with enough requests needed before this runs. Default 5.
    pub minimum_hosts: u32,
    /// Requests in the interval an endpoint needs to be judged. Default 100.
    pub request_volume: u32,
}

impl Default for SuccessRateEjection {
    fn default() -> Self {
        SuccessRateEjection {
            stdev_factor: 1900,
            enforcement_percentage: 100,
            minimum_hosts: 5,
            request_volume: 100,
        }
    }
}

/// Eject endpoints whose failure percentage is above a threshold (gRFC A50
/// `failurePercentageEjection`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct FailurePercentageEjection {
    /// Eject above this failure percentage. Default 85.
    pub threshold: u32,
    /// Percent chance an outlier is really ejected. Default 100.
    pub enforcement_percentage: u32,
    /// Endpoints with enough requests needed before this runs. Default 5.
    pub minimum_hosts: u32,
    /// Requests in the interval an endpoint needs to be judged. Default 50.
    pub request_volume: u32,
}

impl Default for FailurePercentageEjection {
    fn default() -> Self {
        FailurePercentageEjection {
            threshold: 85,
            enforcement_percentage: 100,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection::builder()
            .build()
            .expect("the defaults are valid")
    }
}

impl OutlierDetection {
    /// Starts from gRFC A50's defaults: interval 10 s, base ejection 30 s, max ejection 300 s,
    /// max 10% ejected, success-rate and failure-percentage ejection with their defaults, plus
    /// failure accrual after 7 consecutive failures (linkerd's default). Failures are calls that
    /// end `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`, `DEADLINE_EXCEEDED` or `DATA_LOSS` (or with a
    /// transport error): codes that speak about the server, not the request.
    pub fn builder() -> OutlierDetectionBuilder {
        OutlierDetectionBuilder {
            config: OutlierDetection {
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_time: Duration::from_secs(300),
                max_ejection_percent: 10,
                success_rate: Some(SuccessRateEjection::default()),
                failure_percentage: Some(FailurePercentageEjection::default()),
                consecutive_failures: Some(7),
                failure_codes: vec![
                    Code::Unavailable,
                    Code::Internal,
                    Code::Unknown,
                    Code::DeadlineExceeded,
                    Code::DataLoss,
                ],
            },
        }
    }

    /// Whether a call that ended with `code` counts as a failure of the endpoint.
    pub fn is_failure(&self, code: Code) -> bool {
        self.failure_codes.contains(&code)
    }
}

/// Builds an [`OutlierDetection`]; `build` checks every field.
#[derive(Debug, Clone)]
pub struct OutlierDetectionBuilder {
    config: OutlierDetection,
}

impl OutlierDetectionBuilder {
    /// How often the statistics are evaluated. Must be > 0.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.config.interval = interval;
        self
    }

    /// Ejection time before the multiplier. Must be > 0.
    pub fn base_ejection_time(mut self, time: Duration) -> Self {
        self.config.base_ejection_time = time;
        self
    }

    /// Upper bound on an ejection (at least `base_ejection_time` is used).
    pub fn max_ejection_time(mut self, time: Duration) -> Self {
        self.config.max_ejection_time = time;
        self
    }

    /// At most this percent of endpoints ejected at once (0–100; at least one may always be).
    pub fn max_ejection_percent(mut self, percent: u32) -> Self {
        self.config.max_ejection_percent = percent;
        self
    }

    /// Success-rate ejection, or `None` to turn it off.
    pub fn success_rate(mut self, ejection: Option<SuccessRateEjection>) -> Self {
        self.config.success_rate = ejection;
        self
    }

    /// Failure-percentage ejection, or `None` to turn it off.
    pub fn failure_percentage(mut self, ejection: Option<FailurePercentageEjection>) -> Self {
        self.config.failure_percentage = ejection;
        self
    }

    /// Eject at once after this many failures in a row, or `None` to turn it off. Must be > 0.
    pub fn consecutive_failures(mut self, failures: Option<u32>) -> Self {
        self.config.consecutive_failures = failures;
        self
    }

    /// The codes that count as an endpoint's failure. Must not be empty.
    pub fn failure_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        self.config.failure_codes = codes.into_iter().collect();
        self
    }

    /// Checks every field.
    pub fn build(self) -> Result<OutlierDetection, ConfigError> {
        let c = self.config;
        let field = |name: &str| format!("outlier_detection.{name}");
        if c.interval.is_zero() {
            return Err(ConfigError::new(
                field("interval"),
                "must be greater than zero",
            ));
        }
        if c.base_ejection_time.is_zero() {
            return Err(ConfigError::new(
                field("base_ejection_time"),
                "must be greater than zero",
            ));
        }
        if c.max_ejection_percent > 100 {
            return Err(ConfigError::new(
                field("max_ejection_percent"),
                "must be at most 100",
            ));
        }
        if c.consecutive_failures == Some(0) {
            return Err(ConfigError::new(
                field("consecutive_failures"),
                "must be greater than zero",
            ));
        }
        if c.failure_codes.is_empty() {
            return Err(ConfigError::new(
                field("failure_codes"),
                "must not be empty",
            ));
        }
        if let Some(sr) = &c.success_rate
            && sr.enforcement_percentage > 100
        {
            return Err(ConfigError::new(
                field("success_rate.enforcement_percentage"),
                "must be at most 100",
            ));
        }
        if let Some(fp) = &c.failure_percentage {
            if fp.threshold > 100 {
                return Err(ConfigError::new(
                    field("failure_percentage.threshold"),
                    "must be at most 100",
                ));
            }
            if fp.enforcement_percentage > 100 {
                return Err(ConfigError::new(
                    field("failure_percentage.enforcement_percentage"),
                    "must be at most 100",
                ));
            }
        }
        Ok(c)
    }
}

/// One endpoint's outlier bookkeeping.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ejection {
    pub(crate) ejected_at: Option<Instant>,
    pub(crate) multiplier: u32,
    pub(crate) count: u32,
}

/// One endpoint's input to an evaluation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Host {
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    pub(crate) ejection: Ejection,
}

impl OutlierDetection {
    pub(crate) fn may_eject(&self, hosts: &[Host]) -> bool {
        let ejected = hosts
            .iter()
            .filter(|h| h.ejection.ejected_at.is_some())
            .count();
        // A50: eject while the ejected share is below the limit, so one always may be.
        (100 * ejected) < (self.max_ejection_percent as usize * hosts.len())
    }

    pub(crate) fn eject(&self, host: &mut Host, now: Instant) {
        host.ejection.ejected_at = Some(now);
        host.ejection.multiplier = host.ejection.multiplier.saturating_add(1);
        host.ejection.count = host.ejection.count.saturating_add(1);
    }

    /// Ejects `hosts[index]` for failure accrual, if the ejection limit allows.
    pub(crate) fn eject_for_failures(
        &self,
        hosts: &mut [Host],
        index: usize,
        now: Instant,
    ) -> bool {
        if hosts[index].ejection.ejected_at.is_some() || !self.may_eject(hosts) {
            return false;
        }
        self.eject(&mut hosts[index], now);
        true
    }

    /// How long an ejection that started with this multiplier lasts.
    pub(crate) fn ejection_time(&self, multiplier: u32) -> Duration {
        let cap = self.max_ejection_time.max(self.base_ejection_time);
        self.base_ejection_time
            .saturating_mul(multiplier.max(1))
            .min(cap)
    }

    /// When the earliest current ejection ends.
    pub(crate) fn next_unejection(
        &self,
        ejections: impl IntoIterator<Item = Ejection>,
    ) -> Option<Instant> {
        ejections
            .into_iter()
            .filter_map(|e| {
                Some(instant_after(
                    e.ejected_at?,
                    self.ejection_time(e.multiplier),
                ))
            })
            .min()
    }

    /// Ends the ejections whose time has passed; true if any did.
    pub(crate) fn uneject_expired(&self, hosts: &mut [Host], now: Instant) -> bool {
        let mut changed = false;
        for host in hosts.iter_mut() {
            if let Some(at) = host.ejection.ejected_at
                && now >= instant_after(at, self.ejection_time(host.ejection.multiplier))
            {
                host.ejection.ejected_at = None;
                changed = true;
            }
        }
        changed
    }

    /// gRFC A50's interval algorithm over this interval's counts. `chance(p)` says whether an
    /// enforcement percentage `p` fires (random in production, fixed in tests).
    pub(crate) fn evaluate(
        &self,
        hosts: &mut [Host],
        now: Instant,
        chance: &mut dyn FnMut(u32) -> bool,
    ) {
        if let Some(sr) = self.success_rate {
            let judged: Vec<usize> = (0..hosts.len())
                .filter(|&i| volume(&hosts[i]) >= u64::from(sr.request_volume))
                .collect();
            if judged.len() >= sr.minimum_hosts as usize && !judged.is_empty() {
                let rates: Vec<f64> = judged.iter().map(|&i| success_rate(&hosts[i])).collect();
                let mean = rates.iter().sum::<f64>() / rates.len() as f64;
                let variance =
                    rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64;
                let floor = mean - variance.sqrt() * (f64::from(sr.stdev_factor) / 1000.0);
                for (&i, rate) in judged.iter().zip(rates) {
                    if rate < floor
                        && hosts[i].ejection.ejected_at.is_none()
                        && self.may_eject(hosts)
                        && chance(sr.enforcement_percentage)
                    {
                        self.eject(&mut hosts[i], now);
                    }
                }
            }
        }
        if let Some(fp) = self.failure_percentage {
            let judged: Vec<usize> = (0..hosts.len())
                .filter(|&i| volume(&hosts[i]) >= u64::from(fp.request_volume))
                .collect();
            if judged.len() >= fp.minimum_hosts as usize {
                for i in judged {
                    let failure_percent = 100.0 * (1.0 - success_rate(&hosts[i]));
                    if failure_percent > f64::from(fp.threshold)
                        && hosts[i].ejection.ejected_at.is_none()
                        && self.may_eject(hosts)
                        && chance(fp.enforcement_percentage)
                    {
                        self.eject(&mut hosts[i], now);
                    }
                }
            }
        }
        for host in hosts.iter_mut() {
            match host.ejection.ejected_at {
                Some(at)
                    if now >= instant_after(at, self.ejection_time(host.ejection.multiplier)) =>
                {
                    host.ejection.ejected_at = None;
                }
                None => host.ejection.multiplier = host.ejection.multiplier.saturating_sub(1),
                Some(_) => {}
            }
        }
    }
}

fn volume(host: &Host) -> u64 {
    host.successes + host.failures
}

fn success_rate(host: &Host) -> f64 {
    host.successes as f64 / volume(host).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(outcomes: &[(u64, u64)]) -> Vec<Host> {
        outcomes
            .iter()
            .map(|&(successes, failures)| Host {
                successes,
                failures,
                ejection: Ejection::default(),
            })
            .collect()
    }

    fn always(_: u32) -> bool {
        true
    }

    fn detection() -> OutlierDetectionBuilder {
        OutlierDetection::builder().max_ejection_percent(50)
    }

    #[test]
    fn success_rate_ejects_the_outlier_only() {
        let d = detection().failure_percentage(None).build().unwrap();
        let mut h = hosts(&[(100, 0), (99, 1), (100, 0), (98, 2), (100, 0), (40, 60)]);
        let now = Instant::now();
        d.evaluate(&mut h, now, &mut always);
        let ejected: Vec<bool> = h.iter().map(|h| h.ejection.ejected_at.is_some()).collect();
        assert_eq!(ejected, vec![false, false, false, false, false, true]);
        assert_eq!(h[5].ejection.multiplier, 1);
    }

    #[test]
    fn too_few_hosts_or_requests_means_no_judgement() {
        let d = detection().build().unwrap();
        // Four hosts: below minimum_hosts (5).
        let mut h = hosts(&[(100, 0), (100, 0), (100, 0), (0, 100)]);
        d.evaluate(&mut h, Instant::now(), &mut always);
        assert!(h.iter().all(|h| h.ejection.ejected_at.is_none()));
        // Five hosts, but the bad one has too few requests to be judged.
        let mut h = hosts(&[(100, 0), (100, 0), (100, 0), (100, 0), (0, 10)]);
        d.evaluate(&mut h, Instant::now(), &mut always);
        assert!(h.iter().all(|h| h.ejection.ejected_at.is_none()));
    }

    #[test]
    fn failure_percentage_ejects_above_the_threshold() {
        let d = detection().success_rate(None).build().unwrap();
        let mut h = hosts(&[(100, 0), (100, 0), (100, 0), (10, 90), (20, 80)]);
        d.evaluate(&mut h, Instant::now(), &mut always);
        let ejected: Vec<bool> = h.iter().map(|h| h.ejection.ejected_at.is_some()).collect();
        // 90% failures is above 85%; 80% is not.
        assert_eq!(ejected, vec![false, false, false, true, false]);
    }

    #[test]
    fn enforcement_percentage_is_respected() {
        let d = detection().success_rate(None).build().unwrap();
        let mut h = hosts(&[(100, 0), (100, 0), (100, 0), (100, 0), (0, 100)]);
        d.evaluate(&mut h, Instant::now(), &mut |_| false);
        assert!(h[4].ejection.ejected_at.is_none());
    }

    #[test]
    fn max_ejection_percent_caps_ejections_but_allows_one() {
        let d = OutlierDetection::builder()
            .max_ejection_percent(10)
            .success_rate(None)
            .build()
            .unwrap();
        let mut h = hosts(&[(0, 100), (0, 100), (0, 100), (0, 100), (0, 100)]);
        d.evaluate(&mut h, Instant::now(), &mut always);
        assert_eq!(
            h.iter().filter(|h| h.ejection.ejected_at.is_some()).count(),
            1
        );
    }

    #[test]
    fn ejection_time_multiplies_and_is_capped() {
        let d = OutlierDetection::builder()
            .base_ejection_time(Duration::from_secs(30))
            .max_ejection_time(Duration::from_secs(100))
            .build()
            .unwrap();
        assert_eq!(d.ejection_time(1), Duration::from_secs(30));
        assert_eq!(d.ejection_time(3), Duration::from_secs(90));
        assert_eq!(d.ejection_time(4), Duration::from_secs(100));
        assert_eq!(d.ejection_time(u32::MAX), Duration::from_secs(100));
    }

    #[test]
    fn unejection_after_the_time_and_multiplier_decays_when_clean() {
        let d = detection()
            .base_ejection_time(Duration::from_secs(30))
            .build()
            .unwrap();
        let t0 = Instant::now();
        let mut h = hosts(&[(0, 0)]);
        d.eject(&mut h[0], t0);
        d.evaluate(&mut h, t0 + Duration::from_secs(29), &mut always);
        assert!(h[0].ejection.ejected_at.is_some());
        assert_eq!(
            d.next_unejection(h.iter().map(|h| h.ejection)),
            Some(t0 + Duration::from_secs(30))
        );
        d.evaluate(&mut h, t0 + Duration::from_secs(30), &mut always);
        assert!(h[0].ejection.ejected_at.is_none());
        assert_eq!(
            h[0].ejection.multiplier, 1,
            "kept through the interval that un-ejects"
        );
        d.evaluate(&mut h, t0 + Duration::from_secs(40), &mut always);
        assert_eq!(h[0].ejection.multiplier, 0, "a clean interval lowers it");
    }

    #[test]
    fn failure_accrual_respects_the_ejection_limit() {
        let d = detection().max_ejection_percent(50).build().unwrap();
        let mut h = hosts(&[(0, 0), (0, 0)]);
        let now = Instant::now();
        assert!(d.eject_for_failures(&mut h, 0, now));
        assert!(!d.eject_for_failures(&mut h, 0, now), "already ejected");
        assert!(!d.eject_for_failures(&mut h, 1, now), "50% already ejected");
    }

    #[test]
    fn bad_config_names_the_field() {
        let cases = [
            (
                OutlierDetection::builder().interval(Duration::ZERO),
                "outlier_detection.interval",
            ),
            (
                OutlierDetection::builder().base_ejection_time(Duration::ZERO),
                "outlier_detection.base_ejection_time",
            ),
            (
                OutlierDetection::builder().consecutive_failures(Some(0)),
                "outlier_detection.consecutive_failures",
            ),
            (
                OutlierDetection::builder().failure_codes([]),
                "outlier_detection.failure_codes",
            ),
            (
                OutlierDetection::builder().failure_percentage(Some(FailurePercentageEjection {
                    threshold: 101,
                    ..Default::default()
                })),
                "outlier_detection.failure_percentage.threshold",
            ),
        ];
        for (builder, field) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.field(), field);
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }
}
