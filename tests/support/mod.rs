//! Test helpers shared by the integration tests that need them (`mod support;`).

use std::future::Future;
use std::pin::Pin;

use towline::balance::{Balance, EndpointService, EndpointSnapshot};

/// A condition on the balancer's endpoints, to wait for.
pub type Condition<'a> = Box<dyn FnMut(&[EndpointSnapshot]) -> bool + Send + 'a>;

/// What the tests need of a `Balance<S>`, whatever its `S`: one type for stacks whose endpoint
/// services differ (a `Channel`, a pool).
pub trait BalanceView: Send + Sync {
    fn snapshot(&self) -> Vec<EndpointSnapshot>;
    fn wait_until<'a>(
        &'a self,
        done: Condition<'a>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

impl<S: EndpointService> BalanceView for Balance<S> {
    fn snapshot(&self) -> Vec<EndpointSnapshot> {
        Balance::snapshot(self)
    }

    fn wait_until<'a>(
        &'a self,
        done: Condition<'a>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(Balance::wait_until(self, done))
    }
}
