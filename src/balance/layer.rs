//! [`BalanceLayer`]: the `tower::Layer` that starts a [`Balance`] over a `MakeService`.

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
/// **One balancer per layer.** A discovery is a stream with one consumer, so a `BalanceLayer`
/// makes one [`Balance`]: the first [`layer`](Layer::layer) call takes the discovery, and every
/// later one has nothing to balance over. Such a balancer is built failed, and says so at once:
/// an error is logged (`tracing::error!`), [`Balance::failure`] returns the reason, and every call
/// fails with `UNAVAILABLE` and that reason. To share one balancer among clients, layer once and
/// clone the [`Balance`] (clones share its endpoints). Where a one-shot use should be checked by
/// the compiler, [`into_balance`](Self::into_balance) consumes the layer, and [`Balance::new`]
/// takes the discovery directly.
///
/// (A `Clone` layer that cloned its discovery for each balancer would give each its own stream
/// only for discoveries that can be copied; a fed channel cannot, and towline would have to
/// start a discovery per balancer rather than share one, as tower's `MakeBalanceLayer` does with
/// a discovery *factory*. The one-shot layer keeps `ServiceBuilder` stacks working for any
/// discovery.)
pub struct BalanceLayer<D> {
    inner: Mutex<Option<(D, BalanceConfig)>>,
}

impl<D> BalanceLayer<D> {
    /// Endpoints from `discovery`, chosen and gated as `config` says.
    pub fn new(discovery: D, config: BalanceConfig) -> Self {
        BalanceLayer {
            inner: Mutex::new(Some((discovery, config))),
        }
    }

    /// Starts the balancer over `make`, consuming the layer: the one-shot use
    /// [`layer`](Layer::layer) allows, checked by the compiler. Same as [`Balance::new`].
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
        match self
            .inner
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some((discovery, config)) => Balance::new(discovery, make, config),
            // Only `layer` takes the discovery, and it borrows the layer: unreachable from an
            // owned one, but a failed balancer rather than a panic all the same.
            None => Balance::failed(ALREADY_LAYERED),
        }
    }
}

const ALREADY_LAYERED: &str =
    "this BalanceLayer was already layered once; its discovery feeds only the first balancer";

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

    /// Starts the balancer. A `BalanceLayer` owns its discovery stream, so it makes one balancer:
    /// layering it a second time gives a failed balancer, logged as an error at once, whose
    /// [`failure`](Balance::failure) and calls say why (see the [type docs](BalanceLayer)).
    fn layer(&self, make: M) -> Balance<M::Endpoint> {
        let taken = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match taken {
            Some((discovery, config)) => Balance::new(discovery, make, config),
            None => Balance::failed(ALREADY_LAYERED),
        }
    }
}
