//! A counting global allocator: how many allocations a piece of code makes, and how many heap
//! bytes are live. Shared by the scenario harness (`scale`: bytes held per endpoint; `overhead`:
//! allocations per call) and `benches/layers.rs` (allocations per call).
//!
//! # What it costs the figures it counts in
//! The counters are relaxed atomics, striped by thread (each thread adds to a slot on a cache
//! line of its own, and a reading sums the slots): a few ns per allocation, the same on every
//! path measured. One process-wide pair of counters was a cache line that every allocation of
//! both worker threads fought over, some 150 times a call end to end.
//!
//! It forwards to the allocator it wraps: the system's for `benches/layers.rs` (one thread; what
//! a layer's allocations cost under the default allocator), and mimalloc for the scenario
//! harness. There the client, the server and the load generator share one process and its two
//! worker threads, and glibc's malloc takes an arena's lock to free memory that another thread
//! allocated; a call spread over many connections hops between threads more than one
//! connection's calls do, so those locks (futex waits and wakes in a profile) cost a run over
//! many connections far more than a run over one, and biased every comparison of a `Channel`
//! with a pool. Measured on the `pool` scenario's stream-bound run (500 in flight, one
//! `Channel` vs a pool that grows to 6 connections), the pool's req/s over the `Channel`'s:
//! 3.89 with glibc and shared counters (the pool at 45 µs of CPU a call, the `Channel` at 23),
//! 4.11 and 4.30 with glibc and striped counters, 4.47, 4.60 and 4.63 with mimalloc and striped
//! counters (the pool at 20–24 µs a call). Separate client and server processes do not share
//! those locks; a client alone still can, one reason many Rust services link another allocator.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

/// `A`, counting.
pub struct Counting<A>(pub A);

/// Slots the counters are striped over: more than the threads a bench runs (the runtime's
/// workers, its blocking threads, the main thread); threads beyond share slots, still exactly.
const SLOTS: usize = 16;

/// One thread's counters, alone on its cache line (two, for adjacent-line prefetching).
#[repr(align(128))]
struct Slot {
    allocations: AtomicU64,
    live_bytes: AtomicI64,
}

#[allow(
    clippy::declare_interior_mutable_const,
    reason = "an initializer for each slot"
)]
const EMPTY: Slot = Slot {
    allocations: AtomicU64::new(0),
    live_bytes: AtomicI64::new(0),
};

static SLOTS_IN_USE: AtomicUsize = AtomicUsize::new(0);
static COUNTERS: [Slot; SLOTS] = [EMPTY; SLOTS];

thread_local! {
    /// This thread's slot, chosen at its first allocation. `const`, with no destructor: reading
    /// it never allocates or registers anything, even while the thread ends.
    static THREAD_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn slot() -> &'static Slot {
    let index = THREAD_SLOT
        .try_with(|slot| {
            if slot.get() == usize::MAX {
                slot.set(SLOTS_IN_USE.fetch_add(1, Ordering::Relaxed) % SLOTS);
            }
            slot.get()
        })
        .unwrap_or(0);
    &COUNTERS[index]
}

fn count(allocations: u64, bytes: i64) {
    let slot = slot();
    if allocations > 0 {
        slot.allocations.fetch_add(allocations, Ordering::Relaxed);
    }
    slot.live_bytes.fetch_add(bytes, Ordering::Relaxed);
}

// SAFETY: every method forwards to `A` with the caller's arguments unchanged; the counters only
// observe.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as i64);
        // SAFETY: forwarded as is (see the impl).
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as i64);
        // SAFETY: forwarded as is (see the impl).
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A growth is an allocation as far as the hot path is concerned.
        count(1, new_size as i64 - layout.size() as i64);
        // SAFETY: forwarded as is (see the impl).
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(0, -(layout.size() as i64));
        // SAFETY: forwarded as is (see the impl).
        unsafe { self.0.dealloc(ptr, layout) }
    }
}

/// Allocations (and reallocations) since the process started.
pub fn allocations() -> u64 {
    COUNTERS
        .iter()
        .map(|slot| slot.allocations.load(Ordering::Relaxed))
        .sum()
}

/// Heap bytes allocated and not yet freed.
pub fn live_bytes() -> i64 {
    COUNTERS
        .iter()
        .map(|slot| slot.live_bytes.load(Ordering::Relaxed))
        .sum()
}
