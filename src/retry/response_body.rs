//! How a committed call's final status reaches the retry budget: its response body reports the
//! `grpc-status` of its trailers as they go by.
//!
//! A call commits when its response headers arrive (gRFC A6), but its status comes in the
//! trailers. When the call draws from a token-bucket budget, `OK` in the trailers is a success
//! and a code the policy retries is a failure (grpc-core takes a token for it; grpc-go at least
//! does not refill). Any other code, and a body dropped before its end, leave the budget alone.
//!
//! The report rides in the response body without changing the response's type, so that a
//! `Retry<S>` answers with `S`'s own response and composes as any layer does (`option_layer`
//! needs both branches to answer alike). That is possible for tonic's [`Body`](TonicBody), which
//! boxes any body: a `Channel`'s responses, and any stack that answers with it. For another body
//! type (a balancer's own body around tonic's, say) the layer cannot reach the trailers, and the
//! call counts as a success when it commits, as it did before the trailers were read.

use std::any::Any;

use http::HeaderMap;
use tonic::body::Body as TonicBody;
use tonic::{Code, Status};

use super::budget::RetryBudget;
use super::policy::CodeSet;
use crate::BoxError;
use crate::body::{Observed, Observer};
use crate::status::{CallEnd, code_from_error, code_from_trailers};

/// Where a committed call's final status is reported.
pub(crate) struct Outcome {
    budget: RetryBudget,
    retryable: CodeSet,
}

impl Outcome {
    /// Only a token bucket counts successes and failures: a percentage budget needs no report.
    pub(crate) fn for_budget(budget: Option<&RetryBudget>, retryable: CodeSet) -> Option<Outcome> {
        budget
            .filter(|budget| budget.counts_outcomes())
            .map(|budget| Outcome {
                budget: budget.clone(),
                retryable,
            })
    }

    pub(crate) fn report(self, code: Code) {
        if code == Code::Ok {
            self.budget.on_success();
        } else if self.retryable.contains(code) {
            self.budget.on_failure();
        }
    }

    /// `body`, now reporting its trailers' status here, if its type lets it (see the module
    /// docs); otherwise through `end`, the [`CallEnd`] the attempt carried, which a layer below
    /// that reads the trailers (the balancer) reports to; with neither, the call counts as a
    /// success now, at its commit.
    pub(crate) fn watch<B: 'static>(self, body: B, end: Option<&CallEnd>) -> B {
        let mut slot = Some(body);
        if let Some(tonic_slot) = (&mut slot as &mut dyn Any).downcast_mut::<Option<TonicBody>>() {
            *tonic_slot = tonic_slot
                .take()
                .map(|body| TonicBody::new(Observed::new(body, Some(self))));
        } else if let Some(end) = end {
            end.on_end(move |code| self.report(code));
        } else {
            self.report(Code::Ok);
        }
        match slot {
            Some(body) => body,
            None => unreachable!("the slot is refilled with the watched body"),
        }
    }
}

/// The committed call's final status, from its trailers as they go by.
impl<D, E: 'static> Observer<D, E> for Outcome {
    type Error = E;

    fn on_trailers(self, trailers: &HeaderMap) {
        self.report(code_from_trailers(Some(trailers)));
    }

    /// A gRPC stream that ends without trailers ended abnormally.
    fn on_eos(self) {
        self.report(code_from_trailers(None));
    }

    fn on_error(self, err: E) -> E {
        self.report(code_of_body_error(&err));
        err
    }

    fn unobserved_error(err: E) -> E {
        err
    }
}

/// The code a response body's error stands for. The error is the inner body's own type, handed
/// on untouched, so it is read in place: tonic's bodies fail with a [`Status`]; a boxed error or
/// hyper's is classified as a service error is; anything else is `UNKNOWN`.
fn code_of_body_error(err: &(dyn Any + 'static)) -> Code {
    if let Some(status) = err.downcast_ref::<Status>() {
        status.code()
    } else if let Some(err) = err.downcast_ref::<BoxError>() {
        code_from_error(&**err)
    } else if let Some(err) = err.downcast_ref::<hyper::Error>() {
        code_from_error(err)
    } else {
        Code::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};

    fn ending_with(code: Option<Code>) -> tonic::body::Body {
        let mut frames: Vec<Result<Frame<Bytes>, Status>> =
            vec![Ok(Frame::data(Bytes::from_static(b"message")))];
        if let Some(code) = code {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", (code as i32).into());
            frames.push(Ok(Frame::trailers(trailers)));
        }
        tonic::body::Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    fn reporting(body: tonic::body::Body, budget: &RetryBudget) -> tonic::body::Body {
        let retryable = [Code::Unavailable].into_iter().collect();
        Outcome::for_budget(Some(budget), retryable)
            .unwrap()
            .watch(body, None)
    }

    #[tokio::test]
    async fn the_trailers_status_reaches_the_budget() {
        let budget = RetryBudget::token_bucket(10.0, 0.5).unwrap();
        let collected = reporting(ending_with(Some(Code::Unavailable)), &budget)
            .collect()
            .await
            .unwrap();
        assert_eq!(collected.to_bytes(), "message", "the body is unchanged");
        assert_eq!(budget.tokens(), Some(9.0), "a retryable code is a failure");

        reporting(ending_with(Some(Code::Ok)), &budget)
            .collect()
            .await
            .unwrap();
        assert_eq!(budget.tokens(), Some(9.5), "OK is a success");

        reporting(ending_with(Some(Code::Internal)), &budget)
            .collect()
            .await
            .unwrap();
        assert_eq!(budget.tokens(), Some(9.5), "a code not retried is neither");

        // Dropped before the end: the caller gave up; nothing is reported.
        let mut body = reporting(ending_with(Some(Code::Unavailable)), &budget);
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(budget.tokens(), Some(9.5));
    }

    #[tokio::test]
    async fn a_failed_body_reports_its_error_s_code() {
        let budget = RetryBudget::token_bucket(10.0, 0.5).unwrap();
        let failing = tonic::body::Body::new(StreamBody::new(futures::stream::iter([Err::<
            Frame<Bytes>,
            _,
        >(
            Status::unavailable("connection reset"),
        )])));
        let err = reporting(failing, &budget).collect().await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(budget.tokens(), Some(9.0));
    }

    #[test]
    fn a_body_of_another_type_counts_as_a_success_at_its_commit() {
        let budget = RetryBudget::token_bucket(10.0, 0.5).unwrap();
        budget.on_failure();
        let retryable = [Code::Unavailable].into_iter().collect();
        let _body = Outcome::for_budget(Some(&budget), retryable)
            .unwrap()
            .watch(http_body_util::Empty::<Bytes>::new(), None);
        assert_eq!(budget.tokens(), Some(9.5));
    }

    #[test]
    fn a_percentage_budget_needs_no_report() {
        let budget = RetryBudget::percent(std::time::Duration::from_secs(1), 1, 0.1).unwrap();
        assert!(Outcome::for_budget(Some(&budget), CodeSet::default()).is_none());
        assert!(Outcome::for_budget(None, CodeSet::default()).is_none());
    }
}
