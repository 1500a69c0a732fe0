//! Discovery from a source that only knows the whole set: [`FullSet`] turns each full set of
//! endpoints into the [`Change`]s that take the balancer from the last set to it.
//!
//! Many registries answer "what is there now?" rather than "what changed?": a file re-read on
//! an interval, an HTTP endpoint polled, a Kubernetes `Endpoints` object, a config push. Feed
//! those sets to [`FullSet::new`] as a stream and it yields only the differences, as
//! [`dns::Dns`](super::dns::Dns) does for its resolutions:
//!
//! - [`Change::Insert`] for an address that is new, or whose [`Endpoint`] changed (a re-insert,
//!   which the balancer applies as an update);
//! - [`Change::Remove`] for an address that is gone;
//! - inserts before removes, so a balancer never sees an empty set in the middle of a
//!   replacement; within each, changes come in the order of the URIs' text.
//!
//! An address is its URI: `http://10.0.0.1:50051` and `http://10.0.0.1:50052` are two
//! endpoints. When a set names one URI more than once, its last entry counts.
//!
//! An `Err` from the source is passed on as it is and the last set stays (the balancer logs it
//! and keeps its endpoints); an empty set is a real change that removes every endpoint: filter
//! empty sets out of the source first if they should keep the last set instead. When the source
//! ends, so does the stream, and the balancer keeps the last set.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), towline::BoxError> {
//! use futures::{StreamExt, stream};
//! use http::Uri;
//! use towline::discover::{Change, Endpoint, FullSet};
//!
//! fn set(uris: &[&'static str]) -> Result<Vec<(Uri, Endpoint)>, towline::BoxError> {
//!     Ok(uris.iter().map(|u| (Uri::from_static(u), Endpoint::default())).collect())
//! }
//!
//! // In production: a stream that polls your registry, e.g. with
//! // `tokio_stream::wrappers::IntervalStream` and `.then(|_| fetch_addresses())`.
//! let polls = stream::iter([
//!     set(&["http://10.0.0.1:50051", "http://10.0.0.2:50051"]),
//!     set(&["http://10.0.0.2:50051", "http://10.0.0.3:50051"]),
//! ]);
//! let changes: Vec<_> = FullSet::new(polls).map(Result::unwrap).collect().await;
//! assert!(matches!(&changes[..], [
//!     Change::Insert(a, _), Change::Insert(b, _), // the first set, in full
//!     Change::Insert(c, _), Change::Remove(d),    // then only what changed
//! ] if a == "http://10.0.0.1:50051" && b == "http://10.0.0.2:50051"
//!     && c == "http://10.0.0.3:50051" && d == "http://10.0.0.1:50051"));
//!
//! // It is a `Discover` source like any other:
//! # let polls = stream::iter([set(&["http://10.0.0.1:50051"])]);
//! let balance = towline::balance::BalanceLayer::new(
//!     FullSet::new(polls),
//!     towline::balance::BalanceConfig::default(),
//! );
//! # drop(balance);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::Stream;
use http::Uri;

use super::{Change, Endpoint, Update};
use crate::BoxError;

/// A full set of endpoints, keyed by the URI's text: `Uri` has no order, and a sorted set makes
/// the changes come out in a stable order.
pub(crate) type Set = BTreeMap<String, (Uri, Endpoint)>;

/// The set of `endpoints`; a URI named twice keeps its last entry.
pub(crate) fn set_of(endpoints: impl IntoIterator<Item = (Uri, Endpoint)>) -> Set {
    endpoints
        .into_iter()
        .map(|(uri, endpoint)| (uri.to_string(), (uri, endpoint)))
        .collect()
}

/// The changes that take `old` to `new`: inserts for what is new or changed, then removes for
/// what is gone.
pub(crate) fn diff(old: &Set, new: &Set) -> Vec<Update> {
    let inserts = new
        .iter()
        .filter(|(key, (_, endpoint))| old.get(*key).map(|(_, e)| e) != Some(endpoint))
        .map(|(_, (uri, endpoint))| Change::Insert(uri.clone(), *endpoint));
    let removes = old
        .iter()
        .filter(|(key, _)| !new.contains_key(*key))
        .map(|(_, (uri, _))| Change::Remove(uri.clone()));
    inserts.chain(removes).collect()
}

pin_project_lite::pin_project! {
    /// A [`Discover`](super::Discover) source from a stream of full endpoint sets; see the
    /// [module docs](self).
    #[must_use = "streams do nothing unless polled"]
    pub struct FullSet<S> {
        #[pin]
        sets: S,
        // The last set, what the consumer has been told.
        current: Set,
        // Changes computed but not yet yielded.
        pending: VecDeque<Update>,
    }
}

impl<S> FullSet<S> {
    /// Follows `sets`, a stream of `Result<impl IntoIterator<Item = (Uri, Endpoint)>, E>`.
    pub fn new(sets: S) -> Self {
        FullSet {
            sets,
            current: Set::new(),
            pending: VecDeque::new(),
        }
    }
}

impl<S> fmt::Debug for FullSet<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FullSet")
            .field("current", &self.current.keys())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<S, I, E> Stream for FullSet<S>
where
    S: Stream<Item = Result<I, E>>,
    I: IntoIterator<Item = (Uri, Endpoint)>,
    E: Into<BoxError>,
{
    type Item = Result<Update, BoxError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match ready!(this.sets.as_mut().poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
                Some(Ok(endpoints)) => {
                    let new = set_of(endpoints);
                    this.pending.extend(diff(this.current, &new));
                    *this.current = new;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn endpoints(entries: &[(&'static str, u32)]) -> Vec<(Uri, Endpoint)> {
        entries
            .iter()
            .map(|(uri, weight)| (Uri::from_static(uri), Endpoint::weighted(*weight)))
            .collect()
    }

    /// What `FullSet` yields for `sets`, as (uri, Some(weight)) for inserts, (uri, None) for
    /// removes and ("error: ..", None) for errors.
    async fn changes(
        sets: Vec<Result<Vec<(Uri, Endpoint)>, &'static str>>,
    ) -> Vec<(String, Option<u32>)> {
        FullSet::new(futures::stream::iter(sets))
            .map(|item| match item {
                Ok(Change::Insert(uri, e)) => (uri.to_string(), Some(e.weight)),
                Ok(Change::Remove(uri)) => (uri.to_string(), None),
                Err(err) => (format!("error: {err}"), None),
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn first_set_is_inserted_in_full_then_only_differences() {
        let seen = changes(vec![
            Ok(endpoints(&[("http://b:1", 1), ("http://a:1", 1)])),
            Ok(endpoints(&[("http://a:1", 1), ("http://b:1", 1)])),
            Ok(endpoints(&[("http://b:1", 1), ("http://c:1", 1)])),
        ])
        .await;
        assert_eq!(
            seen,
            [
                ("http://a:1/".to_string(), Some(1)),
                ("http://b:1/".to_string(), Some(1)),
                // The second set equals the first: nothing. The third: c in, then a out.
                ("http://c:1/".to_string(), Some(1)),
                ("http://a:1/".to_string(), None),
            ]
        );
    }

    #[tokio::test]
    async fn a_changed_weight_is_reinserted_and_ports_are_distinct_endpoints() {
        let seen = changes(vec![
            Ok(endpoints(&[("http://a:1", 1), ("http://a:2", 5)])),
            Ok(endpoints(&[("http://a:1", 1), ("http://a:2", 7)])),
        ])
        .await;
        assert_eq!(
            seen,
            [
                ("http://a:1/".to_string(), Some(1)),
                ("http://a:2/".to_string(), Some(5)),
                ("http://a:2/".to_string(), Some(7)),
            ]
        );
    }

    #[tokio::test]
    async fn errors_pass_through_and_keep_the_set_an_empty_set_removes_all() {
        let seen = changes(vec![
            Ok(endpoints(&[("http://a:1", 1), ("http://b:1", 1)])),
            Err("registry unreachable"),
            Ok(endpoints(&[("http://a:1", 1), ("http://b:1", 1)])),
            Ok(Vec::new()),
        ])
        .await;
        assert_eq!(
            seen,
            [
                ("http://a:1/".to_string(), Some(1)),
                ("http://b:1/".to_string(), Some(1)),
                // The error removes nothing, so the same set after it changes nothing.
                ("error: registry unreachable".to_string(), None),
                ("http://a:1/".to_string(), None),
                ("http://b:1/".to_string(), None),
            ]
        );
    }

    #[tokio::test]
    async fn a_uri_named_twice_keeps_its_last_entry() {
        let seen = changes(vec![Ok(endpoints(&[("http://a:1", 2), ("http://a:1", 3)]))]).await;
        assert_eq!(seen, [("http://a:1/".to_string(), Some(3))]);
    }

    #[test]
    fn full_set_is_a_send_unpin_discover() {
        fn check<T: crate::discover::Discover + Unpin>() {}
        check::<
            FullSet<
                futures::stream::Iter<std::vec::IntoIter<Result<Vec<(Uri, Endpoint)>, BoxError>>>,
            >,
        >();
    }
}
