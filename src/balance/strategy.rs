//! How the balancer chooses among the endpoints that may take a call.
//!
//! A [`Strategy`] sees only the candidates (endpoints that are connected, healthy and not
//! ejected — or, past the panic threshold, every connected one) and the request's head, and
//! returns an index. Health gating, draining and failover are the balancer's job, so a strategy
//! is a few lines: see `examples/custom_strategy.rs`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::Uri;
use http::request::Parts;

pub use super::endpoint::Candidate;
use super::endpoint::{EndpointId, rtt_cost_below, to_f64};

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

    /// Whether `pick` reads its `request` argument (a hash of a header, of the path). A
    /// strategy that says `false` is shown an empty head instead of the call's, which spares
    /// taking every request apart and back together; asked once, when the balancer starts.
    /// The default, `true`, is right for any strategy.
    fn reads_request(&self) -> bool {
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
    fn reads_request(&self) -> bool {
        false
    }

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

/// Two distinct random indices (or `(0, 0)` for one candidate), from one random number: each
/// draw reaches the generator's thread-local state, and this runs on every call.
fn two_random(len: usize) -> (usize, usize) {
    if len < 2 {
        return (0, 0);
    }
    let random = fastrand::u64(..);
    let a = scale(random as u32, len);
    // `a + 1 + r` is below `2 × len`: one subtraction wraps it, where `%` would divide.
    let b = a + 1 + scale((random >> 32) as u32, len - 1);
    let b = if b >= len { b - len } else { b };
    (a, b)
}

/// A uniform `u32` mapped onto `0..len` by multiplication (Lemire's method without its
/// rejection step): each index's share is off by at most `len / 2^32`, which no choice between
/// endpoints can tell.
fn scale(random: u32, len: usize) -> usize {
    ((u128::from(random) * len as u128) >> 32) as usize
}

impl Strategy for PowerOfTwoChoices {
    fn reads_request(&self) -> bool {
        false
    }

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
    fn reads_request(&self) -> bool {
        false
    }

    fn pick(&self, _: &Parts, candidates: &[Candidate]) -> usize {
        let (a, b) = two_random(candidates.len());
        if a == b {
            return a;
        }
        // Cost `rtt_estimate × (in_flight + 1)`, compared without a lock or a clock read: this
        // runs on every call.
        let load = |c: &Candidate| to_f64(c.in_flight() as u64 + 1);
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
    fn reads_request(&self) -> bool {
        false
    }

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
///
/// A change of the endpoint set costs one pass over the ring: the points of endpoints that stay
/// are kept (already sorted), and only those of newcomers are hashed and merged in.
#[derive(Clone)]
pub struct ConsistentHash {
    key: Key,
    ring: Ring,
    points_per_weight: u32,
    /// Set when the key cannot be read (a bad header name): the config build fails with it.
    invalid: Option<String>,
}

/// Where a [`ConsistentHash`] finds a request's key.
#[derive(Clone)]
enum Key {
    /// A header's value, hashed where it lies: a pick allocates nothing.
    Header(http::HeaderName),
    /// Whatever the user's function derives.
    Derived(Arc<KeyFn>),
}

impl Key {
    fn hash(&self, request: &Parts) -> Option<u64> {
        match self {
            Key::Header(name) => request.headers.get(name).map(|v| hash_key(v.as_bytes())),
            Key::Derived(derive) => derive(request).map(|key| hash_key(&key)),
        }
    }
}

fn hash_key(key: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(key, 0)
}

impl fmt::Debug for ConsistentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsistentHash")
            .field("ring_size", &self.ring.points.len())
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
            Ok(name) => ConsistentHash::with_key(Key::Header(name)),
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
        ConsistentHash::with_key(Key::Derived(Arc::new(key)))
    }

    fn with_key(key: Key) -> Self {
        ConsistentHash {
            key,
            ring: Ring::default(),
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

/// A hash ring: every candidate's points in ascending order, beside the index of the candidate
/// each belongs to (two arrays, so that the search reads only points).
#[derive(Clone, Default)]
struct Ring {
    points: Vec<u64>,
    owners: Vec<u32>,
    /// Who the candidates were, by index, when the ring was built: endpoint id and weight,
    /// which fix an endpoint's points (its address never changes under one id).
    members: Vec<(EndpointId, u32)>,
}

impl Ring {
    /// The ring for `candidates`: the points of endpoints already on this one (same id, same
    /// weight) are kept in their order and renumbered, and only newcomers' points are hashed,
    /// sorted and merged in. One pass over the ring, and no hashing for endpoints that stay.
    fn next(&self, candidates: &[Candidate], points_per_weight: u32) -> Ring {
        let mut old_index: HashMap<EndpointId, usize> = self
            .members
            .iter()
            .enumerate()
            .map(|(index, &(id, _))| (id, index))
            .collect();
        // Each old member's new index, or `GONE`.
        const GONE: u32 = u32::MAX;
        let mut renumber = vec![GONE; self.members.len()];
        let mut kept_points = 0;
        let mut arrivals = Vec::new();
        let mut members = Vec::with_capacity(candidates.len());
        for (index, candidate) in candidates.iter().enumerate() {
            let member = (candidate.load.id, candidate.weight());
            let index = u32::try_from(index).expect("fewer than 2^32 candidates");
            match old_index.remove(&member.0) {
                Some(old) if self.members[old] == member => {
                    renumber[old] = index;
                    kept_points += point_count(member.1, points_per_weight) as usize;
                }
                _ => arrivals.extend(
                    endpoint_points(candidate.uri(), member.1, points_per_weight)
                        .map(|point| (point, index)),
                ),
            }
            members.push(member);
        }
        arrivals.sort_unstable();

        let kept = self
            .points
            .iter()
            .zip(&self.owners)
            .filter_map(|(&point, &owner)| {
                let index = renumber[owner as usize];
                (index != GONE).then_some((point, index))
            });
        let mut ring = Ring {
            points: Vec::with_capacity(kept_points + arrivals.len()),
            owners: Vec::with_capacity(kept_points + arrivals.len()),
            members,
        };
        for (point, owner) in merge(kept, arrivals) {
            ring.points.push(point);
            ring.owners.push(owner);
        }
        ring
    }

    /// The candidate index owning the first point at or after `hash` (wrapping around).
    fn owner(&self, hash: u64) -> Option<usize> {
        let slot = self.points.partition_point(|&point| point < hash);
        let slot = if slot == self.points.len() { 0 } else { slot };
        self.owners.get(slot).map(|&owner| owner as usize)
    }
}

/// How many points an endpoint of this weight has.
fn point_count(weight: u32, points_per_weight: u32) -> u32 {
    weight
        .saturating_mul(points_per_weight)
        .min(MAX_POINTS_PER_ENDPOINT)
}

/// An endpoint's points, from its address and weight only: replica `r` is xxHash64 of the
/// address seeded with `r` (no formatting per point).
fn endpoint_points(uri: &Uri, weight: u32, points_per_weight: u32) -> impl Iterator<Item = u64> {
    let address = uri.to_string();
    (0..point_count(weight, points_per_weight))
        .map(move |replica| xxhash_rust::xxh64::xxh64(address.as_bytes(), u64::from(replica)))
}

/// Two ascending sequences as one.
fn merge<T: Ord>(
    a: impl IntoIterator<Item = T>,
    b: impl IntoIterator<Item = T>,
) -> impl Iterator<Item = T> {
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y < x => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

impl Strategy for ConsistentHash {
    fn uses_rtt(&self) -> bool {
        false
    }

    fn update(&mut self, candidates: &[Candidate]) {
        self.ring = self.ring.next(candidates, self.points_per_weight);
    }

    fn prepare(&self, candidates: &[Candidate]) -> Option<Box<dyn Strategy>> {
        Some(Box::new(ConsistentHash {
            key: self.key.clone(),
            ring: self.ring.next(candidates, self.points_per_weight),
            points_per_weight: self.points_per_weight,
            invalid: None,
        }))
    }

    fn pick(&self, request: &Parts, candidates: &[Candidate]) -> usize {
        let Some(hash) = self.key.hash(request) else {
            return fastrand::usize(..candidates.len());
        };
        self.ring.owner(hash).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::endpoint::Load;
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
    fn two_random_draws_two_distinct_indices_evenly() {
        assert_eq!(two_random(1), (0, 0));
        for len in [2, 3, 7, 100] {
            let mut drawn = vec![0usize; len];
            for _ in 0..2_000 * len {
                let (a, b) = two_random(len);
                assert!(a < len && b < len && a != b, "{len}: {a} {b}");
                drawn[a] += 1;
                drawn[b] += 1;
            }
            // 4,000 draws per index on average: each within ±15% of it.
            assert!(
                drawn.iter().all(|&n| (3_400..=4_600).contains(&n)),
                "{len}: {drawn:?}"
            );
        }
        // The ends of the range are reached.
        assert_eq!(scale(u32::MAX, 100), 99);
        assert_eq!(scale(0, 100), 0);
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
    /// The ring a strategy that never saw another set builds for `c`.
    fn fresh_ring(c: &[Candidate]) -> Ring {
        let mut ring = ConsistentHash::header("x-user");
        ring.update(c);
        ring.ring
    }

    fn same_ring(a: &Ring, b: &Ring) -> bool {
        a.points == b.points && a.owners == b.owners && a.members == b.members
    }

    #[test]
    fn consistent_hash_rebuilt_from_the_last_ring_is_the_ring_built_afresh() {
        let all = candidates(&[1, 2, 1, 3, 1, 1]);
        let mut ring = ConsistentHash::header("x-user");
        // Grow one by one, as endpoints become ready.
        for n in 1..=all.len() {
            ring.update(&all[..n]);
            assert!(
                same_ring(&ring.ring, &fresh_ring(&all[..n])),
                "{n} endpoints"
            );
        }
        assert_eq!(ring.ring.points.len(), 9 * 256);
        assert!(ring.ring.points.is_sorted());
        // Some leave (indices shift), others come back, in another order.
        let some: Vec<Candidate> = [5, 0, 3].iter().map(|&i| all[i].clone()).collect();
        ring.update(&some);
        assert!(same_ring(&ring.ring, &fresh_ring(&some)));
        let prepared = ring.prepare(&all).expect("a ring is prepared off the lock");
        let keys: Vec<Parts> = (0..500)
            .map(|k| parts(Some(&format!("user-{k}"))))
            .collect();
        ring.update(&all);
        assert!(same_ring(&ring.ring, &fresh_ring(&all)));
        for key in &keys {
            assert_eq!(prepared.pick(key, &all), ring.pick(key, &all));
        }
    }

    #[test]
    fn consistent_hash_gives_a_reweighed_endpoint_its_new_points() {
        let c = candidates(&[1, 1]);
        let mut ring = ConsistentHash::header("x-user");
        ring.update(&c);
        c[1].load.set_weight(3);
        ring.update(&c);
        assert!(same_ring(&ring.ring, &fresh_ring(&c)));
        let owned = |i: u32| ring.ring.owners.iter().filter(|&&o| o == i).count();
        assert_eq!((owned(0), owned(1)), (256, 3 * 256));
        let n = (0..4000)
            .filter(|k| ring.pick(&parts(Some(&format!("user-{k}"))), &c) == 1)
            .count();
        assert!(
            (2600..3400).contains(&n),
            "{n} of 4000 keys on the weight-3 endpoint"
        );
    }

    #[test]
    fn consistent_hash_spreads_keys_evenly_over_many_endpoints() {
        let c = candidates(&[1; 50]);
        let mut ring = ConsistentHash::header("x-user");
        ring.update(&c);
        let mut share = vec![0usize; c.len()];
        for k in 0..50_000 {
            share[ring.pick(&parts(Some(&format!("user-{k}"))), &c)] += 1;
        }
        // 1,000 keys each on average; 256 points each keep every share within ±25%.
        assert!(
            share.iter().all(|&n| (750..=1250).contains(&n)),
            "{share:?}"
        );
    }

    #[test]
    fn only_strategies_that_read_the_request_are_shown_it() {
        // The others are shown a blank head, and the balancer moves no request for them.
        assert!(!RoundRobin::new().reads_request());
        assert!(!PowerOfTwoChoices::new().reads_request());
        assert!(!PeakEwma::new().reads_request());
        assert!(!WeightedRoundRobin::new().reads_request());
        assert!(ConsistentHash::header("x-user").reads_request());
    }
}
