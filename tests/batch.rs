//! `towline::batch` against a scripted inner service (flush triggers under paused time, keys,
//! routing, panics, back-pressure) and against a real testkit `Log.Produce` server (failure,
//! drop and shutdown, retries).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::{Code, Status};
use tower::{Layer, Service, ServiceExt};
use towline::batch::{Batch, BatchConfig, BatchLayer, Batcher};
use towline::testkit::Backend;
use towline::testkit::pb::{ProduceRequest, ProduceResponse, log_client::LogClient};

// ---------------------------------------------------------------------------------------------
// A scripted inner service.

/// An item of the scripted batcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    key: u8,
    id: u64,
    weight: usize,
    /// `merge` panics on a batch holding this item.
    poison_merge: bool,
    /// `weight` panics on this item.
    poison_weight: bool,
}

fn rec(key: u8, id: u64) -> Rec {
    Rec {
        key,
        id,
        weight: 1,
        poison_merge: false,
        poison_weight: false,
    }
}

#[derive(Debug, Clone, Copy)]
struct Scripted;

impl Batcher for Scripted {
    type Item = Rec;
    type Key = u8;
    type Request = (u8, Vec<Rec>);
    type Response = Vec<Result<u64, Status>>;
    type Output = u64;

    fn key(&mut self, item: &Rec) -> u8 {
        item.key
    }
    fn weight(&mut self, item: &Rec) -> usize {
        assert!(!item.poison_weight, "poisoned weight");
        item.weight
    }
    fn merge(&mut self, key: &u8, items: Vec<Rec>) -> (u8, Vec<Rec>) {
        assert!(items.iter().all(|r| !r.poison_merge), "poisoned merge");
        (*key, items)
    }
    fn split(&mut self, _: &u8, _: usize, response: Self::Response) -> Vec<Result<u64, Status>> {
        response
    }
}

/// The answer the scripted inner gives an item: a function of the item, so a caller can tell
/// its own from anyone else's. Ids divisible by 7 fail on their own.
fn answer(r: &Rec) -> Result<u64, Status> {
    if r.id.is_multiple_of(7) {
        Err(Status::invalid_argument(format!("item {} rejected", r.id)))
    } else {
        Ok(r.id * 1000 + u64::from(r.key))
    }
}

/// A batch the scripted inner received, and the means to answer it.
struct Received {
    key: u8,
    items: Vec<Rec>,
    reply: oneshot::Sender<Result<Vec<Result<u64, Status>>, Status>>,
}

impl Received {
    fn ids(&self) -> Vec<u64> {
        self.items.iter().map(|r| r.id).collect()
    }
    fn answer(self) {
        assert!(self.items.iter().all(|r| r.key == self.key), "keys mixed");
        let results = self.items.iter().map(answer).collect();
        let _ = self.reply.send(Ok(results));
    }
}

/// The scripted batch service.
type Inner = tower::util::BoxService<(u8, Vec<Rec>), Vec<Result<u64, Status>>, Status>;

/// An inner service that hands every batch to the test, which answers it when it likes.
fn scripted() -> (Inner, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let svc = Inner::new(tower::service_fn(move |(key, items): (u8, Vec<Rec>)| {
        let (reply, answered) = oneshot::channel();
        let sent = tx.send(Received { key, items, reply });
        async move {
            sent.map_err(|_| Status::internal("test gone"))?;
            answered
                .await
                .map_err(|_| Status::internal("test dropped the batch"))?
        }
    }));
    (svc, rx)
}

/// An inner service that answers every batch at once, and reports it.
fn answering() -> (Inner, mpsc::UnboundedReceiver<(u8, Vec<u64>)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let svc = Inner::new(tower::service_fn(move |(key, items): (u8, Vec<Rec>)| {
        let _ = tx.send((key, items.iter().map(|r| r.id).collect()));
        let results = items.iter().map(answer).collect();
        std::future::ready(Ok::<_, Status>(results))
    }));
    (svc, rx)
}

fn config() -> towline::batch::BatchConfigBuilder {
    BatchConfig::builder().linger(Duration::from_secs(3600))
}

/// Readies `svc` and calls it, returning the response future without awaiting it.
async fn send<S: Service<Rec>>(svc: &mut S, item: Rec) -> S::Future
where
    S::Error: std::fmt::Debug,
{
    svc.ready().await.expect("ready");
    svc.call(item)
}

// ---------------------------------------------------------------------------------------------
// Flush triggers, under paused time: a trigger that did not fire would let the clock jump to
// the one-hour linger.

#[tokio::test(start_paused = true)]
async fn flushes_on_count() {
    let (inner, mut batches) = scripted();
    let mut batch = BatchLayer::new(Scripted, config().max_items(3).build().unwrap()).layer(inner);
    let start = Instant::now();
    let mut calls = Vec::new();
    for id in 1..=4 {
        calls.push(send(&mut batch, rec(0, id)).await);
    }
    let first = batches.recv().await.unwrap();
    assert_eq!(first.ids(), [1, 2, 3]);
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "the count trigger must not wait"
    );
    first.answer();
    let fourth = calls.pop().unwrap();
    for (id, call) in (1..=3).zip(calls) {
        assert_eq!(call.await.unwrap(), id * 1000);
    }
    // The fourth item is alone in the next batch, which waits for its linger time.
    let second = batches.recv().await.unwrap();
    assert_eq!(second.ids(), [4]);
    assert_eq!(start.elapsed(), Duration::from_secs(3600));
    second.answer();
    assert_eq!(fourth.await.unwrap(), 4000);
}

#[tokio::test(start_paused = true)]
async fn flushes_on_bytes_and_sends_a_heavy_item_alone() {
    let (inner, mut batches) = answering();
    let mut batch =
        BatchLayer::new(Scripted, config().max_bytes(100).build().unwrap()).layer(inner);
    let start = Instant::now();
    let weighted = |id, weight| Rec {
        weight,
        ..rec(0, id)
    };
    let mut calls = Vec::new();
    // 40 + 40 fit; a third 40 would pass 100, so it starts the next batch.
    for id in 1..=3 {
        calls.push(send(&mut batch, weighted(id, 40)).await);
    }
    assert_eq!(batches.recv().await.unwrap(), (0, vec![1, 2]));
    // 40 + 60 reaches 100 exactly: flushed on bytes.
    calls.push(send(&mut batch, weighted(4, 60)).await);
    assert_eq!(batches.recv().await.unwrap(), (0, vec![3, 4]));
    // Heavier than max_bytes on its own: sent alone, at once.
    calls.push(send(&mut batch, weighted(5, 500)).await);
    assert_eq!(batches.recv().await.unwrap(), (0, vec![5]));
    assert_eq!(start.elapsed(), Duration::ZERO);
    for (id, call) in (1..).zip(calls) {
        assert_eq!(call.await.unwrap(), id * 1000);
    }
}

#[tokio::test(start_paused = true)]
async fn flushes_on_linger() {
    let (inner, mut batches) = answering();
    let config = BatchConfig::builder()
        .linger(Duration::from_millis(100))
        .build()
        .unwrap();
    let mut batch = BatchLayer::new(Scripted, config).layer(inner);
    let start = Instant::now();
    let first = send(&mut batch, rec(0, 1)).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    let second = send(&mut batch, rec(0, 2)).await;
    assert_eq!(batches.recv().await.unwrap(), (0, vec![1, 2]));
    // Linger counts from the batch's first item, not its last.
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(first.await.unwrap(), 1000);
    assert_eq!(second.await.unwrap(), 2000);
}

#[tokio::test(start_paused = true)]
async fn flushes_on_explicit_flush_every_key() {
    let (inner, mut batches) = answering();
    let mut batch = BatchLayer::new(Scripted, config().build().unwrap()).layer(inner);
    let start = Instant::now();
    let a = send(&mut batch, rec(1, 1)).await;
    let b = send(&mut batch, rec(2, 2)).await;
    batch.flush().unwrap();
    let mut got = vec![batches.recv().await.unwrap(), batches.recv().await.unwrap()];
    got.sort();
    assert_eq!(got, [(1, vec![1]), (2, vec![2])]);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(a.await.unwrap(), 1001);
    assert_eq!(b.await.unwrap(), 2002);
}

#[tokio::test(start_paused = true)]
async fn flushes_when_the_last_handle_is_dropped() {
    let (inner, mut batches) = answering();
    let (mut batch, worker) = Batch::pair(inner, Scripted, config().build().unwrap());
    let worker = tokio::spawn(worker);
    let start = Instant::now();
    let mut other = batch.clone();
    let a = send(&mut batch, rec(0, 1)).await;
    let b = send(&mut other, rec(0, 2)).await;
    drop(batch);
    // One handle is left: nothing is flushed. (There is no signal for something not happening:
    // with the clock paused, this sleep returns only once every other task is idle.)
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(batches.try_recv().is_err());
    drop(other);
    assert_eq!(batches.recv().await.unwrap(), (0, vec![1, 2]));
    assert_eq!(a.await.unwrap(), 1000);
    assert_eq!(b.await.unwrap(), 2000);
    worker.await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(1));
}

// ---------------------------------------------------------------------------------------------
// Keys and routing.

#[tokio::test(start_paused = true)]
async fn keys_never_share_a_batch() {
    let (inner, mut batches) = answering();
    let config = BatchConfig::builder()
        .max_items(5)
        .linger(Duration::from_millis(10))
        .build()
        .unwrap();
    let batch = BatchLayer::new(Scripted, config).layer(inner);
    let mut rng = fastrand::Rng::with_seed(5);
    let mut key_of = HashMap::new();
    let mut calls = Vec::new();
    for id in 1..=400u64 {
        let key = rng.u8(0..6);
        key_of.insert(id, key);
        calls.push(batch.clone().oneshot(rec(key, id)));
    }
    futures::future::join_all(calls).await;
    let mut seen = 0;
    while let Ok((key, ids)) = batches.try_recv() {
        assert!((1..=5).contains(&ids.len()), "{ids:?}");
        for id in &ids {
            assert_eq!(
                key_of[id], key,
                "item {id} of key {} in a batch of key {key}",
                key_of[id]
            );
        }
        seen += ids.len();
    }
    assert_eq!(seen, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_gets_its_own_result() {
    // Many concurrent callers, random keys, batches answered in random order and at random
    // times, some items failing on their own.
    let (inner, mut batches) = scripted();
    let config = BatchConfig::builder()
        .max_items(16)
        .max_in_flight(4)
        .linger(Duration::from_millis(2))
        .build()
        .unwrap();
    let batch = BatchLayer::new(Scripted, config).layer(inner);
    let answerer = tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut held = Vec::new();
        while let Some(received) = batches.recv().await {
            held.push(received);
            // Answer a random held batch, now and then, leaving others in flight.
            while !held.is_empty() && rng.bool() {
                let i = rng.usize(..held.len());
                held.swap_remove(i).answer();
            }
            if held.len() >= 4 {
                held.swap_remove(rng.usize(..held.len())).answer();
            }
            tokio::time::sleep(Duration::from_micros(rng.u64(0..300))).await;
            // Batches already in are answered before waiting for more.
            if batches.is_empty() {
                for received in held.drain(..) {
                    received.answer();
                }
            }
        }
    });
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..64u64 {
        let mut batch = batch.clone();
        callers.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(caller);
            let mut checked = 0;
            for n in 0..50u64 {
                let item = rec(rng.u8(0..4), caller * 1000 + n + 1);
                let got = batch.ready().await.unwrap().call(item).await;
                match answer(&item) {
                    Ok(want) => assert_eq!(got.unwrap(), want),
                    Err(want) => assert_eq!(got.unwrap_err().message(), want.message()),
                }
                checked += 1;
            }
            checked
        });
    }
    let mut checked = 0;
    while let Some(n) = callers.join_next().await {
        checked += n.unwrap();
    }
    assert_eq!(checked, 64 * 50);
    drop(batch);
    answerer.await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Failures and panics.

#[tokio::test(start_paused = true)]
async fn a_failed_batch_fails_every_caller_in_it() {
    let (inner, mut batches) = scripted();
    let mut batch = BatchLayer::new(Scripted, config().max_items(5).build().unwrap()).layer(inner);
    let mut calls = Vec::new();
    for id in 1..=5 {
        calls.push(send(&mut batch, rec(0, id)).await);
    }
    let received = batches.recv().await.unwrap();
    let _ = received
        .reply
        .send(Err(Status::resource_exhausted("log full")));
    for call in calls {
        let err = call.await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(err.message(), "log full");
    }
    // The next batch is unaffected.
    let next = batch.clone().oneshot(rec(0, 6));
    let (next, ()) = tokio::join!(next, async {
        batch.flush().unwrap();
        batches.recv().await.unwrap().answer();
    });
    assert_eq!(next.unwrap(), 6000);
}

#[tokio::test(start_paused = true)]
async fn a_batcher_panic_fails_only_that_batch() {
    let (inner, mut batches) = answering();
    let mut batch = BatchLayer::new(Scripted, config().max_items(2).build().unwrap()).layer(inner);
    let poisoned = Rec {
        poison_merge: true,
        ..rec(1, 2)
    };
    let a = send(&mut batch, rec(1, 1)).await;
    let b = send(&mut batch, poisoned).await;
    let c = send(&mut batch, rec(2, 3)).await;
    let d = send(&mut batch, rec(2, 4)).await;
    for call in [a, b] {
        let err = call.await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(
            err.message().contains("panicked: poisoned merge"),
            "{err:?}"
        );
    }
    assert_eq!(c.await.unwrap(), 3002);
    assert_eq!(d.await.unwrap(), 4002);
    // A panic in `weight` fails that item alone, in the batch it would have joined.
    let e = send(&mut batch, rec(1, 5)).await;
    let f = send(
        &mut batch,
        Rec {
            poison_weight: true,
            ..rec(1, 6)
        },
    )
    .await;
    let g = send(&mut batch, rec(1, 8)).await;
    let err = f.await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(err.message().contains("poisoned weight"), "{err:?}");
    assert_eq!(e.await.unwrap(), 5001);
    assert_eq!(g.await.unwrap(), 8001);
    // Only the two good batches and the last one reached the inner service.
    let mut sent = Vec::new();
    while let Ok((_, ids)) = batches.try_recv() {
        sent.push(ids);
    }
    assert_eq!(sent, [vec![3, 4], vec![5, 8]]);
}

/// A batch service whose `poll_ready` fails once `broken` is set.
#[derive(Clone)]
struct Breakable {
    broken: Arc<AtomicBool>,
}

impl Service<(u8, Vec<Rec>)> for Breakable {
    type Response = Vec<Result<u64, Status>>;
    type Error = Status;
    type Future = std::future::Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        if self.broken.load(Ordering::SeqCst) {
            Poll::Ready(Err(Status::unavailable("backend gone for good")))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, (_, items): (u8, Vec<Rec>)) -> Self::Future {
        std::future::ready(Ok(items.iter().map(answer).collect()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_inner_service_stops_the_worker_and_every_later_call_fails_fast() {
    let broken = Arc::new(AtomicBool::new(false));
    let inner = Breakable {
        broken: broken.clone(),
    };
    let (mut batch, worker) = Batch::pair(inner, Scripted, config().max_items(2).build().unwrap());
    let worker = tokio::spawn(worker);
    let sent = [
        send(&mut batch, rec(0, 1)).await,
        send(&mut batch, rec(0, 2)).await,
    ];
    // A batch sent before it breaks is answered.
    for (id, call) in (1..).zip(sent) {
        assert_eq!(call.await.unwrap(), id * 1000);
    }
    broken.store(true, Ordering::SeqCst);
    let pending = send(&mut batch, rec(0, 3)).await;
    batch.flush().unwrap();
    let err = pending.await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("backend gone for good"), "{err:?}");
    worker.await.unwrap();
    let err = batch.ready().await.unwrap_err();
    assert!(err.message().contains("worker has stopped"), "{err:?}");
    assert!(batch.flush().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_dropped_worker_fails_its_items_and_later_calls_instead_of_hanging() {
    let (inner, mut batches) = scripted();
    let (mut batch, worker) = Batch::pair(inner, Scripted, config().max_items(2).build().unwrap());
    let worker = tokio::spawn(worker);
    let in_flight = [
        send(&mut batch, rec(0, 1)).await,
        send(&mut batch, rec(0, 2)).await,
    ];
    let _held = batches.recv().await.unwrap();
    let open = send(&mut batch, rec(0, 3)).await;
    // Like a runtime shutting down under the worker.
    worker.abort();
    let _ = worker.await;
    for call in in_flight.into_iter().chain([open]) {
        let err = call.await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.message().contains("worker stopped"), "{err:?}");
    }
    let err = batch.ready().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}

// ---------------------------------------------------------------------------------------------
// Back-pressure.

#[tokio::test(start_paused = true)]
async fn back_pressure_bounds_what_is_held() {
    // 2 items a batch, 2 batches in flight, 4 items pending: at most 8 items held.
    let (inner, mut batches) = scripted();
    let config = config()
        .max_items(2)
        .max_in_flight(2)
        .max_pending_items(4)
        .build()
        .unwrap();
    let mut batch = BatchLayer::new(Scripted, config).layer(inner);
    let mut calls = Vec::new();
    for id in 1..=4 {
        calls.push(send(&mut batch, rec(0, id)).await);
    }
    // Both batches in flight, never answered yet.
    let first = batches.recv().await.unwrap();
    let second = batches.recv().await.unwrap();
    for id in 5..=8 {
        calls.push(send(&mut batch, rec(0, id)).await);
    }
    // Room for no ninth item, on this handle or any other, however long one waits.
    let mut other = batch.clone();
    let blocked = tokio::time::timeout(Duration::from_secs(7200), other.ready()).await;
    assert!(
        blocked.is_err(),
        "poll_ready must wait while 8 items are held"
    );
    assert!(batch.ready().now_or_never().is_none());
    assert!(
        batches.try_recv().is_err(),
        "no third batch while two are in flight"
    );
    // One batch back: its slot takes the next batch, whose room takes new items.
    first.answer();
    let third = batches.recv().await.unwrap();
    assert_eq!(third.ids(), [5, 6]);
    let ninth = tokio::time::timeout(Duration::from_secs(1), other.ready()).await;
    assert!(ninth.is_ok(), "room is given back once a batch is sent");
    second.answer();
    third.answer();
    batches.recv().await.unwrap().answer();
    for (id, call) in (1..).zip(calls) {
        assert_eq!(call.await.ok(), answer(&rec(0, id)).ok());
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_pending_room_flushes_partial_batches_at_once() {
    // Ten items of room, batches of ten, spread over two keys: no batch reaches its count, and
    // waiting for the linger time would hold every later caller for an hour.
    let (inner, mut batches) = answering();
    let config = config()
        .max_items(10)
        .max_pending_items(10)
        .build()
        .unwrap();
    let mut batch = BatchLayer::new(Scripted, config).layer(inner);
    let start = Instant::now();
    let mut calls = Vec::new();
    for id in 1..=11 {
        calls.push(send(&mut batch, rec((id % 2) as u8, id)).await);
    }
    let mut got = vec![batches.recv().await.unwrap(), batches.recv().await.unwrap()];
    got.sort();
    assert_eq!(got, [(0, vec![2, 4, 6, 8, 10]), (1, vec![1, 3, 5, 7, 9])]);
    assert_eq!(start.elapsed(), Duration::ZERO);
    // The eleventh item waits in a batch of its own for its linger time.
    assert_eq!(batches.recv().await.unwrap(), (1, vec![11]));
    assert_eq!(start.elapsed(), Duration::from_secs(3600));
    for (id, call) in (1..).zip(calls) {
        assert_eq!(call.await.ok(), answer(&rec((id % 2) as u8, id)).ok());
    }
}

#[test]
fn bad_config_names_the_field() {
    let err = BatchConfig::builder().max_bytes(0).build().unwrap_err();
    assert_eq!(err.field(), "batch.max_bytes");
    assert!(err.to_string().starts_with("batch.max_bytes: "), "{err}");
    let err = BatchConfig::builder()
        .max_items(50)
        .max_pending_items(10)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "batch.max_pending_items");
    assert!(err.to_string().contains("max_items (50)"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Against a real tonic server: `Log.Produce` on the testkit backend.

#[derive(Debug, Clone, Copy)]
struct Records;

impl Batcher for Records {
    type Item = (u8, bytes::Bytes);
    type Key = u8;
    type Request = ProduceRequest;
    type Response = tonic::Response<ProduceResponse>;
    type Output = u64;

    fn key(&mut self, item: &Self::Item) -> u8 {
        item.0
    }
    fn weight(&mut self, item: &Self::Item) -> usize {
        item.1.len()
    }
    fn merge(&mut self, key: &u8, items: Vec<Self::Item>) -> ProduceRequest {
        ProduceRequest {
            key: key.to_string(),
            records: items.into_iter().map(|(_, r)| r).collect(),
        }
    }
    fn split(&mut self, _: &u8, _: usize, res: Self::Response) -> Vec<Result<u64, Status>> {
        let results = res.into_inner().results.into_iter();
        results
            .map(|r| match Code::from_i32(r.code) {
                Code::Ok => Ok(r.offset),
                code => Err(Status::new(code, r.message)),
            })
            .collect()
    }
}

type Produce =
    tower::util::BoxCloneService<ProduceRequest, tonic::Response<ProduceResponse>, Status>;

fn produce(backend: &Backend) -> Produce {
    let client = LogClient::new(tonic::transport::Endpoint::from(backend.uri()).connect_lazy());
    tower::util::BoxCloneService::new(tower::service_fn(move |req: ProduceRequest| {
        let mut client = client.clone();
        async move { client.produce(req).await }
    }))
}

fn record(n: u64) -> bytes::Bytes {
    bytes::Bytes::from(n.to_le_bytes().to_vec())
}

#[tokio::test]
async fn a_failed_produce_reaches_every_caller_and_records_nothing() {
    let backend = Backend::start().await.unwrap();
    let config = BatchConfig::builder().max_items(10).build().unwrap();
    let batch = BatchLayer::new(Records, config).layer(produce(&backend));
    backend.fail_next(1, Code::Unavailable);
    let calls = (0..10).map(|n| batch.clone().oneshot((0, record(n))));
    for result in futures::future::join_all(calls).await {
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.message().contains("injected failure"), "{err:?}");
    }
    assert_eq!(backend.calls(), 1);
    assert_eq!(backend.records(), 0);
}

#[tokio::test]
async fn dropped_callers_and_shutdown_lose_nothing() {
    let backend = Backend::start().await.unwrap();
    backend.set_latency(Duration::from_millis(2));
    let config = BatchConfig::builder()
        .max_items(64)
        .max_in_flight(2)
        .linger(Duration::from_secs(3600))
        .build()
        .unwrap();
    let (mut batch, worker) = Batch::pair(produce(&backend), Records, config);
    let worker = tokio::spawn(worker);
    let mut rng = fastrand::Rng::with_seed(3);
    let mut kept = Vec::new();
    let total = 1000u64;
    // Real time here, and an hour's linger: fail rather than hang if anything waits for it.
    let bound = Duration::from_secs(30);
    for n in 0..total {
        let ready = tokio::time::timeout(bound, batch.ready()).await;
        ready
            .expect("poll_ready waited for the linger time")
            .unwrap();
        let call = batch.call((rng.u8(0..3), record(n)));
        // Half the callers give up on their result at once; their items still go.
        if rng.bool() {
            kept.push(call);
        }
    }
    // The last handle goes with batches still open (the linger is an hour): they are flushed.
    drop(batch);
    let kept_count = kept.len();
    let results = tokio::time::timeout(bound, futures::future::join_all(kept)).await;
    for result in results.expect("an item waited for the linger time") {
        result.unwrap();
    }
    tokio::time::timeout(bound, worker)
        .await
        .expect("the worker did not end")
        .unwrap();
    assert!(kept_count > 400 && kept_count < 600, "{kept_count}");
    assert_eq!(backend.records(), total);
}

#[tokio::test]
async fn a_retry_layer_retries_a_failed_batch_as_a_whole() {
    #[derive(Clone)]
    struct Once(usize);
    impl<E> tower::retry::Policy<ProduceRequest, tonic::Response<ProduceResponse>, E> for Once {
        type Future = std::future::Ready<()>;
        fn retry(
            &mut self,
            _: &mut ProduceRequest,
            result: &mut Result<tonic::Response<ProduceResponse>, E>,
        ) -> Option<Self::Future> {
            (result.is_err() && self.0 > 0).then(|| {
                self.0 -= 1;
                std::future::ready(())
            })
        }
        fn clone_request(&mut self, req: &ProduceRequest) -> Option<ProduceRequest> {
            Some(req.clone())
        }
    }

    let backend = Backend::start().await.unwrap();
    let retried = tower::retry::RetryLayer::new(Once(1)).layer(produce(&backend));
    let config = BatchConfig::builder().max_items(10).build().unwrap();
    let batch = BatchLayer::new(Records, config).layer(retried);
    backend.fail_next(1, Code::Unavailable);
    let calls = (0..10).map(|n| batch.clone().oneshot((0, record(n))));
    let mut offsets: Vec<u64> = futures::future::try_join_all(calls).await.unwrap();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..10).collect::<Vec<_>>());
    assert_eq!(
        backend.calls(),
        2,
        "one failed attempt, one retry of the whole batch"
    );
    assert_eq!(backend.records(), 10);
}

#[tokio::test]
async fn towlines_retry_layer_under_the_batch_retries_a_failed_batch_as_a_whole() {
    use towline::retry::{RetryLayer, RetryPolicy};

    let backend = Backend::start().await.unwrap();
    let channel = towline::connect::Connect::new()
        .oneshot(backend.uri())
        .await
        .unwrap();
    let policy = RetryPolicy::builder()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(1))
        .build()
        .unwrap();
    // The batch RPC's client runs over RetryLayer: Batch -> Produce -> RetryLayer -> Channel.
    let client = LogClient::new(RetryLayer::new(policy).layer(channel));
    let produce = tower::service_fn(move |req: ProduceRequest| {
        let mut client = client.clone();
        async move { client.produce(req).await }
    });
    let config = BatchConfig::builder().max_items(10).build().unwrap();
    let batch = BatchLayer::new(Records, config).layer(produce);
    backend.fail_next(2, Code::Unavailable);
    let calls = (0..10).map(|n| batch.clone().oneshot((0, record(n))));
    let mut offsets: Vec<u64> = futures::future::try_join_all(calls).await.unwrap();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..10).collect::<Vec<_>>());
    assert_eq!(
        backend.calls(),
        3,
        "two failed attempts, then the whole batch again"
    );
    assert_eq!(backend.records(), 10);
}

#[tokio::test]
async fn a_rejected_record_fails_alone() {
    let backend = Backend::start().await.unwrap();
    let config = BatchConfig::builder().max_items(3).build().unwrap();
    let batch = BatchLayer::new(Records, config).layer(produce(&backend));
    let (a, b, c) = tokio::join!(
        batch.clone().oneshot((0, record(1))),
        batch.clone().oneshot((0, bytes::Bytes::new())),
        batch.clone().oneshot((0, record(2))),
    );
    assert_eq!(backend.calls(), 1);
    assert_eq!(b.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!([a.unwrap(), c.unwrap()], [0, 1]);
}
