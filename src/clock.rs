//! [`Clock`]: a cheap clock for what is read on every call.
//!
//! Two things read the time on every call: peak-EWMA, twice (at the send and at the first data:
//! [`PeakEwma`](crate::balance::PeakEwma)), and a percentage retry budget, once (the time slot
//! of its deposit: [`RetryBudget::percent`](crate::retry::RetryBudget::percent)). The OS's
//! monotonic clock (`clock_gettime`, what `Instant::now` reads) costs ~21 ns a read in a loop on
//! a KVM guest, and in `benches/layers.rs` its two reads were ~70 ns of the ~75 ns peak-EWMA
//! added over round robin; the CPU's time-stamp counter costs ~9 ns and does not stall the
//! pipeline as the OS clock's fenced read does. So the counter is read where it is invariant,
//! through `quanta`, which calibrates it against the monotonic clock once per process (under a
//! millisecond, at the first clock made) and falls back to that clock where there is no such
//! counter.
//!
//! Except when Tokio's clock is paused (`tokio::time::pause`, a test's `start_paused`) as the
//! clock is made: then it follows Tokio's clock, so that a test of timing logic can still move
//! time itself. (A clock made before Tokio's was paused does not follow it: it goes on in real
//! time.)

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// The process's counter clock, calibrated on first use (once per process).
static COUNTER: OnceLock<quanta::Clock> = OnceLock::new();

fn counter() -> &'static quanta::Clock {
    COUNTER.get_or_init(quanta::Clock::new)
}

/// A clock in ns since its epoch. Every endpoint of one balancer shares one, so that a pick
/// compares two estimates' ages as plain integers; a percentage retry budget counts its time
/// slots on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clock {
    /// The CPU's counter (or the OS's monotonic clock where there is none), in raw units from
    /// the epoch's reading.
    Counter { epoch: u64 },
    /// Tokio's clock: it was paused when this clock was chosen, or no call is timed (the
    /// strategy reads no RTT), where no counter needs calibrating.
    Tokio { epoch: Instant },
}

impl Clock {
    /// A clock starting now: Tokio's when it is paused in this runtime, the counter otherwise.
    /// A balancer makes its clock when it starts (inside its runtime); a retry budget when it
    /// is made.
    pub(crate) fn new() -> Self {
        if tokio_clock_is_paused() {
            Clock::tokio()
        } else {
            Clock::Counter {
                epoch: counter().raw(),
            }
        }
    }

    /// Tokio's clock, starting now.
    pub(crate) fn tokio() -> Self {
        Clock::Tokio {
            epoch: Instant::now(),
        }
    }

    /// The time now, in ns since the epoch.
    #[inline]
    pub(crate) fn now_ns(&self) -> u64 {
        match self {
            Clock::Counter { epoch } => {
                let counter = counter();
                counter.delta_as_nanos(*epoch, counter.raw())
            }
            Clock::Tokio { epoch } => ns_between(*epoch, Instant::now()),
        }
    }

    /// `at` (on Tokio's clock) in ns since the epoch: exact on Tokio's clock; on the counter,
    /// as far before or after the counter's now as `at` is before or after Tokio's. For tests,
    /// which name moments on Tokio's clock.
    #[cfg(test)]
    pub(crate) fn ns_at(&self, at: Instant) -> u64 {
        match self {
            Clock::Tokio { epoch } => ns_between(*epoch, at),
            Clock::Counter { .. } => {
                let (now_ns, now) = (self.now_ns(), Instant::now());
                if at <= now {
                    now_ns.saturating_sub(ns_between(at, now))
                } else {
                    now_ns.saturating_add(ns_between(now, at))
                }
            }
        }
    }

    /// `ns` on this clock, as the same moment on `other`: the same figure when both are one
    /// clock (every endpoint of one balancer, so inlined: every peak-EWMA pick asks); shifted by
    /// the difference of their epochs otherwise (tests' endpoints, each made alone).
    #[inline]
    pub(crate) fn shift_to(&self, ns: u64, other: &Clock) -> u64 {
        if self == other {
            ns
        } else {
            self.shift_between_epochs(ns, other)
        }
    }

    fn shift_between_epochs(&self, ns: u64, other: &Clock) -> u64 {
        // How far `self`'s epoch is after `other`'s (`true`) or before it (`false`), in ns.
        let (later, by) = match (self, other) {
            (Clock::Tokio { epoch: from }, Clock::Tokio { epoch: to }) => {
                (from >= to, ns_between(*from.min(to), *from.max(to)))
            }
            (Clock::Counter { epoch: from }, Clock::Counter { epoch: to }) => {
                let counter = counter();
                (
                    from >= to,
                    counter.delta_as_nanos(*from.min(to), *from.max(to)),
                )
            }
            // Clocks of two kinds share no moment: a balancer never mixes them.
            _ => return ns,
        };
        if later {
            ns.saturating_add(by)
        } else {
            ns.saturating_sub(by)
        }
    }
}

/// ns from `from` to `to` (0 if `to` is earlier), in `u64` arithmetic (584 years of ns), where
/// `as_nanos` would multiply in `u128`.
fn ns_between(from: Instant, to: Instant) -> u64 {
    let since = to.saturating_duration_since(from);
    since
        .as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(since.subsec_nanos()))
}

/// Whether Tokio's clock stands still here while real time passes: paused, as
/// `tokio::time::pause` leaves it (it moves only when the runtime auto-advances it, which it
/// does not while this thread is busy here). Costs a microsecond of spinning, once per clock.
fn tokio_clock_is_paused() -> bool {
    let before = Instant::now();
    let real = std::time::Instant::now();
    while real.elapsed() < Duration::from_micros(1) {
        std::hint::spin_loop();
    }
    Instant::now() == before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_paused_runtime_the_counter_times_real_time() {
        use std::time::Instant as Real;
        let clock = Clock::new();
        assert!(matches!(clock, Clock::Counter { .. }), "{clock:?}");
        // Each counter reading between two of the OS clock's: the counter's interval is within
        // the outer one and covers the inner one, however long this thread waits between reads.
        let (before_start, start, after_start) = (Real::now(), clock.now_ns(), Real::now());
        std::thread::sleep(Duration::from_millis(20));
        let (before_end, end, after_end) = (Real::now(), clock.now_ns(), Real::now());
        let counted = (end - start) as f64;
        let inner = (before_end - after_start).as_nanos() as f64;
        let outer = (after_end - before_start).as_nanos() as f64;
        // Within 5% (calibration error is well under that).
        assert!(
            counted >= inner * 0.95 && counted <= outer * 1.05,
            "{counted} ns counted; the OS clock says between {inner} and {outer} ns"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_paused_runtime_tokios_clock_times_paused_time() {
        let clock = Clock::new();
        assert!(matches!(clock, Clock::Tokio { .. }), "{clock:?}");
        let start = clock.now_ns();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(clock.now_ns() - start, 3_000_000_000);
        assert_eq!(clock.ns_at(Instant::now()), clock.now_ns());
    }

    #[tokio::test]
    async fn in_a_running_runtime_the_counter_is_chosen() {
        assert!(matches!(Clock::new(), Clock::Counter { .. }));
    }

    #[test]
    fn moments_shift_between_two_clocks_epochs() {
        let a = Clock::new();
        std::thread::sleep(Duration::from_millis(5));
        let b = Clock::new();
        let on_b = b.now_ns();
        let on_a = b.shift_to(on_b, &a);
        // The same moment is ≥ 5 ms later on `a`, whose epoch is earlier, and shifts back.
        assert!(on_a >= on_b + 5_000_000, "{on_a} {on_b}");
        assert_eq!(a.shift_to(on_a, &b), on_b);
        assert_eq!(a.shift_to(on_a, &a), on_a);
    }
}
