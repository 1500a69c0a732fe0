//! How long to wait before trying again: exponential growth from `initial` by `multiplier`,
//! capped at `max`, with one of four jitters.
//!
//! One type serves every layer that waits: retries (gRFC A6 and the AWS jitters), reconnects in the
//! pool and the balancer ([`Backoff::grpc_connection`], grpc/doc/connection-backoff.md), and
//! health-watch restarts.

use std::time::Duration;

use crate::ConfigError;

/// The randomisation applied to the exponential delay `base(n) = min(initial · multiplier^(n-1), max)`
/// of retry `n` (1 for the first retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// gRFC A6: `base(n) · random(0.8, 1.2)`. The only one that may exceed `max` (by up to 20 %),
    /// as the spec says.
    #[default]
    Grpc,
    /// AWS "full jitter": `random(0, base(n))`. Spreads retries the most; least total work.
    Full,
    /// AWS "equal jitter": `base(n)/2 + random(0, base(n)/2)`. Never shorter than half the base.
    Equal,
    /// AWS "decorrelated jitter": `min(max, random(initial, previous · multiplier))`, where
    /// `previous` is the last delay (`initial` before the first retry). AWS uses a growth factor
    /// of 3; here it is the configured `multiplier`. A server pushback resets `previous`.
    Decorrelated,
}

/// The names a builder gives a backoff's fields, for its errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BackoffFields {
    pub(crate) initial: &'static str,
    pub(crate) max: &'static str,
    pub(crate) multiplier: &'static str,
}

impl BackoffFields {
    const PLAIN: BackoffFields = BackoffFields {
        initial: "backoff.initial",
        max: "backoff.max",
        multiplier: "backoff.multiplier",
    };
}

/// Exponential backoff with jitter, validated at construction: `initial` and `max` are positive,
/// `max ≥ initial`, and `multiplier` is finite and positive.
///
/// A multiplier below 1 is accepted, as gRFC A6 accepts any `backoffMultiplier` above 0 and a
/// retry policy's backoff is this type: the delays then shrink from `initial` instead of growing.
///
/// Delays are computed in floating point and saturate at their bounds, so no attempt number,
/// however large, overflows or panics.
///
/// ```
/// use std::time::Duration;
/// use towline::backoff::{Backoff, Jitter};
///
/// let backoff = Backoff::new(Jitter::Full, Duration::from_millis(10), Duration::from_secs(1), 2.0)?;
/// let delay = backoff.delay(3, Duration::ZERO);
/// assert!(delay <= Duration::from_millis(40));
/// assert!(Backoff::new(Jitter::Full, Duration::ZERO, Duration::from_secs(1), 2.0)
///     .unwrap_err()
///     .to_string()
///     .contains("backoff.initial"));
/// # Ok::<(), towline::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    jitter: Jitter,
    initial: Duration,
    max: Duration,
    multiplier: f64,
}

impl Backoff {
    /// Validates and builds a backoff. Errors name the field: `backoff.initial`, `backoff.max`,
    /// `backoff.multiplier`.
    pub fn new(
        jitter: Jitter,
        initial: Duration,
        max: Duration,
        multiplier: f64,
    ) -> Result<Self, ConfigError> {
        Backoff::validated(jitter, initial, max, multiplier, BackoffFields::PLAIN)
    }

    /// A builder starting from [`grpc_connection`](Self::grpc_connection), the way every other
    /// towline configuration is built; [`build`](BackoffBuilder::build) checks it as
    /// [`new`](Self::new) does.
    ///
    /// ```
    /// use std::time::Duration;
    /// use towline::backoff::{Backoff, Jitter};
    ///
    /// let backoff = Backoff::builder()
    ///     .jitter(Jitter::Full)
    ///     .initial(Duration::from_millis(50))
    ///     .max(Duration::from_secs(5))
    ///     .build()?;
    /// assert_eq!(backoff.multiplier(), 1.6); // gRPC's connection backoff, where not set
    /// let err = Backoff::builder().max(Duration::from_millis(10)).build().unwrap_err();
    /// assert_eq!(err.to_string(), "backoff.max: must not be less than the initial backoff");
    /// # Ok::<(), towline::ConfigError>(())
    /// ```
    pub fn builder() -> BackoffBuilder {
        let Backoff {
            jitter,
            initial,
            max,
            multiplier,
        } = Backoff::grpc_connection();
        BackoffBuilder {
            jitter,
            initial,
            max,
            multiplier,
        }
    }

    /// gRPC's connection backoff: 1 s, × 1.6 per failure, at most 120 s, ±20% jitter.
    pub fn grpc_connection() -> Self {
        Backoff {
            jitter: Jitter::Grpc,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(120),
            multiplier: 1.6,
        }
    }

    /// [`new`](Self::new), with errors naming the fields as a caller's builder calls them.
    pub(crate) fn validated(
        jitter: Jitter,
        initial: Duration,
        max: Duration,
        multiplier: f64,
        fields: BackoffFields,
    ) -> Result<Self, ConfigError> {
        if initial.is_zero() {
            return Err(ConfigError::new(
                fields.initial,
                "must be greater than zero",
            ));
        }
        if max.is_zero() {
            return Err(ConfigError::new(fields.max, "must be greater than zero"));
        }
        if max < initial {
            return Err(ConfigError::new(
                fields.max,
                "must not be less than the initial backoff",
            ));
        }
        if !(multiplier.is_finite() && multiplier > 0.0) {
            return Err(ConfigError::new(
                fields.multiplier,
                "must be a finite number greater than zero",
            ));
        }
        Ok(Backoff {
            jitter,
            initial,
            max,
            multiplier,
        })
    }

    /// The jitter.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The first retry's base delay.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The cap on the base delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The growth factor between retries.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The un-jittered delay of retry `n` (1-based; 0 counts as 1): `min(initial · multiplier^(n-1), max)`.
    pub fn base(&self, n: u32) -> Duration {
        let exponent = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        // `secs` is finite and non-negative or +inf; `min` maps +inf to max.
        secs_to_duration(secs.min(self.max.as_secs_f64()), self.max)
    }

    /// The delay before retry `n` (1-based), given the previous delay (used by
    /// [`Jitter::Decorrelated`] only), drawn from the thread-local random generator.
    pub fn delay(&self, n: u32, previous: Duration) -> Duration {
        self.delay_with(n, previous, &mut fastrand::Rng::new())
    }

    /// [`delay`](Self::delay) with a caller's random generator (seed it for reproducible delays).
    pub fn delay_with(&self, n: u32, previous: Duration, rng: &mut fastrand::Rng) -> Duration {
        let base = self.base(n).as_secs_f64();
        let secs = match self.jitter {
            Jitter::Grpc => base * (0.8 + 0.4 * rng.f64()),
            Jitter::Full => base * rng.f64(),
            Jitter::Equal => base / 2.0 + base / 2.0 * rng.f64(),
            Jitter::Decorrelated => {
                let low = self.initial.as_secs_f64();
                let previous = previous.max(self.initial).as_secs_f64();
                let high = (previous * self.multiplier).max(low);
                (low + (high - low) * rng.f64()).min(self.max.as_secs_f64())
            }
        };
        // Float rounding must not take a delay out of its exact bounds (nor above `max`).
        let (low, high) = self.bounds(n, previous);
        secs_to_duration(secs, high).clamp(low, high)
    }

    /// The inclusive bounds [`delay`](Self::delay) stays within for retry `n`.
    pub fn bounds(&self, n: u32, previous: Duration) -> (Duration, Duration) {
        let base = self.base(n);
        match self.jitter {
            // Integer arithmetic: exact, and no float conversion that could overflow.
            Jitter::Grpc => (base - base / 5, base.saturating_add(base / 5)),
            Jitter::Full => (Duration::ZERO, base),
            Jitter::Equal => (base / 2, base),
            Jitter::Decorrelated => {
                let high = previous.max(self.initial).as_secs_f64() * self.multiplier;
                let high = secs_to_duration(high.min(self.max.as_secs_f64()), self.max);
                (self.initial.min(high), high.max(self.initial))
            }
        }
    }
}

/// Builds a [`Backoff`]; from [`Backoff::builder`]. Nothing is checked until
/// [`build`](Self::build).
#[derive(Debug, Clone, Copy)]
#[must_use = "call .build() to get the backoff"]
pub struct BackoffBuilder {
    jitter: Jitter,
    initial: Duration,
    max: Duration,
    multiplier: f64,
}

impl BackoffBuilder {
    /// The randomisation of each delay. Default [`Jitter::Grpc`].
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first retry's base delay. Default 1 s; must be > 0.
    pub fn initial(mut self, initial: Duration) -> Self {
        self.initial = initial;
        self
    }

    /// The cap on the base delay. Default 120 s; must be > 0 and at least `initial`.
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// The growth factor between retries. Default 1.6; must be finite and > 0.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Checks every field; errors name it: `backoff.initial`, `backoff.max`,
    /// `backoff.multiplier`.
    pub fn build(self) -> Result<Backoff, ConfigError> {
        Backoff::new(self.jitter, self.initial, self.max, self.multiplier)
    }
}

/// Seconds to a `Duration`, saturating at `saturate` for anything not representable.
fn secs_to_duration(secs: f64, saturate: Duration) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).map_or(saturate, |d| d.min(saturate))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const JITTERS: [Jitter; 4] = [
        Jitter::Grpc,
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
    ];

    #[test]
    fn base_grows_by_the_multiplier_then_caps() {
        let b = Backoff::new(
            Jitter::Grpc,
            Duration::from_millis(100),
            Duration::from_secs(1),
            2.0,
        )
        .unwrap();
        let ms = |n| b.base(n).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(3), ms(4), ms(5)],
            [100, 100, 200, 400, 800, 1000]
        );
        assert_eq!(b.base(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn grpc_jitter_spans_plus_minus_twenty_percent() {
        let b = Backoff::new(
            Jitter::Grpc,
            Duration::from_millis(100),
            Duration::from_secs(1),
            2.0,
        )
        .unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let delays: Vec<Duration> = (0..2000)
            .map(|_| b.delay_with(1, Duration::ZERO, &mut rng))
            .collect();
        let min = delays.iter().min().unwrap();
        let max = delays.iter().max().unwrap();
        assert!(*min >= Duration::from_millis(80) && *min < Duration::from_millis(82));
        assert!(*max <= Duration::from_millis(120) && *max > Duration::from_millis(118));
    }

    #[test]
    fn bad_parameters_name_their_field() {
        let s = Duration::from_secs(1);
        let field = |r: Result<Backoff, ConfigError>| r.unwrap_err().field().to_owned();
        assert_eq!(
            field(Backoff::new(Jitter::Grpc, Duration::ZERO, s, 2.0)),
            "backoff.initial"
        );
        assert_eq!(
            field(Backoff::new(Jitter::Grpc, s, Duration::ZERO, 2.0)),
            "backoff.max"
        );
        assert_eq!(
            field(Backoff::new(Jitter::Grpc, s, s / 2, 2.0)),
            "backoff.max"
        );
        for m in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(
                field(Backoff::new(Jitter::Grpc, s, s, m)),
                "backoff.multiplier"
            );
        }
    }

    #[test]
    fn the_builder_checks_what_new_checks() {
        let field = |b: BackoffBuilder| b.build().unwrap_err().field().to_owned();
        assert_eq!(
            Backoff::builder().build().unwrap(),
            Backoff::grpc_connection()
        );
        assert_eq!(
            field(Backoff::builder().initial(Duration::ZERO)),
            "backoff.initial"
        );
        assert_eq!(field(Backoff::builder().max(Duration::ZERO)), "backoff.max");
        let below_initial = Backoff::builder()
            .initial(Duration::from_secs(2))
            .max(Duration::from_secs(1));
        assert_eq!(field(below_initial), "backoff.max");
        for m in [0.0, -1.6, f64::NAN, f64::NEG_INFINITY] {
            assert_eq!(
                field(Backoff::builder().multiplier(m)),
                "backoff.multiplier"
            );
        }
        let set = Backoff::builder()
            .jitter(Jitter::Equal)
            .initial(Duration::from_millis(5))
            .max(Duration::from_millis(50))
            .multiplier(3.0)
            .build()
            .unwrap();
        let expected = Backoff::new(
            Jitter::Equal,
            Duration::from_millis(5),
            Duration::from_millis(50),
            3.0,
        );
        assert_eq!(Ok(set), expected);
    }

    fn duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (1u64..10_000_000_000).prop_map(Duration::from_nanos),
            (1u64..u64::MAX).prop_map(Duration::from_secs),
            Just(Duration::MAX),
        ]
    }

    proptest! {
        #[test]
        fn delays_stay_within_bounds_and_never_overflow(
            jitter in proptest::sample::select(JITTERS.to_vec()),
            a in duration(),
            b in duration(),
            multiplier in prop_oneof![1e-9f64..1.0, 1.0f64..100.0, Just(f64::MAX)],
            n in any::<u32>(),
            previous in prop_oneof![Just(Duration::ZERO), duration()],
            seed in any::<u64>(),
        ) {
            let (initial, max) = (a.min(b), a.max(b));
            let backoff = Backoff::new(jitter, initial, max, multiplier).unwrap();
            let mut rng = fastrand::Rng::with_seed(seed);
            let delay = backoff.delay_with(n, previous, &mut rng);
            let base = backoff.base(n);
            prop_assert!(base <= max);
            // Never more than max (+20 % for gRFC A6's jitter, whose range the spec puts above max).
            let ceiling = if jitter == Jitter::Grpc { max.saturating_add(max / 5) } else { max };
            prop_assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            let (low, high) = backoff.bounds(n, previous);
            // Float rounding may land a nanosecond outside the exact bounds.
            let slack = Duration::from_nanos(1) + high / 1_000_000_000;
            prop_assert!(delay.saturating_add(slack) >= low, "{delay:?} < {low:?}");
            prop_assert!(delay <= high.saturating_add(slack), "{delay:?} > {high:?}");
        }
    }
}
