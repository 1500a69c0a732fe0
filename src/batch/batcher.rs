//! [`Batcher`]: how items become one batch request, and its response per-item results again.

use std::hash::Hash;

use tonic::Status;

/// Says how items merge into one batch request and how the batch response splits back into one
/// result per item. You implement it for your RPC; [`Batch`](super::Batch) does the rest.
///
/// All of its methods run on the batch worker. A panic in any of them is caught: a panic in
/// [`key`](Self::key) or [`weight`](Self::weight) fails that one item, a panic in
/// [`merge`](Self::merge) or [`split`](Self::split) fails every item of that batch, each with an
/// `INTERNAL` status saying so; the worker carries on with the next batch.
///
/// ```
/// use tonic::{Code, Status};
/// use towline::batch::Batcher;
/// use towline::testkit::pb::{ProduceRequest, ProduceResponse};
///
/// /// Records (`(topic, bytes)`) into one `Produce` call per topic; each record's offset back.
/// #[derive(Clone)]
/// struct Records;
///
/// impl Batcher for Records {
///     type Item = (String, bytes::Bytes);
///     type Key = String;
///     type Request = ProduceRequest;
///     type Response = tonic::Response<ProduceResponse>;
///     type Output = u64;
///
///     fn key(&mut self, (topic, _): &Self::Item) -> String {
///         topic.clone()
///     }
///     fn weight(&mut self, (_, record): &Self::Item) -> usize {
///         record.len()
///     }
///     fn merge(&mut self, key: &String, items: Vec<Self::Item>) -> ProduceRequest {
///         let records = items.into_iter().map(|(_, record)| record).collect();
///         ProduceRequest { key: key.clone(), records }
///     }
///     fn split(&mut self, _: &String, _: usize, res: Self::Response) -> Vec<Result<u64, Status>> {
///         let results = res.into_inner().results;
///         results
///             .into_iter()
///             .map(|r| match Code::from_i32(r.code) {
///                 Code::Ok => Ok(r.offset),
///                 code => Err(Status::new(code, r.message)),
///             })
///             .collect()
///     }
/// }
/// ```
pub trait Batcher: Send + 'static {
    /// What one caller sends.
    type Item: Send + 'static;
    /// Items of different keys never share a batch (a topic and partition, say). Use `()` when
    /// every item may go with every other.
    type Key: Clone + Eq + Hash + Send + 'static;
    /// The batch request the inner service takes.
    type Request: Send + 'static;
    /// The inner service's response to a batch request.
    type Response: Send + 'static;
    /// What one caller gets back on success.
    type Output: Send + 'static;

    /// The batching key of an item.
    fn key(&mut self, item: &Self::Item) -> Self::Key;

    /// How many bytes an item weighs towards [`BatchConfig::max_bytes`](super::BatchConfig::max_bytes).
    fn weight(&mut self, item: &Self::Item) -> usize;

    /// Merges the items of one batch, all of key `key`, in the order they were called, into one
    /// request.
    fn merge(&mut self, key: &Self::Key, items: Vec<Self::Item>) -> Self::Request;

    /// Splits the response to a batch of `items` items into one result per item, in the order
    /// [`merge`](Self::merge) got them. A result may be an error while others succeed. Too few
    /// results fail the items left over with `INTERNAL`; results beyond the items are dropped.
    fn split(
        &mut self,
        key: &Self::Key,
        items: usize,
        response: Self::Response,
    ) -> Vec<Result<Self::Output, Status>>;
}
