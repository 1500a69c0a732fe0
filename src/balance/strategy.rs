//! How the balancer chooses among the endpoints that may take a call.
//!
//! A [`Strategy`] sees only the candidates (endpoints that are connected, healthy and not
//! ejected — or, past the panic threshold, every connected one) and the request's head, and
//! returns an index. Health gating, draining and failover are the balancer's job, so a strategy
//! is a few lines: see `examples/custom_strategy.rs`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::request::Parts;

pub use super::endpoint::Candidate;
use super::endpoint::rtt_cost_below;

/// Chooses which candidate takes a call.
///
/// `pick` runs on every call, concurrently from many tasks, under the balancer's read lock: keep
/// it short and lock-free. When the candidate set changes (an endpoint becomes ready or
/// unhealthy, is added or removed), the balancer asks for a [`prepare`](Self::prepare)d copy
/// built off the lock, or else calls `update` under the write lock: strategies that precompute
/// much (a hash ring, a weighted schedule) implement `prepare`, so that no call waits for it.
pub trait Strategy: Send + Sync + 'static {
    /// Called with the new candidate set whenever it changes.
    fn update(&mut self, candidates: &[Candidate]) {
        let _ = candidates;
    }

    /// Returns the index in `candidates` (never empty) of the endpoint to use for `request`.
    /// An index out of range is taken modulo the length.
    fn pick(&self, request: &Parts, candidates: &[Candidate]) -> usize;

    /// A copy of this strategy made ready for `candidates`, built without holding the
    /// balancer's lock: picks go on over the old set meanwhile, and the copy is swapped in with
    /// the new set. Strategies whose `update` is costly (a hash ring, a weighted schedule)
    /// implement it; `None` (the default) has `update` run under the lock instead, which is
    /// right for a strategy with little or nothing to precompute.
    fn prepare(&self, candidates: &[Candidate]) -> Option<Box<dyn Strategy>> {
        let _ = candidates;
        None
    }

    /// Whether `pick` reads the candidates' [RTT estimates](Candidate::rtt_estimate). Only
    /// then does the balancer time each call's round trip (two clock reads per call), so a
    /// strategy that never reads them says `false`, and snapshots show the default RTT. The
    /// default, `true`, is right for any strategy.
    fn uses_rtt(&self) -> bool {
        true
    }
}

impl fmt::Debug for dyn Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn Strategy")
    }
}

/// Each candidate in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// Starts at a random position, so that many clients do not all begin on the first endpoint.
    pub fn new() -> Self {
        RoundRobin {
            next: AtomicUsize::new(fastrand::usize(..)),
        }
    }
}

impl Strategy for RoundRobin {
    fn uses_rtt(&self) -> bool {
        false
    }

    fn pick(&self, _: &Parts, candidates: &[Candidate]) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()
    }
}

/// Power of two choices: two candidates at random, the one with fewer calls in flight.
#[derive(Debug, Default, Clone, Copy)]
pub struct PowerOfTwoChoices;

impl PowerOfTwoChoices {
    /// The strategy.
    pub fn new() -> Self {
        PowerOfTwoChoices
    }
}

/// Two distinct random indices (or `(0, 0)` for one candidate).
fn two_random(len: usize) -> (usize, usize) {
    if len < 2 {
        return (0, 0);
    }
    let a = fastrand::usize(..len);
    // `a + 1 + r` is below `2 × len`: one subtraction wraps it, where `%` would divide.
    let b = a + 1 + fastrand::usize(..len - 1);
    let b = if b >= len { b - len } else { b };
    (a, b)
}

impl Strategy for PowerOfTwoChoices {
    fn uses_rtt(&self) -> bool {
        false
    }

    fn pick(&self, _: &Parts, candidates: &[Candidate]) -> usize {
        let (a, b) = two_random(candidates.len());
        if candidates[b].in_flight() < candidates[a].in_flight() {
            b
        } else {
            a
        }
    }
}

/// Power of two choices on peak-EWMA cost: `rtt_estimate × (in_flight + 1)`, with the RTT measured
/// from the send of each request to the first data of its response, or to its end when no data
/// comes (linkerd's and Finagle's balancer: a long stream is not one long round trip). Routes
/// around a slow endpoint within a few calls, and tries it again as its estimate decays.
#[derive(Debug, Default, Clone, Copy)]
pub struct PeakEwma;

impl PeakEwma {
    /// The strategy; its RTT defaults and decay are set on the
    /// [`BalanceConfig`](super::BalanceConfig).
    pub fn new() -> Self {
        PeakEwma
    }
}

impl Strategy for PeakEwma {
    fn pick(&self, _: &Parts, candidates: &[Candidate]) -> usize {
        let (a, b) = two_random(candidates.len());
        if a == b {
            return a;
        }
        // Cost `rtt_estimate × (in_flight + 1)`, compared without a lock or a clock read: this
        // runs on every call.
        let load = |c: &Candidate| (c.in_flight() + 1) as f64;
        let (ca, cb) = (&candidates[a], &candidates[b]);
        if rtt_cost_below(&cb.load, load(cb), &ca.load, load(ca)) {
            b
        } else {
            a
        }
    }
}

/// Round robin in proportion to the static weights discovery gives (`Endpoint::weighted`),
/// interleaved smoothly (nginx's smooth weighted round robin): weights 5, 1, 1 give
/// `a a b a c a a`, not `a a a a a b c`.
#[derive(Debug, Default)]
pub struct WeightedRoundRobin {
    schedule: Vec<usize>,
    next: AtomicUsize,
}

impl WeightedRoundRobin {
    /// The strategy.
    pub fn new() -> Self {
        WeightedRoundRobin::default()
    }
}

/// A schedule longer than this is scaled down (weights keep their proportions within 1%).
const MAX_SCHEDULE: u64 = 10_000;

impl WeightedRoundRobin {
    /// The smooth schedule for these candidates' weights.
    fn schedule(candidates: &[Candidate]) -> Vec<usize> {
        let total: u64 = candidates.iter().map(|c| u64::from(c.weight())).sum();
        let scale = total.div_ceil(MAX_SCHEDULE).max(1);
        let weights: Vec<i64> = candidates
            .iter()
            .map(|c| (u64::from(c.weight()) / scale).max(1) as i64)
            .collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += w;
            }
            let (best, _) = current
                .iter()
                .enumerate()
                .max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i)))
                .expect("candidates are not empty when weights are");
            current[best] -= total;
            schedule.push(best);
        }
        schedule
    }
}

impl Strategy for WeightedRoundRobin {
    fn uses_rtt(&self) -> bool {
        false
    }

    fn update(&mut self, candidates: &[Candidate]) {
        self.schedule = WeightedRoundRobin::schedule(candidates);
    }

    fn prepare(&self, candidates: &[Candidate]) -> Option<Box<dyn Strategy>> {
        Some(Box::new(WeightedRoundRobin {
            schedule: WeightedRoundRobin::schedule(candidates),
            next: AtomicUsize::new(self.next.load(Ordering::Relaxed)),
        }))
    }

    fn pick(&self, _: &Parts, candidates: &[Candidate]) -> usize {
        if self.schedule.is_empty() {
            return 0;
        }
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        self.schedule[slot] % candidates.len()
    }
}

type KeyFn = dyn Fn(&Parts) -> Option<Vec<u8>> + Send + Sync;

/// The most points one endpoint takes on a [`ConsistentHash`] ring, whatever its weight.
pub const MAX_POINTS_PER_ENDPOINT: u32 = 16_384;

/// Consistent hashing on a request key, on a ring (as gRFC A42's `ring_hash`, with xxHash64):
/// calls with the same key go to the same endpoint, and when an endpoint leaves (or becomes
/// unhealthy) only its own keys move. Each endpoint's points depend only on its address and
/// weight, never on the other endpoints, so that guarantee is exact. Calls without a key are
/// spread at random.
#[derive(Clone)]
pub struct ConsistentHash {
    key: Arc<KeyFn>,
    ring: Vec<(u64, usize)>,
    points_per_weight: u32,
    /// Set when the key cannot be read (a bad header name): the config build fails with it.
    invalid: Option<String>,
}

impl fmt::Debug for ConsistentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsistentHash")
            .field("ring_size", &self.ring.len())
            .finish_non_exhaustive()
    }
}

impl ConsistentHash {
    /// Hashes the value of this request header (e.g. a user or tenant id): a name as `&str`
    /// or `String`, or a `HeaderName`. A name that is not a valid header name fails
    /// [`BalanceConfigBuilder::build`](super::BalanceConfigBuilder::build) with a
    /// [`ConfigError`](crate::ConfigError) for `balance.strategy.header`.
    ///
    /// ```
    /// use towline::balance::{BalanceConfig, ConsistentHash};
    ///
    /// let config = BalanceConfig::builder().strategy(ConsistentHash::header("x-user")).build();
    /// assert!(config.is_ok());
    /// let err = BalanceConfig::builder().strategy(ConsistentHash::header("x user")).build();
    /// assert_eq!(err.unwrap_err().field(), "balance.strategy.header");
    /// ```
    pub fn header<N>(name: N) -> Self
    where
        N: TryInto<http::HeaderName>,
        N::Error: fmt::Display,
    {
        match name.try_into() {
            Ok(name) => ConsistentHash::by(move |parts| {
                parts.headers.get(&name).map(|v| v.as_bytes().to_vec())
            }),
            Err(err) => ConsistentHash {
                invalid: Some(format!("not a valid header name: {err}")),
                ..ConsistentHash::by(|_| None)
            },
        }
    }

    /// Why this strategy cannot be used, if it cannot (a header name that is not one).
    pub(crate) fn invalid(&self) -> Option<&str> {
        self.invalid.as_deref()
    }

    /// Hashes whatever key the function derives from the request head.
    pub fn by(key: impl Fn(&Parts) -> Option<Vec<u8>> + Send + Sync + 'static) -> Self {
        ConsistentHash {
            key: Arc::new(key),
            ring: Vec::new(),
            points_per_weight: 256,
            invalid: None,
        }
    }

    /// Points each endpoint gets on the ring per unit of weight (default 256, at most
    /// [`MAX_POINTS_PER_ENDPOINT`] in all); more gives a more even spread at the cost of memory.
    pub fn points_per_weight(mut self, points: u32) -> Self {
        self.points_per_weight = points.max(1);
        self
    }
}

impl ConsistentHash {
    /// The ring for these candidates: each one's points, from its address and weight only.
    fn ring(&self, candidates: &[Candidate]) -> Vec<(u64, usize)> {
        let mut ring = Vec::new();
        for (index, candidate) in candidates.iter().enumerate() {
            let points = candidate
                .weight()
                .saturating_mul(self.points_per_weight)
                .min(MAX_POINTS_PER_ENDPOINT);
            let address = candidate.uri().to_string();
            let mut key = Vec::with_capacity(address.len() + 12);
            for replica in 0..points {
                key.clear();
                key.extend_from_slice(address.as_bytes());
                key.push(b'_');
                key.extend_from_slice(replica.to_string().as_bytes());
                ring.push((xxhash_rust::xxh64::xxh64(&key, 0), index));
            }
        }
        ring.sort_unstable();
        ring
    }
}

impl Strategy for ConsistentHash {
    fn uses_rtt(&self) -> bool {
        false
    }

    fn update(&mut self, candidates: &[Candidate]) {
        self.ring = self.ring(candidates);
    }

    fn prepare(&self, candidates: &[Candidate]) -> Option<Box<dyn Strategy>> {
        Some(Box::new(ConsistentHash {
            key: self.key.clone(),
            ring: self.ring(candidates),
            points_per_weight: self.points_per_weight,
            invalid: None,
        }))
    }

    fn pick(&self, request: &Parts, candidates: &[Candidate]) -> usize {
        let Some(key) = (self.key)(request) else {
            return fastrand::usize(..candidates.len());
        };
        if self.ring.is_empty() {
            return 0;
        }
        let hash = xxhash_rust::xxh64::xxh64(&key, 0);
        let slot = self.ring.partition_point(|&(point, _)| point < hash);
        self.ring[slot % self.ring.len()].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::endpoint::Load;
    use std::collections::HashMap;
    use std::time::Duration;
    use tokio::time::Instant;

    fn candidates(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Candidate {
                load: Arc::new(Load::unattached(
                    i as u64,
                    format!("http://10.0.0.{i}:80").parse().unwrap(),
                    *w,
                )),
            })
            .collect()
    }

    fn parts(key: Option<&str>) -> Parts {
        let mut req = http::Request::builder();
        if let Some(key) = key {
            req = req.header("x-user", key);
        }
        req.body(()).unwrap().into_parts().0
    }

    fn counts(s: &dyn Strategy, c: &[Candidate], n: usize) -> Vec<usize> {
        let mut counts = vec![0; c.len()];
        let p = parts(None);
        for _ in 0..n {
            counts[s.pick(&p, c)] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_is_exactly_even() {
        let c = candidates(&[1, 1, 1, 1]);
        assert_eq!(counts(&RoundRobin::new(), &c, 400), vec![100; 4]);
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        let c = candidates(&[1, 1]);
        c[0].load.in_flight.store(5, Ordering::Relaxed);
        assert_eq!(counts(&PowerOfTwoChoices, &c, 50), vec![0, 50]);
        let c = candidates(&[1, 1, 1]);
        c[2].load.in_flight.store(5, Ordering::Relaxed);
        // The busy one only wins when it is drawn against itself, which two_random never does.
        assert_eq!(counts(&PowerOfTwoChoices, &c, 300)[2], 0);
    }

    #[test]
    fn peak_ewma_avoids_the_slow_endpoint() {
        let c = candidates(&[1, 1, 1, 1]);
        c[3].load
            .observe_rtt(Duration::from_millis(200), Instant::now());
        let n = counts(&PeakEwma, &c, 1000);
        assert_eq!(n[3], 0, "{n:?}");
    }

    #[test]
    fn weighted_round_robin_is_proportional_and_smooth() {
        let c = candidates(&[5, 1, 1]);
        let mut s = WeightedRoundRobin::new();
        s.update(&c);
        assert_eq!(counts(&s, &c, 700), vec![500, 100, 100]);
        assert_eq!(s.schedule, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weighted_round_robin_scales_huge_weights() {
        let c = candidates(&[u32::MAX, u32::MAX / 2]);
        let mut s = WeightedRoundRobin::new();
        s.update(&c);
        assert!(s.schedule.len() as u64 <= MAX_SCHEDULE + 2);
        let n = counts(&s, &c, s.schedule.len() * 3);
        let ratio = n[0] as f64 / n[1] as f64;
        assert!((1.98..2.02).contains(&ratio), "{n:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_stable_when_another_endpoint_leaves() {
        let all = candidates(&[1, 1, 1, 1]);
        let mut ring = ConsistentHash::header("x-user");
        ring.update(&all);
        let keys: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let before: HashMap<&str, String> = keys
            .iter()
            .map(|k| {
                let i = ring.pick(&parts(Some(k)), &all);
                assert_eq!(i, ring.pick(&parts(Some(k)), &all), "sticky");
                (k.as_str(), all[i].uri().to_string())
            })
            .collect();
        // Spread: every endpoint gets a fair share of 2000 keys.
        let mut share: HashMap<&String, usize> = HashMap::new();
        for uri in before.values() {
            *share.entry(uri).or_default() += 1;
        }
        assert!(
            share.values().all(|&n| (300..=700).contains(&n)),
            "{share:?}"
        );

        // Endpoint 2 leaves: only its keys move.
        let rest: Vec<Candidate> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, c)| c.clone())
            .collect();
        ring.update(&rest);
        let gone = all[2].uri().to_string();
        for k in &keys {
            let now = rest[ring.pick(&parts(Some(k)), &rest)].uri().to_string();
            if before[k.as_str()] != gone {
                assert_eq!(
                    now,
                    before[k.as_str()],
                    "{k} moved though its endpoint stayed"
                );
            }
        }
    }

    #[test]
    fn consistent_hash_without_a_key_spreads() {
        let c = candidates(&[1, 1]);
        let mut ring = ConsistentHash::header("x-user");
        ring.update(&c);
        let n = counts(&ring, &c, 400);
        assert!(n.iter().all(|&n| n > 100), "{n:?}");
    }
}
