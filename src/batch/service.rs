//! [`Batch`]: the `Service<Item>` callers use; a cheap, cloneable handle to the batch worker.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};
use tonic::Status;
use tower_service::Service;

use super::future::ResponseFuture;
use super::worker::{Message, Metrics, Worker};
use super::{BatchConfig, Batcher};
use crate::BoxError;

type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send + Sync>>;

/// A `Service<T>` that adds each item to a batch and answers with that item's own result
/// (`U`, or a [`Status`]).
///
/// Every clone talks to the same worker, which merges items with a [`Batcher`], calls the inner
/// batch service and routes each item's result back to its caller. See the [module
/// docs](super) for when batches are flushed and what happens on failure.
///
/// `poll_ready` reserves room for one item among [`BatchConfig::max_pending_items`]; when none
/// is left it waits (back-pressure) until a batch is sent. Once the worker has stopped
/// (its inner service failed `poll_ready`, it panicked, or it was dropped) `poll_ready` fails
/// with the reason, at once.
pub struct Batch<T, U> {
    tx: mpsc::UnboundedSender<Message<T, U>>,
    semaphore: Arc<Semaphore>,
    shared: Arc<Shared>,
    /// Whether this handle holds one permit, taken by `poll_ready` for the next `call`.
    reserved: bool,
    acquiring: Option<Acquire>,
}

/// What handles and the worker share.
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// Why the worker stopped, when it stopped before every handle was dropped.
    error: OnceLock<Status>,
}

impl Shared {
    /// Records why the worker stopped (the first reason wins) and returns the reason recorded.
    pub(super) fn stop(&self, status: Status) -> Status {
        let _ = self.error.set(status);
        self.error()
    }

    pub(super) fn error(&self) -> Status {
        self.error
            .get()
            .cloned()
            .unwrap_or_else(|| Status::unavailable("towline batch: the worker has stopped"))
    }
}

impl<T, U> Batch<T, U>
where
    T: Send + 'static,
    U: Send + 'static,
{
    /// Spawns the worker on the current tokio runtime and returns a handle to it.
    ///
    /// # Panics
    /// Outside a tokio runtime, as `tokio::spawn` does. Use [`pair`](Self::pair) to run the
    /// worker yourself.
    pub fn new<S, B>(inner: S, batcher: B, config: BatchConfig) -> Self
    where
        B: Batcher<Item = T, Output = U>,
        S: Service<B::Request, Response = B::Response> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let (handle, worker) = Batch::pair(inner, batcher, config);
        tokio::spawn(worker);
        handle
    }

    /// A handle and its worker, a future to spawn on an executor of your choosing. It ends once
    /// every handle is dropped and every item has been answered. Dropping it before that fails
    /// every item it holds and every later call.
    ///
    /// Metric handles are registered here, with the recorder installed at this point.
    pub fn pair<S, B>(inner: S, batcher: B, config: BatchConfig) -> (Self, Worker<S, B>)
    where
        B: Batcher<Item = T, Output = U>,
        S: Service<B::Request, Response = B::Response>,
        S::Error: Into<BoxError>,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let semaphore = Arc::new(Semaphore::new(config.max_pending_items()));
        let shared = Arc::new(Shared::default());
        let worker = Worker::new(
            inner,
            batcher,
            config,
            rx,
            semaphore.clone(),
            shared.clone(),
            Metrics::new(),
        );
        let handle = Batch {
            tx,
            semaphore,
            shared,
            reserved: false,
            acquiring: None,
        };
        (handle, worker)
    }
}

impl<T, U> Batch<T, U> {
    /// Flushes every batch being filled, of every key, now: they are sent as soon as fewer than
    /// [`BatchConfig::max_in_flight`] batches are in flight. Items called before this, on any
    /// handle, are in those batches. Fails if the worker has stopped.
    pub fn flush(&self) -> Result<(), Status> {
        self.tx
            .send(Message::Flush)
            .map_err(|_| self.shared.error())
    }

    /// Takes one permit without waiting, if one is free.
    fn try_reserve(&mut self) -> Poll<Result<(), Status>> {
        match self.semaphore.try_acquire() {
            Ok(permit) => {
                // The worker gives the permit back once the item has left for its batch RPC.
                permit.forget();
                self.reserved = true;
                Poll::Ready(Ok(()))
            }
            Err(TryAcquireError::Closed) => Poll::Ready(Err(self.shared.error())),
            Err(TryAcquireError::NoPermits) => Poll::Pending,
        }
    }
}

impl<T, U> Service<T> for Batch<T, U>
where
    T: Send + 'static,
    U: Send + 'static,
{
    type Response = U;
    type Error = Status;
    type Future = ResponseFuture<U>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        if self.tx.is_closed() {
            return Poll::Ready(Err(self.shared.error()));
        }
        if self.reserved {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(acquire) = self.acquiring.as_mut() {
                let acquired = std::task::ready!(acquire.as_mut().poll(cx));
                self.acquiring = None;
                return Poll::Ready(match acquired {
                    Ok(permit) => {
                        permit.forget();
                        self.reserved = true;
                        Ok(())
                    }
                    Err(_) => Err(self.shared.error()),
                });
            }
            if let Poll::Ready(ready) = self.try_reserve() {
                return Poll::Ready(ready);
            }
            // Full: wait for the worker to give permits back, as tower's buffer does.
            self.acquiring = Some(Box::pin(self.semaphore.clone().acquire_owned()));
        }
    }

    fn call(&mut self, item: T) -> ResponseFuture<U> {
        if !std::mem::take(&mut self.reserved) {
            return ResponseFuture::failed(Status::failed_precondition(
                "towline batch: call without a successful poll_ready first",
            ));
        }
        let (tx, rx) = oneshot::channel();
        match self.tx.send(Message::Item { item, tx }) {
            Ok(()) => ResponseFuture::waiting(rx),
            // The worker has stopped; the permit went with its semaphore.
            Err(_) => ResponseFuture::failed(self.shared.error()),
        }
    }
}

impl<T, U> Clone for Batch<T, U> {
    /// Another handle to the same worker, with no room reserved yet.
    fn clone(&self) -> Self {
        Batch {
            tx: self.tx.clone(),
            semaphore: self.semaphore.clone(),
            shared: self.shared.clone(),
            reserved: false,
            acquiring: None,
        }
    }
}

impl<T, U> Drop for Batch<T, U> {
    fn drop(&mut self) {
        if self.reserved {
            // Readied but never called: give the room back.
            self.semaphore.add_permits(1);
        }
    }
}

impl<T, U> fmt::Debug for Batch<T, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("reserved", &self.reserved)
            .field("free_permits", &self.semaphore.available_permits())
            .field("worker_stopped", &self.tx.is_closed())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;

    #[derive(Clone)]
    struct Unit;

    impl Batcher for Unit {
        type Item = ();
        type Key = ();
        type Request = usize;
        type Response = usize;
        type Output = ();

        fn key(&mut self, _: &()) {}
        fn weight(&mut self, _: &()) -> usize {
            0
        }
        fn merge(&mut self, _: &(), items: Vec<()>) -> usize {
            items.len()
        }
        fn split(&mut self, _: &(), _: usize, n: usize) -> Vec<Result<(), Status>> {
            vec![Ok(()); n]
        }
    }

    /// `Batch` goes wherever a tower service goes: across tasks and threads, shared by reference.
    #[test]
    fn handles_and_futures_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Batch<String, Vec<u8>>>();
        send::<ResponseFuture<Vec<u8>>>();
    }

    #[tokio::test(start_paused = true)]
    async fn room_is_reserved_by_poll_ready_and_given_back_when_unused_or_sent() {
        let config = BatchConfig::builder()
            .max_items(2)
            .max_pending_items(2)
            .linger(Duration::from_secs(60))
            .build()
            .unwrap();
        let inner = tower::service_fn(|n: usize| std::future::ready(Ok::<_, Status>(n)));
        let batch = Batch::new(inner, Unit, config);
        let mut a = batch.clone();
        let mut b = batch.clone();
        a.ready().await.unwrap();
        b.ready().await.unwrap();
        assert_eq!(batch.semaphore.available_permits(), 0);
        // Readied, never called: the room comes back with the handle.
        drop(b);
        assert_eq!(batch.semaphore.available_permits(), 1);
        // Called: the room comes back once its batch is sent.
        let first = a.call(());
        let second = batch.clone().oneshot(());
        let (first, second) = tokio::join!(first, second);
        first.unwrap();
        second.unwrap();
        assert_eq!(batch.semaphore.available_permits(), 2);
    }
}
