//! `scale`: the balancer at 10, 100 and 1,000 discovered endpoints, for round robin, peak-EWMA and
//! ring hash (`ConsistentHash` on a request header); then churn under load.
//!
//! The per-endpoint figures are the balancer's own, so its endpoints are trivial in-process
//! services (`trivial.rs`: answered at once, no connection) behind a trivial `MakeEndpoint`, and
//! endpoints come from a `discover::channel`. For each strategy and size:
//! - `pick_ns`: what a call through the balancer costs over the same call made to one trivial
//!   endpoint directly, in CPU time of the thread making the calls (ns per call; median over
//!   rounds of a bare batch then a balancer batch). It is the pick and everything else the
//!   balancer does per call (lock, in-flight count, response tracking); growth with the
//!   endpoint count is the pick's. Each call carries a key header (256 keys in turn) that ring
//!   hash hashes, and the others ignore. Beside it, `allocs_per_call`: the heap allocations per
//!   call the balancer adds, measured the same way.
//! - `rebuild_ms`: the time from sending one discovery change (an `Insert` of a new endpoint,
//!   with N already serving) to the strategy's `update` returning with the N + 1 candidates,
//!   after which every pick sees the new set (median over inserts; each is removed again, and
//!   that removal awaited, before the next). The strategy is wrapped to note when its `update`
//!   returns; the wrapper only forwards.
//! - `bytes_per_endpoint`: heap bytes live after the N endpoints are all serving minus those
//!   live before the first was discovered (balancer already running), over N, counted by the
//!   harness's counting global allocator. The balancer's own state per endpoint; a real
//!   connection's buffers come on top.
//!
//! Churn: 100 endpoints at distinct loopback addresses (`127.x.y.z`) over 4 testkit backends that
//! listen on every address, a peak-EWMA balancer over real connections (`Connect`, defaults), 32
//! calls in flight; every 100 ms one endpoint is removed from discovery and a new address
//! inserted (10% of endpoints replaced per second). `figures.churn`: calls, failed calls,
//! p50 and p99 latency, endpoints replaced.
//!
//! Goals (issue 16): pick cost at 1,000 endpoints ≤ 1.5× that at 10, a rebuild ≤ 5 ms, no failed
//! call under churn.

use std::cell::Cell;
use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderName, HeaderValue, Request, Uri};
use tokio::sync::watch;
use tonic::body::Body;
use towline::BoxError;
use towline::balance::{
    Balance, BalanceConfig, Candidate, ConsistentHash, PeakEwma, RoundRobin, Strategy,
};
use towline::connect::Connect;
use towline::discover::{self, Change, Endpoint, Update};
use towline::testkit::pb::echo_client::EchoClient;
use towline::testkit::{Backend, Load};

use crate::alloc;
use crate::balance::ready;
use crate::overhead::drive;
use crate::support::{BoxScenario, Settings, micros, note, print_table};
use crate::trivial::{self, Connector, Immediate, endpoint_uri, median};

const SIZES: [usize; 3] = [10, 100, 1_000];
const KEY_HEADER: &str = "x-user";
const KEYS: usize = 256;
/// How long the endpoints of one size may take to all serve, and one rebuild to finish.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

const CHURN_BACKENDS: usize = 4;
const CHURN_ENDPOINTS: usize = 100;
const CHURN_IN_FLIGHT: usize = 32;
/// One endpoint replaced per tick: 10% of 100 per second.
const CHURN_TICK: Duration = Duration::from_millis(100);

type MakeStrategy = fn() -> Box<dyn Strategy>;

const STRATEGIES: [(&str, MakeStrategy); 3] = [
    ("round-robin", || Box::new(RoundRobin::new())),
    ("peak-ewma", || Box::new(PeakEwma::new())),
    ("ring-hash", || {
        Box::new(ConsistentHash::header(HeaderName::from_static(KEY_HEADER)))
    }),
];

pub fn run(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let mut entries = Vec::new();
        let mut rows = Vec::new();
        let mut growth = serde_json::Map::new();
        for (strategy, make) in STRATEGIES {
            let mut picks = Vec::new();
            for endpoints in SIZES {
                let m = measure(settings, make, endpoints).await?;
                rows.push(vec![
                    strategy.to_string(),
                    endpoints.to_string(),
                    format!("{:.0}", m.pick_ns),
                    format!("{:+.2}", m.allocs_per_call),
                    format!("{:.2}", m.rebuild_ms),
                    m.bytes_per_endpoint.to_string(),
                ]);
                entries.push(serde_json::json!({
                    "strategy": strategy,
                    "endpoints": endpoints,
                    "pick_ns": (m.pick_ns * 10.0).round() / 10.0,
                    "allocs_per_call": (m.allocs_per_call * 100.0).round() / 100.0,
                    "rebuild_ms": (m.rebuild_ms * 1000.0).round() / 1000.0,
                    "bytes_per_endpoint": m.bytes_per_endpoint,
                }));
                picks.push(m.pick_ns);
            }
            let ratio = picks[picks.len() - 1] / picks[0].max(1e-9);
            growth.insert(strategy.into(), ((ratio * 100.0).round() / 100.0).into());
        }
        print_table(
            &[
                "strategy",
                "endpoints",
                "pick ns",
                "allocs/call",
                "rebuild ms",
                "bytes/endpoint",
            ],
            &rows,
        );
        note(
            "pick ns: per call over a trivial endpoint called directly (thread CPU time); \
             rebuild: one Insert sent to the strategy serving the new set; bytes: heap held \
             per endpoint. Goals: pick at 1,000 ≤ 1.5× at 10, rebuild ≤ 5 ms.",
        );

        let churn = churn(settings).await?;
        Ok(serde_json::json!({
            "endpoints": entries,
            "pick_1000_over_10": growth,
            "churn": churn,
            "goals": {
                "pick_1000_over_10": 1.5,
                "rebuild_ms": 5.0,
                "churn_failed": 0,
            },
        }))
    })
}

/// One strategy at one size (see the module docs).
struct Measured {
    pick_ns: f64,
    /// Allocations per call the balancer adds (median over rounds), beside `pick_ns`.
    allocs_per_call: f64,
    rebuild_ms: f64,
    bytes_per_endpoint: i64,
}

async fn measure(
    settings: Settings,
    make: MakeStrategy,
    endpoints: usize,
) -> Result<Measured, BoxError> {
    let (updated, mut updates) = watch::channel((0, Instant::now()));
    let config = BalanceConfig::builder()
        .strategy(Timed {
            inner: make(),
            updated,
        })
        .build()?;
    let (changes, discovery) = discover::channel(endpoints + 16);
    let mut balance = Balance::new(discovery, Connector, config);
    // Let the balancer's task start before counting what the endpoints hold.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let live_before = alloc::live_bytes();
    for i in 0..endpoints {
        send(
            &changes,
            Change::Insert(endpoint_uri(i), Endpoint::default()),
        )
        .await?;
    }
    serving(&mut updates, endpoints).await?;
    let bytes_per_endpoint = (alloc::live_bytes() - live_before) / endpoints as i64;

    let keys: Vec<HeaderValue> = (0..KEYS)
        .map(|k| HeaderValue::from_str(&format!("user-{k}")).expect("a valid header value"))
        .collect();
    let mut next_key = 0;
    let mut keyed = || {
        let mut request: Request<Body> = trivial::request();
        next_key = (next_key + 1) % KEYS;
        request
            .headers_mut()
            .insert(HeaderName::from_static(KEY_HEADER), keys[next_key].clone());
        request
    };
    let calls = (settings.calls * 3).min(100_000);
    trivial::batch(&mut balance, calls / 4, &mut keyed).await?;
    let (mut added, mut allocs) = (Vec::new(), Vec::new());
    for _ in 0..settings.rounds * 3 {
        let bare = trivial::batch(&mut Immediate, calls, &mut keyed).await?;
        let through = trivial::batch(&mut balance, calls, &mut keyed).await?;
        added.push(through.ns_per_call() - bare.ns_per_call());
        allocs.push(through.allocs_per_call() - bare.allocs_per_call());
    }

    let mut rebuilds = Vec::new();
    for extra in 0..settings.rounds * 2 + 1 {
        let uri = endpoint_uri(endpoints + extra);
        let sent = Instant::now();
        send(&changes, Change::Insert(uri.clone(), Endpoint::default())).await?;
        let served = serving(&mut updates, endpoints + 1).await?;
        rebuilds.push(served.saturating_duration_since(sent).as_secs_f64() * 1e3);
        send(&changes, Change::Remove(uri)).await?;
        serving(&mut updates, endpoints).await?;
    }
    Ok(Measured {
        pick_ns: median(added),
        allocs_per_call: median(allocs),
        rebuild_ms: median(rebuilds),
        bytes_per_endpoint,
    })
}

async fn send(changes: &tokio::sync::mpsc::Sender<Update>, change: Update) -> Result<(), BoxError> {
    changes
        .send(change)
        .await
        .map_err(|_| "the balancer stopped following discovery".into())
}

/// Waits until the strategy was last updated with `candidates` candidates; returns when that
/// update returned.
async fn serving(
    updates: &mut watch::Receiver<(usize, Instant)>,
    candidates: usize,
) -> Result<Instant, BoxError> {
    let update = tokio::time::timeout(
        SETTLE_LIMIT,
        updates.wait_for(|&(count, _)| count == candidates),
    )
    .await
    .map_err(|_| format!("{candidates} endpoints were not all serving within {SETTLE_LIMIT:?}"))?
    .map_err(|_| "the balancer dropped its strategy")?;
    Ok(update.1)
}

/// A strategy that notes when each `update` returned and with how many candidates; otherwise
/// exactly the strategy it wraps.
struct Timed {
    inner: Box<dyn Strategy>,
    updated: watch::Sender<(usize, Instant)>,
}

impl Strategy for Timed {
    fn update(&mut self, candidates: &[Candidate]) {
        self.inner.update(candidates);
        self.updated
            .send_replace((candidates.len(), Instant::now()));
    }

    fn pick(&self, request: &Parts, candidates: &[Candidate]) -> usize {
        self.inner.pick(request, candidates)
    }
}

/// Churn under load (see the module docs).
async fn churn(settings: Settings) -> Result<serde_json::Value, BoxError> {
    let mut backends = Vec::new();
    for _ in 0..CHURN_BACKENDS {
        // Every address: so that each `127.x.y.z` reaches it.
        let any = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        backends.push(Backend::builder().addr(any).start().await?);
    }
    let ports: Vec<u16> = backends.iter().map(|b| b.addr().port()).collect();
    let address = |i: usize| -> Uri {
        format!(
            "http://127.{}.{}.{}:{}",
            1 + i / 62_500,
            i / 250 % 250,
            i % 250 + 1,
            ports[i % ports.len()]
        )
        .parse()
        .expect("a valid URI")
    };
    let (changes, discovery) = discover::channel(CHURN_ENDPOINTS + 16);
    for i in 0..CHURN_ENDPOINTS {
        send(&changes, Change::Insert(address(i), Endpoint::default())).await?;
    }
    let balance = Balance::new(discovery, Connect::new(), BalanceConfig::default());
    ready(&balance, CHURN_ENDPOINTS).await?;

    let duration = settings.duration * 4;
    let load = Load::new(CHURN_IN_FLIGHT)
        .calls(settings.calls * 100)
        .duration(duration);
    let client = EchoClient::new(balance.clone());
    // Warm the connections before measuring.
    drive(&Load::new(CHURN_IN_FLIGHT).calls(500), client.clone()).await;

    // The oldest endpoint out, a new address in, once per tick, for as long as the load runs
    // (and at most as many times as its duration allows).
    let max_replacements = (duration.as_millis() / CHURN_TICK.as_millis()) as usize + 1;
    let replaced = Cell::new(0);
    let replace = async {
        let mut tick = tokio::time::interval(CHURN_TICK);
        tick.tick().await;
        while replaced.get() < max_replacements {
            tick.tick().await;
            let n = replaced.get();
            send(&changes, Change::Remove(address(n))).await?;
            send(
                &changes,
                Change::Insert(address(CHURN_ENDPOINTS + n), Endpoint::default()),
            )
            .await?;
            replaced.set(n + 1);
        }
        std::future::pending::<Result<(), BoxError>>().await
    };
    let figures = tokio::select! {
        figures = drive(&load, client) => figures,
        Err(err) = replace => return Err(err),
    };
    let replaced = replaced.get();
    print_table(
        &[
            "churn", "calls", "failed", "req/s", "p50", "p99", "replaced",
        ],
        &[vec![
            format!("{CHURN_ENDPOINTS} endpoints, 10%/s replaced"),
            figures.calls.to_string(),
            figures.failed.to_string(),
            format!("{:.0}", figures.rps),
            micros(figures.p50),
            micros(figures.p99),
            replaced.to_string(),
        ]],
    );
    Ok(serde_json::json!({
        "strategy": "peak-ewma",
        "endpoints": CHURN_ENDPOINTS,
        "backends": CHURN_BACKENDS,
        "in_flight": CHURN_IN_FLIGHT,
        "replaced_per_s": 1.0 / CHURN_TICK.as_secs_f64(),
        "replaced": replaced,
        "calls": figures.calls,
        "failed": figures.failed,
        "rps": figures.rps.round(),
        "p50_ms": figures.p50.as_secs_f64() * 1e3,
        "p99_ms": figures.p99.as_secs_f64() * 1e3,
    }))
}
