//! [`BatchConfig`]: when a batch is flushed and how much may wait, validated when built.

use std::time::Duration;

use tokio::sync::Semaphore;

use crate::ConfigError;

/// When batches are flushed, how many may be in flight, and how many items may wait.
///
/// Built with [`BatchConfig::builder`], which validates every field; [`BatchConfig::default`] is
/// the seed client's flush triggers (100 items, 1 MiB, 100 ms linger) with
/// [`DEFAULT_MAX_IN_FLIGHT`] batches in flight.
///
/// ```
/// use std::time::Duration;
/// use towline::batch::BatchConfig;
///
/// let config = BatchConfig::builder()
///     .max_items(1000)
///     .linger(Duration::from_millis(10))
///     .build()?;
/// assert_eq!(config.max_bytes(), 1 << 20);
/// assert_eq!(config.max_pending_items(), 1000 * 4);
///
/// let err = BatchConfig::builder().max_items(0).build().unwrap_err();
/// assert_eq!(err.field(), "batch.max_items");
/// # Ok::<(), towline::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    max_items: usize,
    max_bytes: usize,
    linger: Duration,
    max_in_flight: usize,
    max_pending_items: usize,
}

/// Default [`BatchConfig::max_items`]: the seed client's 100 records.
pub const DEFAULT_MAX_ITEMS: usize = 100;
/// Default [`BatchConfig::max_bytes`]: the seed client's 1 MiB.
pub const DEFAULT_MAX_BYTES: usize = 1 << 20;
/// Default [`BatchConfig::linger`]: the seed client's 100 ms.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(100);
/// Default [`BatchConfig::max_in_flight`]: 4 batch RPCs at once (towline's choice; Kafka's
/// producer allows 5 per connection).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_items: DEFAULT_MAX_ITEMS,
            max_bytes: DEFAULT_MAX_BYTES,
            linger: DEFAULT_LINGER,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_pending_items: DEFAULT_MAX_ITEMS * DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

impl BatchConfig {
    /// Starts from the defaults.
    pub fn builder() -> BatchConfigBuilder {
        BatchConfigBuilder::default()
    }

    /// A batch is flushed as soon as it holds this many items. Default 100.
    pub fn max_items(&self) -> usize {
        self.max_items
    }

    /// A batch is flushed as soon as its items weigh this many bytes (by [`Batcher::weight`]);
    /// an item that would take a non-empty batch over it starts a new batch instead, and an item
    /// heavier than this on its own is sent alone. Default 1 MiB.
    ///
    /// [`Batcher::weight`]: super::Batcher::weight
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// A batch is flushed at the latest this long after it took its first item. Zero flushes
    /// whatever has queued up each time the worker has nothing more to read. Default 100 ms.
    pub fn linger(&self) -> Duration {
        self.linger
    }

    /// At most this many batch RPCs are in flight at once. Default [`DEFAULT_MAX_IN_FLIGHT`].
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// At most this many items wait, accepted but not yet sent; then `poll_ready` waits
    /// (back-pressure). Together with the batches in flight, at most
    /// `max_pending_items + max_in_flight × max_items` items are held in memory.
    /// Default `max_items × max_in_flight`: while the in-flight batches run, as many again fill.
    pub fn max_pending_items(&self) -> usize {
        self.max_pending_items
    }
}

/// Builds a [`BatchConfig`]; [`build`](Self::build) validates it.
#[derive(Debug, Clone, Default)]
pub struct BatchConfigBuilder {
    max_items: Option<usize>,
    max_bytes: Option<usize>,
    linger: Option<Duration>,
    max_in_flight: Option<usize>,
    max_pending_items: Option<usize>,
}

impl BatchConfigBuilder {
    /// See [`BatchConfig::max_items`]. At least 1.
    pub fn max_items(mut self, n: usize) -> Self {
        self.max_items = Some(n);
        self
    }

    /// See [`BatchConfig::max_bytes`]. At least 1.
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = Some(n);
        self
    }

    /// See [`BatchConfig::linger`]. At most one hour.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = Some(linger);
        self
    }

    /// See [`BatchConfig::max_in_flight`]. At least 1.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = Some(n);
        self
    }

    /// See [`BatchConfig::max_pending_items`]. At least `max_items`, so that a batch can always
    /// fill up to its count trigger.
    pub fn max_pending_items(mut self, n: usize) -> Self {
        self.max_pending_items = Some(n);
        self
    }

    /// Validates the configuration; the error names the first field at fault (`batch.max_items`).
    pub fn build(self) -> Result<BatchConfig, ConfigError> {
        let max_items = self.max_items.unwrap_or(DEFAULT_MAX_ITEMS);
        let max_bytes = self.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
        let linger = self.linger.unwrap_or(DEFAULT_LINGER);
        let max_in_flight = self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        if max_items == 0 {
            return Err(ConfigError::new(
                "batch.max_items",
                "must be at least 1, got 0",
            ));
        }
        if max_bytes == 0 {
            return Err(ConfigError::new(
                "batch.max_bytes",
                "must be at least 1, got 0",
            ));
        }
        if linger > MAX_LINGER {
            return Err(ConfigError::new(
                "batch.linger",
                format!("must be at most {MAX_LINGER:?}, got {linger:?}"),
            ));
        }
        if max_in_flight == 0 {
            return Err(ConfigError::new(
                "batch.max_in_flight",
                "must be at least 1, got 0",
            ));
        }
        let max_pending_items = match self.max_pending_items {
            Some(n) => n,
            None => max_items.saturating_mul(max_in_flight),
        };
        if max_pending_items < max_items {
            return Err(ConfigError::new(
                "batch.max_pending_items",
                format!(
                    "must be at least max_items ({max_items}) so a batch can fill, got {max_pending_items}"
                ),
            ));
        }
        if max_pending_items > Semaphore::MAX_PERMITS {
            return Err(ConfigError::new(
                "batch.max_pending_items",
                format!(
                    "must be at most {}, got {max_pending_items}",
                    Semaphore::MAX_PERMITS
                ),
            ));
        }
        Ok(BatchConfig {
            max_items,
            max_bytes,
            linger,
            max_in_flight,
            max_pending_items,
        })
    }
}

const MAX_LINGER: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds() {
        let config = BatchConfig::builder().build().unwrap();
        assert_eq!(config, BatchConfig::default());
        assert_eq!(config.max_items(), 100);
        assert_eq!(config.max_bytes(), 1024 * 1024);
        assert_eq!(config.linger(), Duration::from_millis(100));
        assert_eq!(config.max_in_flight(), DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(config.max_pending_items(), 100 * DEFAULT_MAX_IN_FLIGHT);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (BatchConfig::builder().max_items(0), "batch.max_items"),
            (BatchConfig::builder().max_bytes(0), "batch.max_bytes"),
            (
                BatchConfig::builder().linger(Duration::from_secs(3601)),
                "batch.linger",
            ),
            (
                BatchConfig::builder().max_in_flight(0),
                "batch.max_in_flight",
            ),
            (
                BatchConfig::builder().max_items(10).max_pending_items(9),
                "batch.max_pending_items",
            ),
            (
                BatchConfig::builder().max_pending_items(usize::MAX),
                "batch.max_pending_items",
            ),
        ];
        for (builder, field) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.field(), field);
            assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
        }
    }

    #[test]
    fn edge_values_are_accepted() {
        let config = BatchConfig::builder()
            .max_items(1)
            .max_bytes(1)
            .linger(Duration::ZERO)
            .max_in_flight(1)
            .max_pending_items(1)
            .build()
            .unwrap();
        assert_eq!(config.max_pending_items(), 1);
        // The pending default follows the fields it is made of.
        let config = BatchConfig::builder()
            .max_items(7)
            .max_in_flight(3)
            .build()
            .unwrap();
        assert_eq!(config.max_pending_items(), 21);
    }
}
