//! Batching: many small `Service<Item>` calls into one batch RPC, flushed on count, bytes or
//! linger time, with every item answered on its own.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::time::Duration;
//! use tonic::{Code, Status};
//! use tower::{Layer, Service, ServiceExt};
//! use towline::batch::{BatchConfig, BatchLayer, Batcher};
//! use towline::testkit::Backend;
//! use towline::testkit::pb::{log_client::LogClient, ProduceRequest, ProduceResponse};
//!
//! /// One record per call; records of a topic go out together, each gets its own offset back.
//! #[derive(Clone)]
//! struct Records;
//!
//! impl Batcher for Records {
//!     type Item = (&'static str, bytes::Bytes); // (topic, record)
//!     type Key = &'static str;
//!     type Request = ProduceRequest;
//!     type Response = tonic::Response<ProduceResponse>;
//!     type Output = u64;
//!
//!     fn key(&mut self, item: &Self::Item) -> &'static str { item.0 }
//!     fn weight(&mut self, item: &Self::Item) -> usize { item.1.len() }
//!     fn merge(&mut self, topic: &&'static str, items: Vec<Self::Item>) -> ProduceRequest {
//!         let records = items.into_iter().map(|(_, record)| record).collect();
//!         ProduceRequest { key: topic.to_string(), records }
//!     }
//!     fn split(&mut self, _: &&'static str, _: usize, res: Self::Response) -> Vec<Result<u64, Status>> {
//!         let results = res.into_inner().results.into_iter();
//!         results.map(|r| match Code::from_i32(r.code) {
//!             Code::Ok => Ok(r.offset),
//!             code => Err(Status::new(code, r.message)),
//!         }).collect()
//!     }
//! }
//!
//! let backend = Backend::start().await?;
//! let client = LogClient::new(tonic::transport::Endpoint::from(backend.uri()).connect_lazy());
//! // The batch RPC: any `Service<ProduceRequest>`, here a closure over the tonic client.
//! let produce = tower::service_fn(move |req: ProduceRequest| {
//!     let mut client = client.clone();
//!     async move { client.produce(req).await }
//! });
//! let config = BatchConfig::builder().max_items(3).linger(Duration::from_millis(5)).build()?;
//! let batch = BatchLayer::new(Records, config).layer(produce);
//!
//! let calls = ["a", "b", "c"].map(|r| batch.clone().oneshot(("topic", r.into())));
//! let offsets = futures::future::try_join_all(calls).await?;
//! assert_eq!(offsets, [0, 1, 2]);          // one Produce call of three records
//! assert_eq!(backend.calls(), 1);
//!
//! // An empty record is rejected by the server on its own, its batch mates are not.
//! let (bad, good) = tokio::join!(
//!     batch.clone().oneshot(("topic", "".into())),
//!     batch.clone().oneshot(("topic", "d".into())),
//! );
//! assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);
//! assert_eq!(good?, 3);
//! # Ok(()) }
//! ```
//!
//! ## How it works
//! [`Batch`] is a cheap, cloneable handle to one worker task (spawned like `tower::buffer`'s). The
//! worker keeps one open batch per [`Batcher::Key`] (items of different keys never share a
//! batch) and flushes it when the first of these happens:
//!
//! | trigger | default | `reason` label |
//! |---|---|---|
//! | it holds [`max_items`](BatchConfig::max_items) items | 100 | `count` |
//! | its items weigh [`max_bytes`](BatchConfig::max_bytes) (by [`Batcher::weight`]) | 1 MiB | `bytes` |
//! | [`linger`](BatchConfig::linger) has passed since its first item | 100 ms | `linger` |
//! | [`Batch::flush`] is called | | `flush` |
//! | every handle has been dropped | | `shutdown` |
//! | no room is left for another item, and no flushed batch waits (see below) | | `full` |
//!
//! The defaults are the seed client's. A flushed batch is merged with [`Batcher::merge`] and sent
//! as soon as fewer than [`max_in_flight`](BatchConfig::max_in_flight) batch RPCs are in flight;
//! its response is split with [`Batcher::split`], one result per caller. Batches may complete
//! out of order when more than one is in flight: set `max_in_flight(1)` to keep a key's order.
//!
//! ## Back-pressure
//! `poll_ready` reserves room for one item among [`max_pending_items`](BatchConfig::max_pending_items)
//! (items accepted but not yet sent); the room is given back when the item's batch is sent. When
//! `max_in_flight` batches are in flight and the pending room is used up, `poll_ready` waits, so
//! at most `max_pending_items + max_in_flight × max_items` items are ever held. When the room is
//! used up by batches still filling (none flushed and waiting for a slot), they are all flushed at
//! once (reason `full`), so callers never wait a linger time on batches that cannot fill (many
//! keys, say).
//!
//! ## Nothing is lost
//! - If the batch RPC fails, every caller in the batch gets the error as a [`tonic::Status`]
//!   ([`status_from_error`](crate::status::status_from_error)). A per-item error from
//!   [`Batcher::split`] reaches that one caller.
//! - A caller that drops its [`ResponseFuture`] after `call` does **not** take its item back: the
//!   item is still sent with its batch and only its result is discarded. An item is never sent
//!   half-way, and never removed from a batch once merged. (Dropping a handle that was readied
//!   but not called gives its reserved room back.)
//! - When the last handle is dropped, the worker flushes every open batch, waits for every batch
//!   in flight, answers every caller and then ends.
//! - A panic in the [`Batcher`] (or in the inner service) is caught: it fails that item
//!   (`key`, `weight`) or that batch (`merge`, `split`) with `INTERNAL`, saying what panicked, and
//!   the worker carries on.
//! - If the inner service's `poll_ready` fails, the worker fails every item not yet sent with that
//!   error, lets the batches in flight finish, and stops; so does a worker that is dropped (its
//!   runtime shut down, say) with `UNAVAILABLE`. Either way every later `poll_ready` and `call`
//!   fails at once with the reason; nothing waits forever.
//!
//! ## Retries
//! The inner service is any `Service<Batcher::Request>`: put a retry layer around it (`tower::retry`
//! on the typed service, or towline's [`RetryLayer`](crate::retry::RetryLayer) under the tonic
//! client the inner service calls) to retry a failed batch as a whole. Callers see only the final
//! outcome. `RetryLayer` replays a request only up to its `max_replay_bytes` (64 KiB by default):
//! raise it to at least [`max_bytes`](BatchConfig::max_bytes) plus framing, or large batches are
//! sent once and never retried.
//!
//! ## Metrics
//! Through the [`metrics`] facade, with handles registered once per worker when it is created:
//! `towline.batch.size` (histogram, items per batch sent), `towline.batch.bytes` (histogram,
//! weight per batch sent), `towline.batch.flushes` (counter, label `reason` as in the table) and
//! `towline.batch.items.failed` (counter, items answered with an error).

mod batcher;
mod config;
mod future;
mod layer;
mod service;
mod worker;

pub use batcher::Batcher;
pub use config::{
    BatchConfig, BatchConfigBuilder, DEFAULT_LINGER, DEFAULT_MAX_BYTES, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_ITEMS,
};
pub use future::ResponseFuture;
pub use layer::BatchLayer;
pub use service::Batch;
pub use worker::Worker;
