//! [`Source`]: what a retrying call keeps of its request body, to give each attempt a copy.
//!
//! A unary request's body (tonic's encoder over one message) is complete the moment the call is
//! made: its one frame is ready at the first poll. So the body is read at once, as far as it is
//! ready: nothing is waited for, so a streaming request is never held back. A body read to its
//! end in one frame is kept as that frame's `Bytes`, and every attempt gets a clone of it: no
//! shared state, no lock, no buffer list. Any other body goes through a [`ReplayBody`]
//! (its frames read so far included), which keeps the rest as the attempts read it.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures::StreamExt as _;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt as _, BodyStream, StreamBody};
use tonic::Status;
use tonic::body::Body;

use super::body::Replay;

/// A request body each attempt can be given in full.
pub(crate) enum Source {
    /// The whole body, read when the call was made, and the size hint it had.
    Whole(Bytes, SizeHint),
    /// A body still arriving, or in several frames.
    Streamed(Replay),
}

impl Source {
    /// Reads what `body` has ready now, without waiting. `Err` gives back a body to send once,
    /// as it was: one whose size hint is over `max_bytes` (unread), or that went over it or
    /// failed while read.
    pub(crate) fn new(mut body: Body, max_bytes: usize) -> Result<Source, Body> {
        let size_hint = body.size_hint();
        if size_hint.lower() > max_bytes as u64 {
            return Err(body);
        }
        let was_empty = body.is_end_stream();
        // A poll that returns `Pending` here registers this no-op waker; the attempt's first poll
        // registers its own, as every poll does, so no wake-up is lost.
        let mut cx = Context::from_waker(Waker::noop());
        // The first frame apart: a unary body is one frame, and needs no list.
        let mut first: Option<Bytes> = None;
        let mut more = Vec::new();
        let mut buffered = 0usize;
        let mut trailers: Option<HeaderMap> = None;
        let mut at_end = was_empty;
        let rest = loop {
            if at_end {
                break None;
            }
            let frame = Pin::new(&mut body).poll_frame(&mut cx);
            at_end = body.is_end_stream();
            match frame {
                Poll::Pending => break Some(body),
                Poll::Ready(None) => break None,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    // A unary body: one frame, then its end. Kept as it is, nothing more to see.
                    Ok(data) if first.is_none() && at_end && data.len() <= max_bytes => {
                        return Ok(Source::Whole(data, size_hint));
                    }
                    Ok(data) => {
                        buffered = buffered.saturating_add(data.len());
                        match first {
                            None => first = Some(data),
                            Some(_) => more.push(data),
                        }
                        if buffered > max_bytes {
                            return Err(once(first.into_iter().chain(more), body));
                        }
                    }
                    Err(frame) => {
                        trailers = frame.into_trailers().ok();
                        break None;
                    }
                },
                Poll::Ready(Some(Err(status))) => {
                    let failed = futures::stream::iter([Err::<Frame<Bytes>, _>(status)]);
                    let failed = Body::new(StreamBody::new(failed));
                    return Err(once(first.into_iter().chain(more), failed));
                }
            }
        };
        if rest.is_none() && trailers.is_none() && more.is_empty() {
            return Ok(Source::Whole(first.unwrap_or_default(), size_hint));
        }
        let read = first.into_iter().chain(more).collect();
        Ok(Source::Streamed(Replay::new(
            rest, read, trailers, size_hint, was_empty, max_bytes,
        )))
    }

    /// Ends every attempt made so far; returns the next attempt's generation.
    pub(crate) fn supersede(&self) -> u64 {
        match self {
            // Each attempt has its own copy: nothing to take back.
            Source::Whole(..) => 0,
            Source::Streamed(replay) => replay.supersede(),
        }
    }

    /// The body of the attempt [`supersede`](Self::supersede) made way for.
    pub(crate) fn attempt(&self, generation: u64) -> Body {
        match self {
            // An empty body is tonic's `Body::empty()`, no allocation; else one box, taken by
            // tonic as it is (its error is already `Status`: no `map_err` layer between the
            // attempt's reader and its bytes).
            Source::Whole(bytes, hint) => {
                let whole = Whole::new(bytes.clone(), *hint);
                if whole.is_end_stream() {
                    Body::empty()
                } else {
                    Body::new(whole.boxed_unsync())
                }
            }
            Source::Streamed(replay) => Body::new(replay.attempt(generation)),
        }
    }

    /// Whether a new attempt could be sent in full.
    pub(crate) fn is_replayable(&self) -> bool {
        match self {
            Source::Whole(..) => true,
            Source::Streamed(replay) => replay.is_replayable(),
        }
    }
}

/// A body read whole when the call was made, as an attempt sends it: its bytes in one frame, and
/// the size hint the caller's body had. Not `Full`: its exact hint differs from that of tonic's
/// encoder (none), and from an exact hint hyper adds a `content-length` header to the request,
/// which changes what goes on the wire and costs both ends a header to encode and decode on
/// every call (nine allocations per call between a client and a server in one process).
pub(super) struct Whole {
    data: Option<Bytes>,
    hint: SizeHint,
}

impl Whole {
    pub(super) fn new(data: Bytes, hint: SizeHint) -> Whole {
        Whole {
            data: (!data.is_empty()).then_some(data),
            hint,
        }
    }
}

impl http_body::Body for Whole {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Poll::Ready(self.data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.data {
            Some(_) => self.hint,
            None => SizeHint::with_exact(0),
        }
    }
}

/// The frames read so far, then the rest of the body: what the caller sent, sent once.
pub(super) fn once(read: impl Iterator<Item = Bytes> + Send + 'static, rest: Body) -> Body {
    let read = read.map(|data| Ok::<_, Status>(Frame::data(data)));
    let rest = BodyStream::new(rest);
    Body::new(StreamBody::new(futures::stream::iter(read).chain(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn frames(chunks: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, Status>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    async fn text(body: Body) -> String {
        let bytes = body.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_body_ready_in_one_frame_is_kept_whole() {
        let source = Source::new(frames(&["hello"]), 64).unwrap();
        assert!(matches!(&source, Source::Whole(b, _) if b == "hello"));
        assert_eq!(text(source.attempt(source.supersede())).await, "hello");
        assert_eq!(text(source.attempt(source.supersede())).await, "hello");
        let empty = Source::new(Body::empty(), 64).unwrap();
        assert!(empty.attempt(0).is_end_stream(), "no box for an empty body");
    }

    #[test]
    fn an_attempt_has_the_size_hint_the_callers_body_had() {
        // tonic's encoder gives no hint (a stream); an attempt must not claim an exact one, or
        // hyper adds a `content-length` header the caller's request did not have.
        let source = Source::new(frames(&["hello"]), 64).unwrap();
        let attempt = source.attempt(source.supersede());
        assert_eq!(attempt.size_hint().exact(), None);
        assert!(!attempt.is_end_stream());
        // A body that knew its size keeps saying so.
        let known = Source::new(Body::new(Full::new(Bytes::from_static(b"hello"))), 64).unwrap();
        assert_eq!(
            known.attempt(known.supersede()).size_hint().exact(),
            Some(5)
        );
    }

    #[tokio::test]
    async fn a_body_in_several_frames_replays_through_a_replay_body() {
        let source = Source::new(frames(&["ab", "cd"]), 64).unwrap();
        assert!(matches!(source, Source::Streamed(_)));
        assert_eq!(text(source.attempt(source.supersede())).await, "abcd");
        assert_eq!(text(source.attempt(source.supersede())).await, "abcd");
    }

    #[tokio::test]
    async fn a_body_not_ready_yet_is_read_by_the_attempts() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, Status>>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from("ab"))))
            .unwrap();
        let source = Source::new(Body::new(StreamBody::new(rx)), 64).unwrap();
        assert!(matches!(source, Source::Streamed(_)));
        tx.unbounded_send(Ok(Frame::data(Bytes::from("cd"))))
            .unwrap();
        drop(tx);
        assert_eq!(text(source.attempt(source.supersede())).await, "abcd");
        assert_eq!(text(source.attempt(source.supersede())).await, "abcd");
    }

    #[tokio::test]
    async fn over_the_cap_the_body_is_given_back_whole_to_send_once() {
        let Err(body) = Source::new(frames(&["abc", "def", "gh"]), 4) else {
            panic!("over the cap");
        };
        assert_eq!(text(body).await, "abcdefgh", "nothing read is lost");

        let known = Body::new(Full::new(Bytes::from_static(b"0123456789")));
        let Err(body) = Source::new(known, 9) else {
            panic!("over the cap by its size hint");
        };
        assert_eq!(text(body).await, "0123456789", "given back unread");
    }
}
