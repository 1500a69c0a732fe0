//! [`ResponseFuture`]: one caller's result, answered by the batch worker.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tonic::Status;

pin_project! {
    /// The result of one item: the [`Batcher::split`](super::Batcher::split) result for it, or the
    /// batch's failure.
    ///
    /// Dropping it does not take the item back: once [`call`](tower_service::Service::call) has
    /// returned, the item is sent with its batch and only its result is discarded.
    #[derive(Debug)]
    pub struct ResponseFuture<U> {
        #[pin]
        state: State<U>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<U> {
        Waiting { #[pin] rx: oneshot::Receiver<Result<U, Status>> },
        Failed { error: Option<Status> },
    }
}

impl<U> ResponseFuture<U> {
    pub(super) fn waiting(rx: oneshot::Receiver<Result<U, Status>>) -> Self {
        ResponseFuture {
            state: State::Waiting { rx },
        }
    }

    pub(super) fn failed(error: Status) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<U> Future for ResponseFuture<U> {
    type Output = Result<U, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Waiting { rx } => Poll::Ready(match ready!(rx.poll(cx)) {
                Ok(result) => result,
                // The worker answers every item it drops (see `Worker`'s `Drop`); this is only
                // reached if it was leaked or its answer was lost some other way.
                Err(_) => Err(Status::unavailable(
                    "towline batch: the worker dropped this item without an answer",
                )),
            }),
            StateProj::Failed { error } => Poll::Ready(Err(error
                .take()
                .expect("ResponseFuture polled after completion"))),
        }
    }
}
