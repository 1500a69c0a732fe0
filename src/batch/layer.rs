//! [`BatchLayer`]: wraps a batch RPC service in a [`Batch`].

use std::fmt;

use tower_layer::Layer;
use tower_service::Service;

use super::{Batch, BatchConfig, Batcher};
use crate::BoxError;

/// Wraps a `Service<B::Request>` (the batch RPC) in a [`Batch`]: a `Service<B::Item>` whose
/// calls are merged into batches by `B` and flushed as [`BatchConfig`] says.
///
/// Each [`layer`](Layer::layer) call spawns one worker on the current tokio runtime (so it must
/// be called within one), like `tower::buffer::BufferLayer`.
#[derive(Clone)]
pub struct BatchLayer<B> {
    batcher: B,
    config: BatchConfig,
}

impl<B> BatchLayer<B> {
    /// Batches with `batcher` as `config` says.
    pub fn new(batcher: B, config: BatchConfig) -> Self {
        BatchLayer { batcher, config }
    }
}

impl<B> fmt::Debug for BatchLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchLayer")
            .field("batcher", &std::any::type_name::<B>())
            .field("config", &self.config)
            .finish()
    }
}

impl<S, B> Layer<S> for BatchLayer<B>
where
    B: Batcher + Clone,
    S: Service<B::Request, Response = B::Response> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Service = Batch<B::Item, B::Output>;

    fn layer(&self, inner: S) -> Self::Service {
        Batch::new(inner, self.batcher.clone(), self.config.clone())
    }
}
