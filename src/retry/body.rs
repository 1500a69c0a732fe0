//! [`ReplayBody`]: a request body that can be sent again, as linkerd2-proxy's `ReplayBody` does.
//!
//! The first attempt streams the caller's body and, as it goes, keeps each data frame (a cheap
//! `Bytes` clone) and the trailers. A later attempt replays what was kept, then carries on reading
//! the caller's body where the earlier attempt stopped. Nothing is read ahead of what an attempt
//! asks for, so a streaming request is never held back.
//!
//! The buffer and the caller's body belong to the attempt reading them, as in linkerd2-proxy: the
//! attempt takes them from the shared slot when it is first polled and puts them back when it
//! ends or is dropped, so frames are read and kept without a lock (two uncontended locks per
//! attempt, none per frame). An attempt superseded by a newer one gives them back at its next
//! poll (the newer one wakes it), where linkerd's would panic.
//!
//! Once more than `max_bytes` have been read the buffer is dropped and the body becomes
//! non-replayable: the attempt in flight still gets every byte (never truncated, never dropped),
//! but no retry can be made, and a later attempt fails with [`Capped`].

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures::task::AtomicWaker;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;

use crate::BoxError;

/// A replayable request body. Keep the one [`ReplayBody::new`] returns as the template and give
/// each attempt a [`clone`](Clone::clone) of it: a clone starts again from the first byte, and
/// the newest clone is the one that reads on from the caller's body.
///
/// Its errors are the caller's body's own, [`Capped`] for an attempt that would have to replay
/// bytes that were not kept, and `CANCELLED` for an attempt superseded by a newer one.
pub struct ReplayBody {
    shared: Arc<Shared>,
    /// The buffer and the caller's body, while this attempt is the one reading them.
    state: Option<State>,
    /// The next frame of `State::frames` this attempt sends.
    position: usize,
    trailers_sent: bool,
    /// Which clone this is: only the newest may read.
    generation: u64,
}

/// The request body went over `max_replay_bytes` (or failed) while an earlier attempt sent it, so
/// it was not kept and cannot be sent again. The retry layer never sends such an attempt; this is
/// what a [`ReplayBody`] clone polled anyway returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capped;

impl fmt::Display for Capped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "towline retry: the request body was over max_replay_bytes and was not kept for replay",
        )
    }
}

impl std::error::Error for Capped {}

/// What every clone shares. Only `idle` is behind a lock, and it is taken once when an attempt
/// starts reading (or finds the state held) and once when it stops.
struct Shared {
    /// The state while no attempt holds it, and the attempt waiting for it.
    idle: Mutex<Idle>,
    /// The newest clone's generation.
    latest: AtomicU64,
    /// [`KEPT`], [`CAPPED`] or [`FAILED`]: changed only by the attempt holding the state.
    kept: AtomicU8,
    /// The attempt holding the state, while it waits for the caller's body: a newer clone wakes
    /// it so that it gives the state back.
    holder: AtomicWaker,
    max_bytes: usize,
    /// The caller's body's size hint: every attempt sends the whole body, so it holds for each.
    size_hint: SizeHint,
    /// The caller's body was empty from the start.
    was_empty: bool,
}

/// The state while no attempt holds it, and who is waiting for it: under one lock, so that a
/// waiter registers and looks in one step (no hand-back can come in between), and an older
/// attempt cannot put its waker in place of a newer one's.
struct Idle {
    state: Option<State>,
    /// The newest attempt that found the state held: its generation and waker.
    waiter: Option<(u64, Waker)>,
}

const KEPT: u8 = 0;
const CAPPED: u8 = 1;
const FAILED: u8 = 2;

struct State {
    /// The caller's body, until it ends.
    rest: Option<Body>,
    /// The data frames read so far, while under the cap.
    frames: Vec<Bytes>,
    /// How many data frames have been read from `rest`, kept or not.
    read: usize,
    buffered: usize,
    trailers: Option<HeaderMap>,
}

impl ReplayBody {
    /// Wraps the caller's body, buffering up to `max_bytes` for replay. A body whose size hint
    /// already exceeds the cap is marked non-replayable up front.
    pub fn new(body: Body, max_bytes: usize) -> Self {
        let size_hint = body.size_hint();
        let was_empty = body.is_end_stream();
        let rest = (!was_empty).then_some(body);
        Replay::new(rest, Vec::new(), None, size_hint, was_empty, max_bytes).attempt(0)
    }

    /// Whether a new attempt could be sent in full: nothing read so far was lost to the cap or
    /// to an error of the caller's body.
    pub fn is_replayable(&self) -> bool {
        self.shared.kept.load(Ordering::Acquire) == KEPT
    }

    fn superseded(&self) -> bool {
        self.shared.latest.load(Ordering::Acquire) != self.generation
    }

    fn release(&mut self) {
        if let Some(state) = self.state.take() {
            self.shared.give_back(state);
        }
    }
}

impl Shared {
    /// `held`, taken from the idle slot if this attempt does not hold the state yet; `None` (and
    /// a wake-up later) while an earlier attempt still holds it.
    fn acquire<'a>(
        &self,
        held: &'a mut Option<State>,
        generation: u64,
        cx: &Context<'_>,
    ) -> Option<&'a mut State> {
        if held.is_none() {
            let mut idle = self.idle();
            match idle.state.take() {
                Some(state) => *held = Some(state),
                None => {
                    if idle.waiter.as_ref().is_none_or(|(g, _)| *g <= generation) {
                        idle.waiter = Some((generation, cx.waker().clone()));
                    }
                    drop(idle);
                    // The holder, parked on the caller's body, must see it was superseded.
                    self.holder.wake();
                    return None;
                }
            }
        }
        held.as_mut()
    }

    fn idle(&self) -> MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn give_back(&self, state: State) {
        let waiter = {
            let mut idle = self.idle();
            idle.state = Some(state);
            idle.waiter.take()
        };
        if let Some((_, waker)) = waiter {
            waker.wake();
        }
    }
}

impl Clone for ReplayBody {
    /// A new attempt's body, from the first byte. It supersedes every earlier clone: an earlier
    /// attempt that is still being sent (its response came back first) ends with `CANCELLED` at
    /// its next poll and gives the buffer back, rather than compete for the caller's body.
    fn clone(&self) -> Self {
        let replay = Replay(self.shared.clone());
        replay.attempt(replay.supersede())
    }
}

/// What the retry layer keeps of a [`ReplayBody`] between attempts: the shared part alone, one
/// pointer (the body's own fields would only make every retrying future bigger).
pub(crate) struct Replay(Arc<Shared>);

impl Replay {
    /// A body of which `prefix` (with `trailers`, if it ended) was read already, at most
    /// `max_bytes` of it; `size_hint` and `was_empty` are the caller's body's before any read.
    pub(crate) fn new(
        rest: Option<Body>,
        prefix: Vec<Bytes>,
        trailers: Option<HeaderMap>,
        size_hint: SizeHint,
        was_empty: bool,
        max_bytes: usize,
    ) -> Self {
        let buffered = prefix.iter().map(Bytes::len).sum::<usize>();
        let kept = if size_hint.lower() <= max_bytes as u64 && buffered <= max_bytes {
            KEPT
        } else {
            CAPPED
        };
        let state = State {
            rest,
            read: prefix.len(),
            frames: prefix,
            buffered,
            trailers,
        };
        Replay(Arc::new(Shared {
            idle: Mutex::new(Idle {
                state: Some(state),
                waiter: None,
            }),
            latest: AtomicU64::new(0),
            kept: AtomicU8::new(kept),
            holder: AtomicWaker::new(),
            max_bytes,
            size_hint,
            was_empty,
        }))
    }

    /// Ends every attempt made so far, at its next poll; returns the next attempt's generation.
    pub(crate) fn supersede(&self) -> u64 {
        let generation = self.0.latest.fetch_add(1, Ordering::AcqRel) + 1;
        // An earlier attempt parked on the caller's body must see that it was superseded.
        self.0.holder.wake();
        generation
    }

    /// The body of the attempt [`supersede`](Self::supersede) made way for.
    pub(crate) fn attempt(&self, generation: u64) -> ReplayBody {
        ReplayBody {
            shared: self.0.clone(),
            state: None,
            position: 0,
            trailers_sent: false,
            generation,
        }
    }

    pub(crate) fn is_replayable(&self) -> bool {
        self.0.kept.load(Ordering::Acquire) == KEPT
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        self.release();
    }
}

impl fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("position", &self.position)
            .field("generation", &self.generation)
            .field("reading", &self.state.is_some())
            .field("max_bytes", &self.shared.max_bytes)
            .field("replayable", &self.is_replayable())
            .finish()
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.superseded() {
            this.release();
            return Poll::Ready(Some(Err(Box::new(Status::cancelled(
                "towline retry: a newer attempt took over the request body",
            )))));
        }
        let shared = &*this.shared;
        let Some(state) = shared.acquire(&mut this.state, this.generation, cx) else {
            return Poll::Pending;
        };
        // Replay what an earlier attempt read.
        if this.position < state.read {
            if shared.kept.load(Ordering::Acquire) != KEPT {
                return Poll::Ready(Some(Err(Box::new(Capped))));
            }
            let data = state.frames[this.position].clone();
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        // Then read on from the caller's body.
        if let Some(rest) = state.rest.as_mut() {
            let frame = match Pin::new(rest).poll_frame(cx) {
                Poll::Pending => {
                    shared.holder.register(cx.waker());
                    // A clone made before the registration could not wake this poll.
                    if shared.latest.load(Ordering::Acquire) != this.generation {
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(frame) => frame,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        state.read += 1;
                        this.position = state.read;
                        if shared.kept.load(Ordering::Relaxed) == KEPT {
                            state.buffered = state.buffered.saturating_add(data.len());
                            if state.buffered > shared.max_bytes {
                                shared.kept.store(CAPPED, Ordering::Release);
                                state.frames = Vec::new();
                            } else {
                                state.frames.push(data.clone());
                            }
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            state.trailers = Some(trailers);
                        }
                        state.rest = None;
                    }
                },
                Some(Err(status)) => {
                    shared.kept.store(FAILED, Ordering::Release);
                    state.rest = None;
                    return Poll::Ready(Some(Err(Box::new(status))));
                }
                None => state.rest = None,
            }
        }
        // The caller's body has ended: its trailers, if it had any, once per attempt.
        if !this.trailers_sent {
            this.trailers_sent = true;
            if let Some(trailers) = &state.trailers {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
            }
        }
        // Nothing left to read: the next attempt may have the state now.
        if let Some(state) = this.state.take() {
            shared.give_back(state);
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        if self.shared.was_empty {
            return true;
        }
        // Without the state, an attempt cannot tell; it finds out when polled.
        self.state.as_ref().is_some_and(|state| {
            state.rest.is_none()
                && self.position >= state.read
                && (self.trailers_sent || state.trailers.is_none())
        })
    }

    fn size_hint(&self) -> SizeHint {
        let Some(state) = &self.state else {
            // Every attempt sends the whole body.
            return self.shared.size_hint;
        };
        let replay: u64 = if self.position < state.read && self.is_replayable() {
            state.frames[self.position..]
                .iter()
                .map(|b| b.len() as u64)
                .sum()
        } else {
            0
        };
        match &state.rest {
            None => SizeHint::with_exact(replay),
            Some(rest) => {
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(replay.saturating_add(rest.lower()));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(replay.saturating_add(upper));
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn streaming(chunks: &[&'static [u8]], trailers: Option<HeaderMap>) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, Status>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if let Some(t) = trailers {
            frames.push(Ok(Frame::trailers(t)));
        }
        Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    async fn collect(body: ReplayBody) -> (Bytes, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn replays_data_and_trailers_byte_for_byte() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-end", "yes".parse().unwrap());
        let template = ReplayBody::new(streaming(&[b"ab", b"cd", b"ef"], Some(trailers)), 1024);
        let (bytes, t) = collect(template.clone()).await;
        assert_eq!(bytes, "abcdef");
        assert_eq!(t.unwrap()["x-end"], "yes");
        let mut second = template.clone();
        assert!(second.is_replayable());
        let frame = second.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        assert_eq!(
            second.size_hint().exact(),
            Some(4),
            "what is left to replay"
        );
        let (bytes, t) = collect(second).await;
        assert_eq!(bytes, "cdef");
        assert_eq!(t.unwrap()["x-end"], "yes");
    }

    #[tokio::test]
    async fn a_later_attempt_continues_where_an_earlier_one_stopped() {
        let template = ReplayBody::new(streaming(&[b"ab", b"cd", b"ef"], None), 1024);
        let mut first = template.clone();
        // The first attempt sends one frame, then fails and is dropped.
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        drop(first);
        assert_eq!(collect(template.clone()).await.0, "abcdef");
    }

    #[tokio::test]
    async fn an_attempt_superseded_mid_stream_stops_at_what_was_buffered() {
        let template = ReplayBody::new(streaming(&[b"ab", b"cd"], None), 1024);
        let mut first = template.clone();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        let second = template.clone();
        let err = first.frame().await.unwrap().unwrap_err();
        let status = err.downcast_ref::<Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::Cancelled);
        assert_eq!(collect(second).await.0, "abcd");
    }

    #[tokio::test]
    async fn over_the_cap_sends_everything_once_then_is_not_replayable() {
        let template = ReplayBody::new(streaming(&[b"abcd", b"efgh", b"ij"], None), 6);
        assert!(template.is_replayable());
        assert_eq!(
            collect(template.clone()).await.0,
            "abcdefghij",
            "never truncated"
        );
        let second = template.clone();
        assert!(!second.is_replayable());
        let err = second.collect().await.unwrap_err();
        assert_eq!(err.downcast_ref::<Capped>(), Some(&Capped), "{err}");
    }

    #[tokio::test]
    async fn a_size_hint_over_the_cap_is_not_replayable_up_front() {
        let body = ReplayBody::new(
            Body::new(http_body_util::Full::new(Bytes::from(vec![0; 10]))),
            9,
        );
        assert!(!body.is_replayable());
        let body = ReplayBody::new(
            Body::new(http_body_util::Full::new(Bytes::from(vec![0; 9]))),
            9,
        );
        assert!(body.is_replayable());
    }

    /// A body whose frames arrive one at a time (a client stream), fed through a channel.
    fn channel_body() -> (
        futures::channel::mpsc::UnboundedSender<Result<Frame<Bytes>, Status>>,
        Body,
    ) {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        (tx, Body::new(StreamBody::new(rx)))
    }

    #[tokio::test]
    async fn replays_a_body_that_was_streamed_in_several_frames() {
        let (tx, body) = channel_body();
        let template = ReplayBody::new(body, 1024);
        let mut first = template.clone();
        for chunk in ["one ", "two ", "three"] {
            // The attempt waits for the caller, then gets the frame as it arrives.
            assert!(futures::poll!(first.frame()).is_pending());
            tx.unbounded_send(Ok(Frame::data(Bytes::from(chunk))))
                .unwrap();
            let frame = first.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), chunk);
        }
        drop(tx);
        assert!(first.frame().await.is_none());
        drop(first);
        let second = template.clone();
        assert_eq!(
            second.size_hint().exact(),
            None,
            "the caller's hint, until it reads"
        );
        assert_eq!(collect(second).await.0, "one two three");
    }

    /// The older attempt holds the buffer while it waits for the caller's next frame; the newer
    /// one waits for it, wakes it, and gets the buffer when it gives up.
    #[tokio::test]
    async fn a_newer_attempt_takes_over_from_one_parked_on_the_caller() {
        let (tx, body) = channel_body();
        let template = ReplayBody::new(body, 1024);
        let mut first = template.clone();
        tx.unbounded_send(Ok(Frame::data(Bytes::from("ab"))))
            .unwrap();
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        assert!(
            futures::poll!(first.frame()).is_pending(),
            "parked on the caller"
        );

        let mut second = template.clone();
        assert!(
            futures::poll!(second.frame()).is_pending(),
            "the first holds the buffer"
        );
        let err = first.frame().await.unwrap().unwrap_err();
        assert_eq!(
            err.downcast_ref::<Status>().unwrap().code(),
            tonic::Code::Cancelled
        );
        let frame = second.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab", "replayed");
        tx.unbounded_send(Ok(Frame::data(Bytes::from("cd"))))
            .unwrap();
        drop(tx);
        drop(first); // still alive until here: the buffer was handed back, not dropped with it
        assert_eq!(collect(second).await.0, "cd");
        assert_eq!(collect(template.clone()).await.0, "abcd");
    }

    /// Of the attempts waiting for the buffer, the newest is woken when it is handed back, even
    /// if an older one (about to find itself superseded) registers after it: an older waker
    /// never takes the newest one's place.
    #[test]
    fn the_newest_waiting_attempt_is_woken_whatever_order_they_registered_in() {
        struct Flag(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = || Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
        let (_tx, body) = channel_body();
        let template = ReplayBody::new(body, 1024);
        let shared = &*template.shared;
        let mut holder = None;
        let noop = Context::from_waker(Waker::noop());
        assert!(shared.acquire(&mut holder, 1, &noop).is_some());

        let (older, newer) = (flag(), flag());
        for (generation, flag) in [(3, &newer), (2, &older)] {
            let waker = Waker::from(flag.clone());
            let mut none = None;
            let cx = Context::from_waker(&waker);
            assert!(shared.acquire(&mut none, generation, &cx).is_none());
        }
        shared.give_back(holder.take().unwrap());
        assert!(
            newer.0.load(Ordering::SeqCst),
            "the newest attempt is woken"
        );
        assert!(!older.0.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn beyond_the_cap_a_later_attempt_fails_with_capped() {
        let (tx, body) = channel_body();
        let template = ReplayBody::new(body, 4);
        let mut first = template.clone();
        for chunk in ["abc", "def"] {
            tx.unbounded_send(Ok(Frame::data(Bytes::from(chunk))))
                .unwrap();
            let frame = first.frame().await.unwrap().unwrap();
            assert_eq!(
                frame.into_data().unwrap(),
                chunk,
                "the attempt in flight gets it all"
            );
        }
        assert!(!template.is_replayable());
        drop(first);
        let mut second = template.clone();
        let err = second.frame().await.unwrap().unwrap_err();
        assert!(err.is::<Capped>(), "{err}");
    }

    #[tokio::test]
    async fn an_empty_body_replays_as_empty() {
        let template = ReplayBody::new(Body::empty(), 8);
        assert!(template.is_end_stream());
        assert_eq!(collect(template.clone()).await.0, "");
        assert_eq!(collect(template.clone()).await.0, "");
    }
}
