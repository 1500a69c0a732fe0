//! The response body that ends a recording, the request body that counts bytes sent, and the
//! recording itself.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

use super::layer::MethodMetrics;
use crate::BoxError;
use crate::body::{Observer, observed_body};
use crate::status::{code_from_error, code_from_trailers};

/// One call (or attempt) being measured. Recorded exactly once: by [`finish`](Self::finish), or
/// on drop as the status the head already gave, else `CANCELLED`.
pub(crate) struct Recording {
    method: Arc<MethodMetrics>,
    start: Instant,
    /// The status a Trailers-Only or non-gRPC response's head carried.
    pub(crate) head_code: Option<Code>,
    /// Attempt level: message bytes sent (counted by the request body) and received.
    sizes: Option<Sizes>,
    done: bool,
}

struct Sizes {
    sent: Arc<AtomicU64>,
    rcvd: Framer,
}

impl Recording {
    pub(crate) fn start(method: Arc<MethodMetrics>, sent: Option<Arc<AtomicU64>>) -> Self {
        Recording {
            method,
            start: Instant::now(),
            head_code: None,
            sizes: sent.map(|sent| Sizes {
                sent,
                rcvd: Framer::default(),
            }),
            done: false,
        }
    }

    fn received(&mut self, data: &[u8]) {
        if let Some(sizes) = &mut self.sizes {
            sizes.rcvd.feed(data);
        }
    }

    pub(crate) fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let handles = self.method.for_status(code);
        handles.duration.record(self.start.elapsed().as_secs_f64());
        if let (Some((sent, rcvd)), Some(sizes)) = (&handles.sizes, &self.sizes) {
            sent.record(sizes.sent.load(Ordering::Relaxed) as f64);
            rcvd.record(sizes.rcvd.payload as f64);
        }
    }
}

impl Recording {
    /// The body ended, with `trailers` or without: recorded as the status the head carried (a
    /// Trailers-Only or non-gRPC response), else the trailers'.
    fn ended(mut self, trailers: Option<&HeaderMap>) {
        let code = self
            .head_code
            .unwrap_or_else(|| code_from_trailers(trailers));
        self.finish(code);
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.finish(self.head_code.unwrap_or(Code::Cancelled));
    }
}

observed_body! {
    /// The response body of [`Metrics`](super::Metrics): passes every frame through and records
    /// the call when the body ends (its trailers, its end, an error) or is dropped.
    pub struct MetricsBody<B>(Observed<B, Recording>);
    impl Body where {
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    } {
        type Data = Bytes;
        type Error = BoxError;
    }
}

impl<B> MetricsBody<B> {
    /// The wrapped body. Taking it out ends the recording as `CANCELLED` (or as the status the
    /// response's head carried).
    pub fn into_inner(self) -> B {
        self.body.into_inner()
    }
}

/// The call being measured: received bytes as they go by, and its status at its end.
impl<E: Into<BoxError>> Observer<Bytes, E> for Recording {
    type Error = BoxError;

    #[inline]
    fn on_data(&mut self, data: &Bytes) {
        self.received(data);
    }

    fn on_trailers(self, trailers: &HeaderMap) {
        self.ended(Some(trailers));
    }

    /// A gRPC stream that ends without trailers ended abnormally (UNKNOWN).
    fn on_eos(self) {
        self.ended(None);
    }

    fn on_error(mut self, err: E) -> BoxError {
        let err: BoxError = err.into();
        self.finish(code_from_error(&*err));
        err
    }

    fn unobserved_error(err: E) -> BoxError {
        err.into()
    }
}

pin_project! {
    /// Attempt level: counts the message bytes of a request body as it is sent.
    pub(crate) struct SentBody {
        #[pin]
        inner: tonic::body::Body,
        framer: Framer,
        sent: Arc<AtomicU64>,
    }
}

impl SentBody {
    pub(crate) fn new(inner: tonic::body::Body, sent: Arc<AtomicU64>) -> Self {
        SentBody {
            inner,
            framer: Framer::default(),
            sent,
        }
    }
}

impl Body for SentBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref))
            && let Some(data) = data
        {
            let payload = this.framer.feed(data);
            this.sent.fetch_add(payload, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts message payload bytes in a gRPC length-prefixed stream (1 flag byte, 4 length bytes,
/// the message), across arbitrary chunk boundaries. A66 counts messages, not framing.
#[derive(Debug, Default)]
pub(crate) struct Framer {
    /// Header bytes of the current prefix seen so far (0 to 4).
    header_seen: u8,
    /// The length being read from the prefix.
    len: u32,
    /// Message bytes still to come in the current message.
    left: u64,
    /// Message bytes seen in total.
    pub(crate) payload: u64,
}

impl Framer {
    /// Feeds a chunk; returns how many of its bytes were message bytes.
    pub(crate) fn feed(&mut self, mut chunk: &[u8]) -> u64 {
        let mut payload = 0;
        while !chunk.is_empty() {
            if self.left > 0 {
                let n = self.left.min(chunk.len() as u64);
                payload += n;
                self.left -= n;
                chunk = &chunk[n as usize..];
                continue;
            }
            let byte = chunk[0];
            chunk = &chunk[1..];
            if self.header_seen > 0 {
                self.len = (self.len << 8) | u32::from(byte);
            }
            self.header_seen += 1;
            if self.header_seen == 5 {
                self.left = u64::from(self.len);
                self.header_seen = 0;
                self.len = 0;
            }
        }
        self.payload += payload;
        payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(messages: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn framer_counts_message_bytes_only() {
        let mut f = Framer::default();
        assert_eq!(f.feed(&frames(&[b"hello", b"", b"abc"])), 8);
        assert_eq!(f.payload, 8);
    }

    proptest! {
        #[test]
        fn framer_is_independent_of_chunking(
            messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
            let wire = frames(&refs);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            cuts.push(0);
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut f = Framer::default();
            for pair in cuts.windows(2) {
                f.feed(&wire[pair[0]..pair[1]]);
            }
            let total: usize = messages.iter().map(Vec::len).sum();
            prop_assert_eq!(f.payload, total as u64);
        }
    }
}
