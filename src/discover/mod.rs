//! Where endpoints come from: a stream of [`Change`]s, as [`tower::discover`] models it.
//!
//! The balancer consumes any [`Discover`]: a `Stream` of `Result<Change<Uri, Endpoint>, BoxError>`.
//! towline ships a fixed list ([`Static`]), a channel you feed from your own watch (Consul,
//! etcd, Kubernetes: [`channel`]), [`FullSet`] for a registry that only tells you the whole set
//! (it yields what changed) and, with the `dns` feature (on by default), DNS A/AAAA and SRV
//! records re-resolved on an interval ([`dns::Dns`]). With the `etcd` feature, `discover::etcd`
//! follows a key prefix in etcd (`Etcd`) and registers servers under it on a lease
//! (`Registration`).
//!
//! Errors from a source never remove endpoints: the balancer keeps the last set it was given and
//! logs the error. A source that ends leaves the last set in place.
//!
//! ```
//! use towline::discover::{self, Change, Endpoint};
//!
//! let (updates, discovery) = discover::channel(16);
//! updates.try_send(Change::Insert("http://10.0.0.1:50051".parse().unwrap(), Endpoint::default())).unwrap();
//! updates.try_send(Change::Remove("http://10.0.0.1:50051".parse().unwrap())).unwrap();
//! # drop(discovery);
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use http::Uri;
pub use tower::discover::Change;

use crate::BoxError;

#[cfg(feature = "dns")]
pub mod dns;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod full_set;

pub use full_set::FullSet;

/// What discovery knows about an endpoint besides its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Endpoint {
    /// Relative share of traffic for weighted strategies (and SRV records); at least 1.
    pub weight: u32,
}

impl Endpoint {
    /// An endpoint with this weight (0 is raised to 1).
    pub fn weighted(weight: u32) -> Self {
        Endpoint {
            weight: weight.max(1),
        }
    }
}

impl Default for Endpoint {
    fn default() -> Self {
        Endpoint { weight: 1 }
    }
}

/// One discovery event.
pub type Update = Change<Uri, Endpoint>;

/// A source of endpoint changes the balancer can follow.
pub trait Discover: Stream<Item = Result<Update, BoxError>> + Send + 'static {}

impl<T> Discover for T where T: Stream<Item = Result<Update, BoxError>> + Send + 'static {}

/// A fixed set of endpoints, inserted once.
#[derive(Debug, Clone)]
pub struct Static {
    pending: std::vec::IntoIter<(Uri, Endpoint)>,
}

impl Static {
    /// Endpoints of weight 1.
    pub fn new(uris: impl IntoIterator<Item = Uri>) -> Self {
        Static::weighted(uris.into_iter().map(|uri| (uri, 1)))
    }

    /// Endpoints of weight 1 from anything that converts to a [`Uri`] (`&str`, `String`,
    /// `Uri`), as tonic's `Endpoint::try_from` takes them; an address that does not parse is an
    /// error naming its place in the list (`static.endpoints[1]`), before anything connects.
    ///
    /// ```
    /// use towline::discover::Static;
    ///
    /// let endpoints = Static::try_new(["http://10.0.0.1:50051", "http://10.0.0.2:50051"])?;
    /// # drop(endpoints);
    /// let err = Static::try_new(["http://10.0.0.1:50051", "http://bad host"]).unwrap_err();
    /// assert_eq!(err.field(), "static.endpoints[1]");
    /// # Ok::<(), towline::ConfigError>(())
    /// ```
    pub fn try_new<T>(uris: impl IntoIterator<Item = T>) -> Result<Self, crate::ConfigError>
    where
        T: TryInto<Uri> + std::fmt::Debug,
        T::Error: std::fmt::Display,
    {
        let uris = uris
            .into_iter()
            .enumerate()
            .map(|(i, uri)| {
                let shown = format!("{uri:?}");
                uri.try_into().map_err(|e| {
                    crate::ConfigError::new(
                        format!("static.endpoints[{i}]"),
                        format!("{shown} is not a URI: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<Uri>, _>>()?;
        Ok(Static::new(uris))
    }

    /// Endpoints with a static weight each.
    pub fn weighted(endpoints: impl IntoIterator<Item = (Uri, u32)>) -> Self {
        let pending: Vec<_> = endpoints
            .into_iter()
            .map(|(uri, weight)| (uri, Endpoint::weighted(weight)))
            .collect();
        Static {
            pending: pending.into_iter(),
        }
    }
}

impl Stream for Static {
    type Item = Result<Update, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(
            self.pending
                .next()
                .map(|(uri, endpoint)| Ok(Change::Insert(uri, endpoint))),
        )
    }
}

/// A discovery source fed by hand: send [`Change`]s on the returned sender. The balancer keeps
/// the last set when every sender is gone.
pub fn channel(buffer: usize) -> (tokio::sync::mpsc::Sender<Update>, Channel) {
    let (tx, rx) = tokio::sync::mpsc::channel(buffer.max(1));
    (tx, Channel { rx })
}

/// The receiving half of [`channel`].
#[derive(Debug)]
pub struct Channel {
    rx: tokio::sync::mpsc::Receiver<Update>,
}

impl Stream for Channel {
    type Item = Result<Update, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|change| change.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn static_inserts_each_endpoint_once_then_ends() {
        let uris: Vec<Uri> = vec!["http://a:1".parse().unwrap(), "http://b:2".parse().unwrap()];
        let changes: Vec<_> = Static::weighted([(uris[0].clone(), 3), (uris[1].clone(), 0)])
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(changes.len(), 2);
        assert!(matches!(&changes[0], Change::Insert(u, e) if *u == uris[0] && e.weight == 3));
        assert!(matches!(&changes[1], Change::Insert(u, e) if *u == uris[1] && e.weight == 1));
    }

    #[tokio::test]
    async fn channel_forwards_changes_and_ends_with_its_senders() {
        let (tx, mut rx) = channel(4);
        let uri: Uri = "http://a:1".parse().unwrap();
        tx.send(Change::Insert(uri.clone(), Endpoint::default()))
            .await
            .unwrap();
        tx.send(Change::Remove(uri.clone())).await.unwrap();
        drop(tx);
        assert!(matches!(rx.next().await, Some(Ok(Change::Insert(..)))));
        assert!(matches!(rx.next().await, Some(Ok(Change::Remove(u))) if u == uri));
        assert!(rx.next().await.is_none());
    }
}
