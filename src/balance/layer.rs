//! [`BalanceLayer`]: the `tower::Layer` that starts a [`Balance`] over a `MakeService`.

use std::any::Any;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use tower_layer::Layer;

use super::config::BalanceConfig;
use super::endpoint::MakeEndpoint;
use super::service::Balance;
use crate::discover::Discover;

/// Balances calls over the endpoints a [`Discover`] names, connecting to each through a
/// `MakeService`. See the [module docs](super).
///
/// **One balancer per layer, however often it is layered.** A discovery is a stream with one
/// consumer, so a `BalanceLayer` starts one [`Balance`], the first time it is
/// [layered](Layer::layer); layering it again (a `ServiceBuilder` whose `service` is called for
/// a second client) gives another handle to that same balancer, as [`Clone`] on it does: the
/// same endpoints, connections and statistics, connected through the first `MakeService`.
/// The layer holds that handle too, so a layer kept (in a `ServiceBuilder` stored for later)
/// keeps its balancer, its driver and its connections alive after every client is dropped.
/// Where the one-shot use should be checked by the compiler,
/// [`into_balance`](Self::into_balance) consumes the layer, and [`Balance::new`] takes the
/// discovery directly.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower::{Layer, ServiceBuilder};
/// use towline::balance::{BalanceConfig, BalanceLayer};
/// use towline::connect::Connect;
/// use towline::discover::Static;
///
/// let stack = ServiceBuilder::new()
///     .layer(BalanceLayer::new(Static::new([]), BalanceConfig::default()));
/// let first = stack.service(Connect::new());
/// let second = stack.service(Connect::new());
/// assert!(first.failure().is_none() && second.failure().is_none());
/// assert!(first.same_balancer(&second));
/// # }
/// ```
///
/// (A layer that started a balancer per `layer` call would need a discovery per balancer, as
/// tower's `MakeBalanceLayer` takes a discovery *factory*; a fed channel has only one.)
pub struct BalanceLayer<D> {
    inner: Mutex<Started<D>>,
}

/// What a [`BalanceLayer`] holds: its discovery until the first `layer`, then the balancer.
#[allow(
    clippy::large_enum_variant,
    reason = "one per layer, built once and never moved on a call path"
)]
enum Started<D> {
    Not(D, BalanceConfig),
    /// The balancer the first `layer` started (a `Balance<S>` for that call's endpoint type).
    Yes(Box<dyn Any + Send + Sync>),
    /// Taken by `into_balance`, or poisoned by a panic while starting.
    Gone,
}

impl<D> BalanceLayer<D> {
    /// Endpoints from `discovery`, chosen and gated as `config` says.
    pub fn new(discovery: D, config: BalanceConfig) -> Self {
        BalanceLayer {
            inner: Mutex::new(Started::Not(discovery, config)),
        }
    }

    /// Starts the balancer over `make`, consuming the layer (or returns the one
    /// [`layer`](Layer::layer) already started). Same as [`Balance::new`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use towline::balance::{BalanceConfig, BalanceLayer};
    /// use towline::connect::Connect;
    /// use towline::discover::Static;
    ///
    /// let layer = BalanceLayer::new(Static::new([]), BalanceConfig::default());
    /// let balance = layer.into_balance(Connect::new());
    /// assert!(balance.failure().is_none());
    /// # }
    /// ```
    pub fn into_balance<M>(self, make: M) -> Balance<M::Endpoint>
    where
        D: Discover,
        M: MakeEndpoint,
    {
        let started = self
            .inner
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        start(started, make).0
    }
}

/// The balancer `started` holds or starts over `make`, and what the layer holds afterwards.
fn start<D, M>(started: Started<D>, make: M) -> (Balance<M::Endpoint>, Started<D>)
where
    D: Discover,
    M: MakeEndpoint,
{
    match started {
        Started::Not(discovery, config) => {
            let balance = Balance::new(discovery, make, config);
            (balance.clone(), Started::Yes(Box::new(balance)))
        }
        Started::Yes(any) => match any.downcast_ref::<Balance<M::Endpoint>>() {
            Some(balance) => (balance.clone(), Started::Yes(any)),
            // Layered again over a `MakeService` of another endpoint type: that handle cannot
            // be this balancer, and its discovery is taken. Said at once by `failure`.
            None => (Balance::failed(OTHER_TYPE), Started::Yes(any)),
        },
        Started::Gone => (Balance::failed(GONE), Started::Gone),
    }
}

const OTHER_TYPE: &str = "this BalanceLayer already started a balancer over another kind of endpoint service; \
     its discovery feeds only that one";
const GONE: &str = "this BalanceLayer's discovery was lost to a panic while its balancer started";

impl<D> fmt::Debug for BalanceLayer<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceLayer").finish_non_exhaustive()
    }
}

impl<D, M> Layer<M> for BalanceLayer<D>
where
    D: Discover,
    M: MakeEndpoint,
{
    type Service = Balance<M::Endpoint>;

    /// Starts the balancer the first time; later calls return handles to the same one (see the
    /// [type docs](BalanceLayer)).
    fn layer(&self, make: M) -> Balance<M::Endpoint> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (balance, started) = start(std::mem::replace(&mut *inner, Started::Gone), make);
        *inner = started;
        balance
    }
}
