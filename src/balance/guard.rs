//! [`CallGuard`]: what one call owes the endpoint it was sent to (its in-flight slot, its
//! outcome, its round trip), settled however the call ends.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tonic::{Code, Status};

use super::endpoint::{CallEvent, Load};
use crate::status::{CallEnd, code_from_error};

/// Tracks one call on one endpoint: its in-flight count, its outcome for outlier detection and
/// its round-trip time, until the end of the response body (or until it is dropped).
pub(crate) struct CallGuard {
    pub(crate) load: Arc<Load>,
    generation: u64,
    /// A layer above that wants the call's final code (the retry layer's token bucket).
    end: Option<CallEnd>,
    recorded: bool,
    /// When the request went out, while its round trip is still to be measured. The round trip
    /// runs from the send (a wait for the endpoint's readiness is no measure of the endpoint)
    /// to the first data of the response (as linkerd measures it: a stream's length is the
    /// stream's, not the endpoint's), or to the call's end when no data comes. A call whose
    /// connection failed under it measures nothing: a peak estimator would keep that one
    /// outlier for many decay periods. In ns on the endpoint's RTT clock
    /// ([`Load::rtt_clock`]).
    rtt_from: Option<u64>,
    /// The response head arrived: from then on, a body dropped before its first data measures
    /// nothing (the caller lost interest; the endpoint was not slow).
    responded: bool,
}

// The small steps of every call are `#[inline]`: they are called from the response future and
// body, generic code compiled in the caller's crate, where they could not be inlined otherwise.
impl CallGuard {
    #[inline]
    pub(crate) fn new(load: Arc<Load>, generation: u64, end: Option<CallEnd>) -> Self {
        CallGuard {
            load,
            generation,
            end,
            recorded: false,
            rtt_from: None,
            responded: false,
        }
    }

    /// The request goes out on the endpoint now: its round trip starts.
    #[inline]
    pub(crate) fn sent(mut self) -> Self {
        if self.load.feedback.measures_rtt {
            self.rtt_from = Some(self.load.rtt_clock());
        }
        self
    }

    /// The response head arrived; the round trip ends at its first data, or at its end.
    #[inline]
    pub(crate) fn responded(&mut self) {
        self.responded = true;
    }

    /// The response's first data arrived (or the call ended): the round trip is over.
    pub(crate) fn end_round_trip(&mut self) {
        if let Some(sent) = self.rtt_from.take() {
            self.load.observe_round_trip(sent, self.load.rtt_clock());
        }
    }

    /// Records the call's final code, once.
    pub(crate) fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        self.end_round_trip();
        if let Some(end) = self.end.take() {
            end.report(code);
        }
        let feedback = &self.load.feedback;
        let Some(detection) = &feedback.detection else {
            return;
        };
        let streak = self.load.record_outcome(!detection.is_failure(code));
        // At the threshold, once per streak: every failing call past it would flood the driver
        // with the same news. Once an ejection ends the streak is news again, so the next
        // failure (the probe) shuts the endpoint again, as linkerd's failure accrual does.
        if detection
            .consecutive_failures
            .is_some_and(|threshold| streak >= threshold)
            && self.load.report_streak()
        {
            let _ = feedback.events.send(CallEvent::FailureStreak(self.load.id));
        }
    }

    /// The inner service failed the call (servers answer with a response, so this is about the
    /// connection, or the inner service's own verdict).
    pub(crate) fn failed(&mut self, err: &(dyn std::error::Error + 'static)) {
        let code = code_from_error(err);
        // UNAVAILABLE as an error (servers answer with responses, so it is never theirs) means
        // a connection broke. A raw transport error: the connection this endpoint holds, which
        // its connection task replaces. A `Status`: the inner service's own verdict, e.g. a
        // pool that already dropped the broken connection and keeps its others, so the endpoint
        // stays. Either way outlier detection, which judges answers, does not count it: it
        // would keep a backend that is back up ejected for a whole ejection time.
        if code == Code::Unavailable {
            self.recorded = true;
            self.rtt_from = None;
            match err.downcast_ref::<Status>() {
                // The service keeps its own connections (a pool): it may have others, or none
                // left; the endpoint task looks at its readiness.
                Some(status) => self
                    .load
                    .signals
                    .check_readiness(|| status.message().to_owned()),
                None => {
                    if crate::status::is_too_many_pings(err) {
                        self.too_many_pings();
                    }
                    self.connection_broken();
                }
            }
        } else {
            self.finish(code);
        }
    }

    /// The server ended this call for our keepalive pings and is closing the connection
    /// (grpc-core): later connections ping half as often (gRFC A8). A pool notes it itself;
    /// a bare connection the balancer owns is noted here, once per connection.
    pub(crate) fn too_many_pings(&self) {
        self.load
            .signals
            .note_ping_strike(&self.load.uri, self.generation);
    }

    /// Tells the endpoint's connection task that its connection failed, unless it has already
    /// been replaced since this call began.
    pub(crate) fn connection_broken(&self) {
        let signals = &self.load.signals;
        if signals.generation.load(Ordering::Acquire) == self.generation {
            // `notify_waiters` stores no permit: the many calls that fail together when a
            // connection dies must not leave one behind to tear down its replacement.
            signals.broken.notify_waiters();
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        // Dropped while waiting for the response (a caller's timeout above): the wait is a lower
        // bound of the round trip. Dropped after the head: nothing to say about the endpoint.
        if !self.responded {
            self.end_round_trip();
        }
        // SeqCst pairs with the driver's store of `draining` then load of `in_flight`: one of
        // the two sides must see the other's write, or a drained endpoint would never leave.
        let before = self.load.in_flight.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.load.signals.draining.load(Ordering::SeqCst) {
            let _ = (self.load.feedback.events).send(CallEvent::Drained(self.load.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::endpoint::{EwmaConfig, Feedback};
    use crate::clock::Clock;
    use crate::outlier::OutlierDetection;
    use std::time::Duration;
    use tokio::sync::mpsc;

    fn load(feedback: &Arc<Feedback>) -> Arc<Load> {
        Arc::new(Load::new(
            7,
            http::Uri::from_static("http://a:1"),
            crate::discover::Endpoint::default(),
            EwmaConfig::new(Duration::from_millis(1), Duration::from_secs(1)),
            Clock::new(),
            feedback.clone(),
        ))
    }

    fn calls(load: &Arc<Load>, code: Code, n: usize) {
        for _ in 0..n {
            load.in_flight.fetch_add(1, Ordering::Relaxed);
            CallGuard::new(load.clone(), 1, None).sent().finish(code);
        }
    }

    fn streaks(events: &mut mpsc::UnboundedReceiver<CallEvent>) -> usize {
        std::iter::from_fn(|| events.try_recv().ok())
            .filter(|e| matches!(e, CallEvent::FailureStreak(7)))
            .count()
    }

    #[test]
    fn a_failure_streak_is_reported_once_not_once_per_failing_call() {
        let (tx, mut events) = mpsc::unbounded_channel();
        let feedback = Arc::new(Feedback {
            detection: Some(
                OutlierDetection::builder()
                    .consecutive_failures(Some(3))
                    .build()
                    .unwrap(),
            ),
            events: tx,
            measures_rtt: true,
        });
        let load = load(&feedback);
        calls(&load, Code::Internal, 2);
        assert_eq!(streaks(&mut events), 0, "below the threshold");
        calls(&load, Code::Internal, 100);
        assert_eq!(streaks(&mut events), 1, "one streak, one report");

        // The ejection ended: the probe's failure is news again, once.
        load.rearm_streak();
        calls(&load, Code::Internal, 10);
        assert_eq!(streaks(&mut events), 1);

        // A success ends the streak; the next one is reported when it reaches the threshold.
        calls(&load, Code::Ok, 1);
        calls(&load, Code::Internal, 2);
        assert_eq!(streaks(&mut events), 0);
        calls(&load, Code::Internal, 50);
        assert_eq!(streaks(&mut events), 1);
        assert_eq!(load.in_flight.load(Ordering::Relaxed), 0);
    }
}
