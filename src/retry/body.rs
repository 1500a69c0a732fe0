//! [`ReplayBody`]: a request body that can be sent again, as linkerd2-proxy's `ReplayBody` does.
//!
//! The first attempt streams the caller's body and, as it goes, keeps each data frame (a cheap
//! `Bytes` clone) and the trailers. A later attempt replays what was kept, then carries on reading
//! the caller's body where the earlier attempt stopped. Nothing is read ahead of what an attempt
//! asks for, so a streaming request is never held back.
//!
//! Once more than `max_bytes` have been read the buffer is dropped and the body becomes
//! non-replayable: the attempt in flight still gets every byte (never truncated, never dropped),
//! but no retry can be made.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;

/// A replayable request body. Keep the one [`ReplayBody::new`] returns as the template and give
/// each attempt a [`clone`](Clone::clone) of it: a clone starts again from the first byte, and
/// the newest clone is the one that reads on from the caller's body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// The next frame of `Shared::frames` this attempt sends.
    position: usize,
    trailers_sent: bool,
    /// Which clone this is: only the newest reads on from the caller's body.
    generation: u64,
}

struct Shared {
    /// The caller's body, until it ends.
    rest: Option<Body>,
    /// The data frames read so far, while under the cap.
    frames: Vec<Bytes>,
    /// How many data frames have been read from `rest`, kept or not.
    read: usize,
    /// The newest clone's generation.
    latest: u64,
    buffered: usize,
    max_bytes: usize,
    trailers: Option<HeaderMap>,
    /// Over the cap, or the caller's body failed: it cannot be sent again.
    replayable: bool,
}

impl ReplayBody {
    /// Wraps the caller's body, buffering up to `max_bytes` for replay. A body whose size hint
    /// already exceeds the cap is marked non-replayable up front.
    pub fn new(body: Body, max_bytes: usize) -> Self {
        let replayable = body.size_hint().lower() <= max_bytes as u64;
        ReplayBody {
            shared: Arc::new(Mutex::new(Shared {
                rest: (!body.is_end_stream()).then_some(body),
                frames: Vec::new(),
                read: 0,
                latest: 0,
                buffered: 0,
                max_bytes,
                trailers: None,
                replayable,
            })),
            position: 0,
            trailers_sent: false,
            generation: 0,
        }
    }

    /// Whether a new attempt could be sent in full: nothing read so far was lost to the cap or
    /// to an error of the caller's body.
    pub fn is_replayable(&self) -> bool {
        self.shared().replayable
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Clone for ReplayBody {
    /// A new attempt's body, from the first byte. It supersedes every earlier clone: an earlier
    /// attempt that is still being sent (its response came back first) ends with an error once it
    /// has sent what was buffered, rather than compete for the caller's body and its wake-ups.
    fn clone(&self) -> Self {
        let mut shared = self.shared();
        shared.latest += 1;
        ReplayBody {
            shared: self.shared.clone(),
            position: 0,
            trailers_sent: false,
            generation: shared.latest,
        }
    }
}

impl fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = self.shared();
        f.debug_struct("ReplayBody")
            .field("position", &self.position)
            .field("read", &shared.read)
            .field("buffered", &shared.buffered)
            .field("max_bytes", &shared.max_bytes)
            .field("replayable", &shared.replayable)
            .finish()
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let shared = &mut *shared;
        // Replay what an earlier attempt read.
        if this.position < shared.read {
            if !shared.replayable {
                return Poll::Ready(Some(Err(Status::internal(
                    "towline retry: the request body was not kept for replay",
                ))));
            }
            let data = shared.frames[this.position].clone();
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        // Then read on from the caller's body.
        if let Some(rest) = shared.rest.as_mut() {
            if this.generation != shared.latest {
                return Poll::Ready(Some(Err(Status::cancelled(
                    "towline retry: a newer attempt took over the request body",
                ))));
            }
            let frame = match Pin::new(rest).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        shared.read += 1;
                        this.position = shared.read;
                        if shared.replayable {
                            shared.buffered = shared.buffered.saturating_add(data.len());
                            if shared.buffered > shared.max_bytes {
                                shared.replayable = false;
                                shared.frames = Vec::new();
                            } else {
                                shared.frames.push(data.clone());
                            }
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            shared.trailers = Some(trailers);
                        }
                        shared.rest = None;
                    }
                },
                Some(Err(status)) => {
                    shared.replayable = false;
                    shared.rest = None;
                    return Poll::Ready(Some(Err(status)));
                }
                None => shared.rest = None,
            }
        }
        // The caller's body has ended: its trailers, if it had any, once per attempt.
        if !this.trailers_sent {
            this.trailers_sent = true;
            if let Some(trailers) = &shared.trailers {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared();
        shared.rest.is_none()
            && self.position >= shared.read
            && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared();
        let replay: u64 = if self.position < shared.read && shared.replayable {
            shared.frames[self.position..]
                .iter()
                .map(|b| b.len() as u64)
                .sum()
        } else {
            0
        };
        match &shared.rest {
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
        let second = template.clone();
        assert!(second.is_replayable());
        assert_eq!(second.size_hint().exact(), Some(6));
        let (bytes, t) = collect(second).await;
        assert_eq!(bytes, "abcdef");
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
        assert_eq!(err.code(), tonic::Code::Cancelled);
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
        assert_eq!(err.code(), tonic::Code::Internal);
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

    #[tokio::test]
    async fn an_empty_body_replays_as_empty() {
        let template = ReplayBody::new(Body::empty(), 8);
        assert!(template.is_end_stream());
        assert_eq!(collect(template.clone()).await.0, "");
        assert_eq!(collect(template.clone()).await.0, "");
    }
}
