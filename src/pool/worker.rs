//! The pool's background task: opens, replaces and reaps connections as [`Shared`] plans.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt as _;
use futures::future::poll_fn;
use futures::stream::FuturesUnordered;
use http::Uri;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Code;
use tower_service::Service;

use super::conn::{SharedError, status_with_source};
use super::shared::Shared;
use crate::BoxError;

/// A connection attempt that took longer than the configured connect timeout.
#[derive(Debug)]
pub(crate) struct ConnectTimeout(pub(crate) Duration);

impl fmt::Display for ConnectTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connect timed out after {:?}", self.0)
    }
}

impl Error for ConnectTimeout {}

enum Event<S> {
    Shutdown,
    Attempt(Result<S, SharedError>),
    Wake,
}

/// The pool's background task: opens connections as [`Shared::plan`] says, records how each
/// attempt went, and sleeps until it is woken or a backoff or idle deadline passes. Ends when
/// every handle is dropped (`alive` closes) or the connector fails.
pub(crate) async fn run<M, S>(shared: Arc<Shared<S>>, mut make: M, mut alive: oneshot::Receiver<()>)
where
    M: Service<Uri, Response = S>,
    M::Error: Into<BoxError>,
{
    let timeout = shared.core.config.connect_timeout;
    let mut attempts = FuturesUnordered::new();
    loop {
        let plan = shared.plan(Instant::now());
        drop(plan.dropped);
        if plan.wake {
            shared.core.parked.wake_all();
        }
        for _ in 0..plan.start {
            if let Err(err) = poll_fn(|cx| make.poll_ready(cx)).await {
                let err: BoxError = err.into();
                let message = format!(
                    "the pool for {} closed: its connector failed: {err}",
                    shared.core.target
                );
                let source: SharedError = Arc::from(err);
                shared.shut_down(Some(status_with_source(
                    Code::Unavailable,
                    message,
                    Some(&source),
                )));
                return;
            }
            let connecting = make.call(shared.core.target.clone());
            attempts.push(async move {
                match tokio::time::timeout(timeout, connecting).await {
                    Ok(Ok(service)) => Ok(service),
                    Ok(Err(err)) => Err(SharedError::from(err.into())),
                    Err(_) => Err(Arc::new(ConnectTimeout(timeout)) as SharedError),
                }
            });
        }
        let mut notified = pin!(shared.core.wake_worker.notified());
        let mut sleep = plan
            .wake_at
            .map(|at| Box::pin(tokio::time::sleep_until(at)));
        let event = poll_fn(|cx| {
            if Pin::new(&mut alive).poll(cx).is_ready() {
                return Poll::Ready(Event::Shutdown);
            }
            if !attempts.is_empty()
                && let Poll::Ready(Some(result)) = attempts.poll_next_unpin(cx)
            {
                return Poll::Ready(Event::Attempt(result));
            }
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Wake);
            }
            if let Some(sleep) = &mut sleep
                && sleep.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Event::Wake);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Shutdown => break,
            Event::Attempt(result) => shared.attempt_done(result, Instant::now()),
            Event::Wake => {}
        }
    }
    shared.shut_down(None);
}
