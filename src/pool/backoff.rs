//! Reconnect backoff, as gRPC's connection-backoff document specifies it.

use std::time::Duration;

/// Jittered exponential backoff (grpc/doc/connection-backoff.md): after the `n`th consecutive
/// failure, wait `min(initial · multiplier^(n-1), max) · random(1 - jitter, 1 + jitter)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) multiplier: f64,
    pub(crate) max: Duration,
    pub(crate) jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            multiplier: 1.6,
            max: Duration::from_secs(120),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before the attempt that follows the `failures`th consecutive failure (1-based),
    /// before jitter.
    pub(crate) fn base(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(1_000) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let max = self.max.as_secs_f64();
        // `min` first: `powi` may be infinite, which `from_secs_f64` would reject.
        Duration::from_secs_f64(secs.min(max))
    }

    /// [`base`](Self::base) with jitter drawn from `random` (a number in `0.0..1.0`).
    pub(crate) fn delay_with(&self, failures: u32, random: f64) -> Duration {
        let factor = 1.0 + self.jitter * (2.0 * random - 1.0);
        self.base(failures).mul_f64(factor.max(0.0))
    }

    /// The jittered delay after the `failures`th consecutive failure.
    pub(crate) fn delay(&self, failures: u32) -> Duration {
        self.delay_with(failures, fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_the_multiplier_up_to_the_max() {
        let b = Backoff::default();
        let secs: Vec<f64> = (1..=4).map(|n| b.base(n).as_secs_f64()).collect();
        let expected = [1.0, 1.6, 2.56, 4.096];
        for (got, want) in secs.iter().zip(expected) {
            assert!((got - want).abs() < 1e-9, "{secs:?}");
        }
        assert_eq!(b.base(20), Duration::from_secs(120));
        assert_eq!(b.base(u32::MAX), Duration::from_secs(120));
        // The 0th failure is treated as the first: never a zero delay.
        assert_eq!(b.base(0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let b = Backoff::default();
        assert_eq!(b.delay_with(2, 0.0), Duration::from_secs_f64(1.6 * 0.8));
        assert_eq!(b.delay_with(2, 0.5), Duration::from_secs_f64(1.6));
        let top = b.delay_with(2, 1.0 - f64::EPSILON);
        assert!(top < Duration::from_secs_f64(1.6 * 1.2 + 1e-6), "{top:?}");
        for n in 1..40 {
            let d = b.delay(n).as_secs_f64();
            let base = b.base(n).as_secs_f64();
            assert!(d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9, "{n}: {d}");
        }
    }
}
