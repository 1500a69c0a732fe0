//! [`PercentBudget`]: Finagle's percentage retry budget (tower's `TpsBudget`) without a lock.
//!
//! tower's `TpsBudget` takes a mutex on every deposit and withdrawal to roll its window, so every
//! call of every task of a client meets on one lock. Here the window is ten slots, each one
//! atomic word holding the number of the time slot it counts for and its balance: a deposit is
//! one compare-and-swap on the current slot, and a slot whose number is ten or more slots old
//! counts as zero, so nothing ever has to be rolled or cleared.
//!
//! Withdrawals are exact under contention within a time slot: the check (is the balance
//! enough?) and the withdrawal are one compare-and-swap on the current slot, so concurrent
//! withdrawals never take more than was deposited. (Two callers on either side of a slot's
//! boundary change different slots, and can both take the last retry's worth: once per slot,
//! at most.) (tower's reads the sum, then subtracts: two callers can both see the last
//! retry's worth and both take it.)
//!
//! Time slots are counted on [`Clock`]: the CPU's counter, not the OS clock (a vDSO call, tens of
//! ns), since every call deposits.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Clock;

/// Slots per `ttl`, as tower's `TpsBudget` has.
const SLOTS: usize = 10;

pub(crate) struct PercentBudget {
    /// Time slots are counted from its epoch: when the budget was made.
    clock: Clock,
    /// `ttl / SLOTS`, in nanoseconds (at least 100 ms: `ttl` is at least 1 s).
    slot_nanos: u64,
    /// `2^64 / slot_nanos`, rounded up: a slot's number takes two multiplications, not a
    /// division, per call.
    slot_inverse: u64,
    /// Slot `n % SLOTS` holds `(n as u32) << 32 | balance as u32` for time slot `n`.
    slots: [AtomicU64; SLOTS],
    /// Withdrawals allowed without any deposit, as `min_per_sec` over the `ttl`.
    reserve: i64,
    /// Added by each call.
    deposit: i32,
    /// Taken by each retry.
    withdraw: i32,
}

impl PercentBudget {
    /// The arguments are validated by [`RetryBudget::percent`](super::RetryBudget::percent):
    /// `ttl` in 1..=60 s, `ratio` in 0.0..=10.0, `min_per_sec` below `i32::MAX`.
    pub(crate) fn new(ttl: Duration, min_per_sec: u32, ratio: f64) -> Self {
        // tower's amounts, so that a budget means what it meant over `TpsBudget`: integers, with
        // a ratio above 1 counted in thousandths.
        let (deposit, withdraw) = if ratio == 0.0 {
            (0, 1)
        } else if ratio <= 1.0 {
            (1, (1.0 / ratio) as i32)
        } else {
            (1000, (1000.0 / ratio) as i32)
        };
        let reserve = i64::from(min_per_sec) * ttl.as_secs() as i64 * i64::from(withdraw);
        let slot_nanos = (ttl.as_nanos() / SLOTS as u128) as u64;
        PercentBudget {
            clock: Clock::new(),
            slot_nanos,
            slot_inverse: u64::MAX / slot_nanos + 1,
            slots: Default::default(),
            reserve,
            deposit,
            withdraw,
        }
    }

    /// The current time slot's number. It wraps after 2^32 slots (over 13 years at the shortest
    /// slot), which only matters to a slot left untouched exactly that long.
    fn slot_now(&self) -> u32 {
        self.slot_at(self.clock.now_ns())
    }

    /// The number of the time slot `nanos` after the budget was made.
    fn slot_at(&self, nanos: u64) -> u32 {
        // `nanos / slot_nanos` as a multiplication by the inverse, which is that quotient or one
        // more (the inverse is rounded up by less than one, times `nanos / 2^64` < 1): one more
        // multiplication tells which.
        let slot = ((u128::from(nanos) * u128::from(self.slot_inverse)) >> 64) as u64;
        let past = u128::from(slot) * u128::from(self.slot_nanos) > u128::from(nanos);
        (slot - u64::from(past)) as u32
    }

    /// A call was made, now.
    pub(crate) fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        let now = self.slot_now();
        let slot = &self.slots[now as usize % SLOTS];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
            Some(pack(now, current(word, now).saturating_add(self.deposit)))
        });
    }

    /// A retry may be made if the last `ttl`'s deposits and the reserve cover it; it is taken
    /// from the budget when the answer is yes.
    pub(crate) fn withdraw(&self) -> bool {
        let now = self.slot_now();
        let index = now as usize % SLOTS;
        let slot = &self.slots[index];
        let mut word = slot.load(Ordering::Acquire);
        loop {
            let mine = current(word, now);
            let others: i64 = (0..SLOTS)
                .filter(|&i| i != index)
                .map(|i| i64::from(live(self.slots[i].load(Ordering::Acquire), now)))
                .sum();
            if self.reserve + others + i64::from(mine) < i64::from(self.withdraw) {
                return false;
            }
            let new = pack(now, mine.saturating_sub(self.withdraw));
            match slot.compare_exchange_weak(word, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => word = actual,
            }
        }
    }

    /// The retries' worth in the budget now (in the budget's units).
    fn balance(&self) -> i64 {
        let now = self.slot_now();
        let deposits: i64 = self
            .slots
            .iter()
            .map(|slot| i64::from(live(slot.load(Ordering::Acquire), now)))
            .sum();
        self.reserve + deposits
    }
}

fn pack(slot: u32, balance: i32) -> u64 {
    (u64::from(slot) << 32) | u64::from(balance as u32)
}

/// The balance of `word` if it counts for time slot `now`, else zero (the slot is being reused).
fn current(word: u64, now: u32) -> i32 {
    if (word >> 32) as u32 == now {
        word as u32 as i32
    } else {
        0
    }
}

/// The balance of `word` if its time slot is one of the last `SLOTS`, else zero.
fn live(word: u64, now: u32) -> i32 {
    if now.wrapping_sub((word >> 32) as u32) < SLOTS as u32 {
        word as u32 as i32
    } else {
        0
    }
}

impl fmt::Debug for PercentBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PercentBudget")
            .field("deposit", &self.deposit)
            .field("withdraw", &self.withdraw)
            .field("balance", &self.balance())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deposits_count_for_one_ttl_then_expire() {
        let budget = PercentBudget::new(Duration::from_secs(10), 0, 0.5);
        for _ in 0..10 {
            budget.deposit();
        }
        tokio::time::advance(Duration::from_millis(9_900)).await;
        assert!(budget.withdraw(), "still inside the ttl");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!budget.withdraw(), "the first slot has left the window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_reused_after_a_full_ttl_starts_from_zero() {
        let budget = PercentBudget::new(Duration::from_secs(1), 0, 1.0);
        budget.deposit();
        tokio::time::advance(Duration::from_secs(1)).await; // same slot index, ten slots later
        budget.deposit();
        assert!(budget.withdraw());
        assert!(!budget.withdraw(), "the old deposit no longer counts");
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_allows_min_per_sec_over_the_ttl() {
        let budget = PercentBudget::new(Duration::from_secs(2), 3, 0.2);
        let allowed = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(allowed, 6);
    }

    #[test]
    fn a_slot_number_is_the_quotient_by_the_slot_length() {
        for ttl in [1, 7, 10, 60] {
            let budget = PercentBudget::new(Duration::from_secs(ttl), 0, 0.2);
            let slot = budget.slot_nanos;
            for n in [
                0u64,
                1,
                5,
                9,
                10,
                11,
                1_000,
                123_456,
                4_294_967_295,
                31_536_000_000,
            ] {
                // Up to the last whole slot in 584 years of nanoseconds.
                let Some(start) = (n + 1).checked_mul(slot).map(|end| end - slot) else {
                    continue;
                };
                for nanos in [start, start + 1, start + slot / 2, start + slot - 1] {
                    // Slot numbers wrap at 2^32 (see `slot_at`).
                    let expected = (nanos / slot) as u32;
                    assert_eq!(budget.slot_at(nanos), expected, "{ttl} s, {nanos} ns");
                }
            }
        }
    }

    #[test]
    fn a_ratio_above_one_allows_that_many_retries_per_call() {
        let budget = PercentBudget::new(Duration::from_secs(10), 0, 4.0);
        for _ in 0..5 {
            budget.deposit();
        }
        let allowed = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(allowed, 20);
    }
}
