//! The batch worker: one task per [`Batch`](super::Batch) that owns the [`Batcher`] and the inner
//! service, fills batches, flushes them and answers every item.

use std::any::Any;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use metrics::{Counter, Histogram};
use pin_project_lite::pin_project;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tower_service::Service;

use super::service::Shared;
use super::{BatchConfig, Batcher};
use crate::BoxError;
use crate::status::status_from_error;

/// How many messages the worker takes off its queue at once.
const RECV_CHUNK: usize = 256;

/// What a handle sends its worker.
pub(super) enum Message<T, U> {
    /// One item and where its result goes. Carries one semaphore permit, taken by `poll_ready`
    /// and forgotten; the worker adds it back once the item has left (sent or failed).
    Item {
        item: T,
        tx: oneshot::Sender<Result<U, Status>>,
    },
    /// Flush every open batch.
    Flush,
}

type Waiter<B> = oneshot::Sender<Result<<B as Batcher>::Output, Status>>;

/// Why a batch was flushed: the `reason` label of `towline.batch.flushes`.
#[derive(Debug, Clone, Copy)]
enum Flush {
    Count = 0,
    Bytes = 1,
    Linger = 2,
    Explicit = 3,
    Shutdown = 4,
    Full = 5,
}

impl Flush {
    const LABELS: [&'static str; 6] = ["count", "bytes", "linger", "flush", "shutdown", "full"];
}

/// Metric handles, registered once per worker so that recording is an atomic add, not a lookup.
pub(super) struct Metrics {
    /// `towline.batch.size`: items per batch sent.
    size: Histogram,
    /// `towline.batch.bytes`: weight per batch sent.
    bytes: Histogram,
    /// `towline.batch.flushes{reason}`.
    flushes: [Counter; 6],
    /// `towline.batch.items.failed`: items answered with an error.
    failed: Counter,
}

impl Metrics {
    pub(super) fn new() -> Self {
        Metrics {
            size: metrics::histogram!("towline.batch.size"),
            bytes: metrics::histogram!("towline.batch.bytes"),
            flushes: Flush::LABELS
                .map(|reason| metrics::counter!("towline.batch.flushes", "reason" => reason)),
            failed: metrics::counter!("towline.batch.items.failed"),
        }
    }
}

/// A batch still taking items.
struct Open<B: Batcher> {
    items: Vec<B::Item>,
    waiters: Vec<Waiter<B>>,
    bytes: usize,
    /// Tells this batch from a later one of the same key in the linger queue.
    generation: u64,
}

/// A batch flushed and waiting for a free slot among `max_in_flight`.
struct Sealed<B: Batcher> {
    key: B::Key,
    items: Vec<B::Item>,
    waiters: Vec<Waiter<B>>,
    bytes: usize,
}

pin_project! {
    /// One batch RPC in flight, with the callers it answers.
    struct InFlight<F, K, W> {
        #[pin]
        call: F,
        batch: Option<(K, Vec<W>)>,
    }
}

type Caught<T> = Result<T, Box<dyn Any + Send>>;

impl<F: Future, K, W> Future for InFlight<F, K, W> {
    type Output = (K, Vec<W>, Caught<F::Output>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let output = match catch_unwind(AssertUnwindSafe(|| this.call.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(output)) => Ok(output),
            Err(panic) => Err(panic),
        };
        let (key, waiters) = this.batch.take().expect("InFlight polled after completion");
        Poll::Ready((key, waiters, output))
    }
}

/// The future that does the batching: fills a batch per key, flushes it on count, bytes, linger,
/// [`Batch::flush`](super::Batch::flush) or shutdown, keeps at most `max_in_flight` batch RPCs
/// running, and answers every item. Spawned by [`Batch::new`](super::Batch::new), or returned by
/// [`Batch::pair`](super::Batch::pair) for you to spawn.
///
/// It ends once every handle is dropped and every item accepted has been answered. If it is
/// dropped before that, it answers every item it holds with `UNAVAILABLE` and every handle's
/// later calls fail the same way.
pub struct Worker<S, B>
where
    B: Batcher,
    S: Service<B::Request>,
{
    inner: S,
    batcher: B,
    config: BatchConfig,
    rx: mpsc::UnboundedReceiver<Message<B::Item, B::Output>>,
    received: Vec<Message<B::Item, B::Output>>,
    semaphore: Arc<Semaphore>,
    shared: Arc<Shared>,
    metrics: Metrics,
    open: HashMap<B::Key, Open<B>>,
    /// Open batches by linger deadline. The linger time is fixed, so the order they opened in is
    /// the order they expire in; entries of batches flushed early are skipped when reached.
    lingering: VecDeque<(Instant, B::Key, u64)>,
    next_generation: u64,
    sleep: Option<Pin<Box<Sleep>>>,
    sleep_armed: Option<Instant>,
    sealed: VecDeque<Sealed<B>>,
    in_flight: FuturesUnordered<InFlight<S::Future, B::Key, Waiter<B>>>,
    /// No more messages will come: every handle is gone, or the worker failed.
    closed: bool,
    /// Ended normally: nothing left to answer.
    finished: bool,
}

// The worker never pins `inner`, `batcher` or any item: each is only used through `&mut`.
impl<S, B> Unpin for Worker<S, B>
where
    B: Batcher,
    S: Service<B::Request>,
{
}

impl<S, B> Worker<S, B>
where
    B: Batcher,
    S: Service<B::Request, Response = B::Response>,
    S::Error: Into<BoxError>,
{
    pub(super) fn new(
        inner: S,
        batcher: B,
        config: BatchConfig,
        rx: mpsc::UnboundedReceiver<Message<B::Item, B::Output>>,
        semaphore: Arc<Semaphore>,
        shared: Arc<Shared>,
        metrics: Metrics,
    ) -> Self {
        Worker {
            inner,
            batcher,
            config,
            rx,
            received: Vec::with_capacity(RECV_CHUNK),
            semaphore,
            shared,
            metrics,
            open: HashMap::new(),
            lingering: VecDeque::new(),
            next_generation: 0,
            sleep: None,
            sleep_armed: None,
            sealed: VecDeque::new(),
            in_flight: FuturesUnordered::new(),
            closed: false,
            finished: false,
        }
    }

    fn accept(&mut self, message: Message<B::Item, B::Output>) {
        match message {
            Message::Item { item, tx } => self.add(item, tx),
            Message::Flush => self.seal_all(Flush::Explicit),
        }
    }

    fn add(&mut self, item: B::Item, tx: Waiter<B>) {
        let batcher = &mut self.batcher;
        let key_weight = catch_unwind(AssertUnwindSafe(|| {
            (batcher.key(&item), batcher.weight(&item))
        }));
        let (key, weight) = match key_weight {
            Ok(key_weight) => key_weight,
            Err(panic) => {
                self.semaphore.add_permits(1);
                self.metrics.failed.increment(1);
                let _ = tx.send(Err(panic_status(
                    "Batcher::key or Batcher::weight",
                    &*panic,
                )));
                return;
            }
        };
        let (max_items, max_bytes) = (self.config.max_items(), self.config.max_bytes());
        // An item that would take a batch over max_bytes starts the next one.
        if let Some(open) = self.open.get(&key)
            && open.bytes.saturating_add(weight) > max_bytes
            && let Some((key, open)) = self.open.remove_entry(&key)
        {
            seal(&mut self.sealed, &self.metrics, key, open, Flush::Bytes);
        }
        match self.open.entry(key) {
            Entry::Occupied(mut entry) => {
                let open = entry.get_mut();
                open.items.push(item);
                open.waiters.push(tx);
                open.bytes = open.bytes.saturating_add(weight);
                if let Some(reason) = trigger(open, max_items, max_bytes) {
                    let (key, open) = entry.remove_entry();
                    seal(&mut self.sealed, &self.metrics, key, open, reason);
                }
            }
            Entry::Vacant(entry) => {
                let capacity = max_items.min(1024);
                let mut open = Open {
                    items: Vec::with_capacity(capacity),
                    waiters: Vec::with_capacity(capacity),
                    bytes: weight,
                    generation: self.next_generation,
                };
                self.next_generation += 1;
                open.items.push(item);
                open.waiters.push(tx);
                if let Some(reason) = trigger(&open, max_items, max_bytes) {
                    seal(
                        &mut self.sealed,
                        &self.metrics,
                        entry.into_key(),
                        open,
                        reason,
                    );
                } else {
                    let deadline = Instant::now() + self.config.linger();
                    self.lingering
                        .push_back((deadline, entry.key().clone(), open.generation));
                    entry.insert(open);
                }
            }
        }
    }

    fn seal_all(&mut self, reason: Flush) {
        for (key, open) in self.open.drain() {
            seal(&mut self.sealed, &self.metrics, key, open, reason);
        }
        self.lingering.clear();
    }

    /// Flushes the batches whose linger time is up; arms the timer for the next. Whether any was.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> bool {
        let mut flushed = false;
        let mut now = Instant::now();
        while let Some((deadline, key, generation)) = self.lingering.front() {
            let current = self
                .open
                .get(key)
                .is_some_and(|open| open.generation == *generation);
            if !current {
                self.lingering.pop_front();
                continue;
            }
            let deadline = *deadline;
            if deadline <= now {
                let (_, key, _) = self.lingering.pop_front().expect("front exists");
                if let Some((key, open)) = self.open.remove_entry(&key) {
                    seal(&mut self.sealed, &self.metrics, key, open, Flush::Linger);
                    flushed = true;
                }
                continue;
            }
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if self.sleep_armed != Some(deadline) {
                sleep.as_mut().reset(deadline);
                self.sleep_armed = Some(deadline);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                break;
            }
            now = Instant::now().max(deadline);
        }
        flushed
    }

    /// Sends the oldest sealed batch; the inner service is ready.
    fn dispatch(&mut self) {
        let Some(Sealed {
            key,
            items,
            waiters,
            bytes,
        }) = self.sealed.pop_front()
        else {
            return;
        };
        // These items no longer wait: make room for as many new ones.
        self.semaphore.add_permits(items.len());
        self.metrics.size.record(items.len() as f64);
        self.metrics.bytes.record(bytes as f64);
        let (batcher, inner) = (&mut self.batcher, &mut self.inner);
        let call = catch_unwind(AssertUnwindSafe(|| {
            let request = batcher.merge(&key, items);
            inner.call(request)
        }));
        match call {
            Ok(call) => self.in_flight.push(InFlight {
                call,
                batch: Some((key, waiters)),
            }),
            Err(panic) => {
                let status = panic_status("Batcher::merge or the inner service's call", &*panic);
                fail_waiters(&self.metrics, waiters, &status);
            }
        }
    }

    /// Answers the callers of a batch that has come back.
    fn finish(
        &mut self,
        key: B::Key,
        waiters: Vec<Waiter<B>>,
        output: Caught<Result<B::Response, S::Error>>,
    ) {
        let response = match output {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                let status = status_from_error(err.into());
                return fail_waiters(&self.metrics, waiters, &status);
            }
            Err(panic) => {
                let status = panic_status("the inner service's response future", &*panic);
                return fail_waiters(&self.metrics, waiters, &status);
            }
        };
        let count = waiters.len();
        let batcher = &mut self.batcher;
        let results = match catch_unwind(AssertUnwindSafe(|| batcher.split(&key, count, response)))
        {
            Ok(results) => results,
            Err(panic) => {
                let status = panic_status("Batcher::split", &*panic);
                return fail_waiters(&self.metrics, waiters, &status);
            }
        };
        let returned = results.len();
        let mut results = results.into_iter();
        let mut failed = 0;
        for waiter in waiters {
            let result = results.next().unwrap_or_else(|| {
                Err(Status::internal(format!(
                    "towline batch: Batcher::split returned {returned} results for {count} items"
                )))
            });
            failed += u64::from(result.is_err());
            let _ = waiter.send(result);
        }
        if failed > 0 {
            self.metrics.failed.increment(failed);
        }
    }

    /// Stops taking items and answers every item not yet sent with `status`. Batches in flight
    /// are left to finish.
    fn fail_pending(&mut self, status: &Status) {
        self.closed = true;
        self.semaphore.close();
        self.rx.close();
        while let Ok(message) = self.rx.try_recv() {
            if let Message::Item { tx, .. } = message {
                fail_waiters(&self.metrics, [tx], status);
            }
        }
        for message in self.received.drain(..) {
            if let Message::Item { tx, .. } = message {
                fail_waiters(&self.metrics, [tx], status);
            }
        }
        for (_, open) in self.open.drain() {
            fail_waiters(&self.metrics, open.waiters, status);
        }
        for sealed in self.sealed.drain(..) {
            fail_waiters(&self.metrics, sealed.waiters, status);
        }
        self.lingering.clear();
    }
}

impl<S, B> Future for Worker<S, B>
where
    B: Batcher,
    S: Service<B::Request, Response = B::Response>,
    S::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(());
        }
        loop {
            let mut progress = false;

            while let Poll::Ready(Some((key, waiters, output))) = this.in_flight.poll_next_unpin(cx)
            {
                this.finish(key, waiters, output);
                progress = true;
            }

            if !this.closed {
                let mut received = std::mem::take(&mut this.received);
                match this.rx.poll_recv_many(cx, &mut received, RECV_CHUNK) {
                    Poll::Ready(0) => {
                        // Every handle is gone: flush what is left.
                        this.closed = true;
                        this.seal_all(Flush::Shutdown);
                        progress = true;
                    }
                    Poll::Ready(_) => {
                        for message in received.drain(..) {
                            this.accept(message);
                        }
                        progress = true;
                    }
                    Poll::Pending => {}
                }
                this.received = received;
                // No room left for another item, none on its way in, and no flushed batch
                // waiting whose sending would make some: callers wait in poll_ready until the
                // batches being filled reach a trigger, maybe not before their linger time (many
                // keys, say). Flush them all now, as Kafka's producer does when its buffer
                // memory is exhausted.
                if this.sealed.is_empty()
                    && !this.open.is_empty()
                    && this.semaphore.available_permits() == 0
                    && this.rx.is_empty()
                {
                    this.seal_all(Flush::Full);
                    progress = true;
                }
            }

            progress |= this.poll_linger(cx);

            while !this.sealed.is_empty() && this.in_flight.len() < this.config.max_in_flight() {
                match this.inner.poll_ready(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(())) => {
                        this.dispatch();
                        progress = true;
                    }
                    Poll::Ready(Err(err)) => {
                        // A service whose poll_ready failed is done (tower's contract): so is
                        // this worker, once the batches in flight have come back.
                        let cause = status_from_error(err.into());
                        let status = this.shared.stop(Status::new(
                            cause.code(),
                            format!(
                                "towline batch: the inner service failed, the worker has stopped: {}",
                                cause.message()
                            ),
                        ));
                        this.fail_pending(&status);
                        progress = true;
                        break;
                    }
                }
            }

            if this.closed
                && this.open.is_empty()
                && this.sealed.is_empty()
                && this.in_flight.is_empty()
            {
                this.finished = true;
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

impl<S, B> Drop for Worker<S, B>
where
    B: Batcher,
    S: Service<B::Request>,
{
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let status = self.shared.stop(Status::unavailable(
            "towline batch: the worker stopped before answering (it was dropped, it panicked, \
             or its runtime shut down)",
        ));
        self.closed = true;
        self.semaphore.close();
        self.rx.close();
        let metrics = &self.metrics;
        while let Ok(message) = self.rx.try_recv() {
            if let Message::Item { tx, .. } = message {
                fail_waiters(metrics, [tx], &status);
            }
        }
        for message in self.received.drain(..) {
            if let Message::Item { tx, .. } = message {
                fail_waiters(metrics, [tx], &status);
            }
        }
        for (_, open) in self.open.drain() {
            fail_waiters(metrics, open.waiters, &status);
        }
        for sealed in self.sealed.drain(..) {
            fail_waiters(metrics, sealed.waiters, &status);
        }
        for in_flight in Pin::new(&mut self.in_flight).iter_pin_mut() {
            if let Some((_, waiters)) = in_flight.project().batch.take() {
                fail_waiters(metrics, waiters, &status);
            }
        }
    }
}

impl<S, B> fmt::Debug for Worker<S, B>
where
    B: Batcher,
    S: Service<B::Request>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("open", &self.open.len())
            .field("sealed", &self.sealed.len())
            .field("in_flight", &self.in_flight.len())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// The flush trigger a batch has reached, if any.
fn trigger<B: Batcher>(open: &Open<B>, max_items: usize, max_bytes: usize) -> Option<Flush> {
    if open.items.len() >= max_items {
        Some(Flush::Count)
    } else if open.bytes >= max_bytes {
        Some(Flush::Bytes)
    } else {
        None
    }
}

fn seal<B: Batcher>(
    sealed: &mut VecDeque<Sealed<B>>,
    metrics: &Metrics,
    key: B::Key,
    open: Open<B>,
    reason: Flush,
) {
    metrics.flushes[reason as usize].increment(1);
    sealed.push_back(Sealed {
        key,
        items: open.items,
        waiters: open.waiters,
        bytes: open.bytes,
    });
}

fn fail_waiters<U>(
    metrics: &Metrics,
    waiters: impl IntoIterator<Item = oneshot::Sender<Result<U, Status>>>,
    status: &Status,
) {
    let mut failed = 0;
    for waiter in waiters {
        failed += 1;
        let _ = waiter.send(Err(status.clone()));
    }
    metrics.failed.increment(failed);
}

/// The status of the callers of a batch whose `Batcher` (or inner service) panicked.
fn panic_status(what: &str, panic: &(dyn Any + Send)) -> Status {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-string panic payload)");
    Status::internal(format!("towline batch: {what} panicked: {message}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use metrics::{
        CounterFn, Gauge, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };
    use tower::ServiceExt;

    use super::*;
    use crate::batch::Batch;

    /// Numbers as items; items of value 0 fail on their own; `short` makes `split` return one
    /// result too few.
    #[derive(Clone)]
    struct Numbers {
        short: bool,
    }

    impl Batcher for Numbers {
        type Item = u32;
        type Key = ();
        type Request = Vec<u32>;
        type Response = Vec<u32>;
        type Output = u32;

        fn key(&mut self, _: &u32) {}
        fn weight(&mut self, _: &u32) -> usize {
            1
        }
        fn merge(&mut self, _: &(), items: Vec<u32>) -> Vec<u32> {
            items
        }
        fn split(&mut self, _: &(), _: usize, response: Vec<u32>) -> Vec<Result<u32, Status>> {
            let mut results: Vec<_> = response
                .into_iter()
                .map(|n| match n {
                    0 => Err(Status::invalid_argument("zero")),
                    n => Ok(n * 10),
                })
                .collect();
            if self.short {
                results.pop();
            }
            results
        }
    }

    fn echo() -> impl Service<
        Vec<u32>,
        Response = Vec<u32>,
        Error = Status,
        Future = std::future::Ready<Result<Vec<u32>, Status>>,
    > + Send
    + 'static {
        tower::service_fn(|items: Vec<u32>| std::future::ready(Ok(items)))
    }

    #[derive(Default)]
    struct Count(AtomicU64);
    impl CounterFn for Count {
        fn increment(&self, n: u64) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
        fn absolute(&self, n: u64) {
            self.0.store(n, Ordering::Relaxed);
        }
    }

    #[derive(Default)]
    struct Samples(Mutex<Vec<f64>>);
    impl HistogramFn for Samples {
        fn record(&self, value: f64) {
            self.0.lock().unwrap().push(value);
        }
    }

    /// Keeps every counter and histogram by `name{label=value,...}`, and how often each was
    /// registered.
    #[derive(Default)]
    struct TestRecorder {
        counters: Mutex<BTreeMap<String, Arc<Count>>>,
        histograms: Mutex<BTreeMap<String, Arc<Samples>>>,
        registrations: AtomicU64,
    }

    fn id(key: &Key) -> String {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        if labels.is_empty() {
            key.name().to_string()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        }
    }

    impl TestRecorder {
        fn counter(&self, name: &str) -> u64 {
            self.counters.lock().unwrap()[name]
                .0
                .load(Ordering::Relaxed)
        }
        fn histogram(&self, name: &str) -> Vec<f64> {
            self.histograms.lock().unwrap()[name]
                .0
                .lock()
                .unwrap()
                .clone()
        }
    }

    impl Recorder for TestRecorder {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> metrics::Counter {
            self.registrations.fetch_add(1, Ordering::Relaxed);
            let mut counters = self.counters.lock().unwrap();
            metrics::Counter::from_arc(counters.entry(id(key)).or_default().clone())
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> metrics::Histogram {
            self.registrations.fetch_add(1, Ordering::Relaxed);
            let mut histograms = self.histograms.lock().unwrap();
            metrics::Histogram::from_arc(histograms.entry(id(key)).or_default().clone())
        }
    }

    fn config(max_items: usize) -> BatchConfig {
        BatchConfig::builder()
            .max_items(max_items)
            .linger(std::time::Duration::from_millis(50))
            .build()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn records_batch_sizes_flush_reasons_and_failed_items() {
        let recorder = TestRecorder::default();
        let (batch, worker) = metrics::with_local_recorder(&recorder, || {
            Batch::pair(echo(), Numbers { short: false }, config(2))
        });
        // Handles are registered once, when the worker is made, not per batch.
        let registered = recorder.registrations.load(Ordering::Relaxed);
        assert_eq!(registered, 2 + 6 + 1);
        let worker = tokio::spawn(worker);

        // count: two items; one of them fails on its own.
        let (a, b) = tokio::join!(batch.clone().oneshot(1), batch.clone().oneshot(0));
        assert_eq!(a.unwrap(), 10);
        assert_eq!(b.unwrap_err().code(), tonic::Code::InvalidArgument);
        // linger: one item, then the linger time.
        assert_eq!(batch.clone().oneshot(3).await.unwrap(), 30);
        // flush: one item, flushed by hand.
        let mut handle = batch.clone();
        handle.ready().await.unwrap();
        let c = handle.call(4);
        batch.flush().unwrap();
        assert_eq!(c.await.unwrap(), 40);
        // shutdown: one item, then every handle dropped.
        handle.ready().await.unwrap();
        let d = handle.call(5);
        drop((batch, handle));
        assert_eq!(d.await.unwrap(), 50);
        worker.await.unwrap();

        for (reason, n) in [
            ("count", 1),
            ("linger", 1),
            ("flush", 1),
            ("shutdown", 1),
            ("bytes", 0),
            ("full", 0),
        ] {
            let name = format!("towline.batch.flushes{{reason={reason}}}");
            assert_eq!(recorder.counter(&name), n, "{name}");
        }
        assert_eq!(
            recorder.histogram("towline.batch.size"),
            [2.0, 1.0, 1.0, 1.0]
        );
        assert_eq!(
            recorder.histogram("towline.batch.bytes"),
            [2.0, 1.0, 1.0, 1.0]
        );
        assert_eq!(recorder.counter("towline.batch.items.failed"), 1);
        assert_eq!(recorder.registrations.load(Ordering::Relaxed), registered);
    }

    #[tokio::test(start_paused = true)]
    async fn too_few_split_results_fail_the_items_left_over() {
        let batch = Batch::new(echo(), Numbers { short: true }, config(3));
        let (a, b, c) = tokio::join!(
            batch.clone().oneshot(1),
            batch.clone().oneshot(2),
            batch.clone().oneshot(3),
        );
        assert_eq!([a.unwrap(), b.unwrap()], [10, 20]);
        let err = c.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(
            err.message().contains("returned 2 results for 3 items"),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn call_without_poll_ready_fails_instead_of_panicking() {
        let mut batch = Batch::new(echo(), Numbers { short: false }, config(1));
        let err = batch.call(1).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        // And the handle still works the normal way.
        assert_eq!(batch.ready().await.unwrap().call(2).await.unwrap(), 20);
    }
}
