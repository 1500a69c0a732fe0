//! Retry budgets: how many retries the whole client may make, so that retries cannot multiply the
//! load on a backend that is already failing (a retry storm).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::percent::PercentBudget;
use crate::ConfigError;

/// A retry budget shared by every call that uses it. Cheap to clone: clones share one budget.
///
/// Two designs, both with the property that a client whose calls keep failing soon makes few
/// retries:
///
/// - [`token_bucket`](Self::token_bucket): gRFC A6 `retryThrottling`. The bucket starts full
///   (`max_tokens`); every failure with a retryable code takes one token, every success puts back
///   `token_ratio`; no retry while the tokens are at or below half of `max_tokens`. An outage is
///   throttled after `max_tokens / 2` failures, however much healthy traffic came before.
/// - [`percent`](Self::percent): the Finagle design (tower's `TpsBudget`, lock-free): each call
///   deposits, each retry withdraws; retries may be at most `ratio` of the calls made in the last
///   `ttl`, plus `min_per_sec` retries per second so that a quiet client can still retry. The
///   deposits of the healthy calls before an outage stay for `ttl`: at 10,000 calls/s, a
///   `ratio` of 0.2 and a 10 s `ttl`, up to 20,000 retries go out in an outage's first seconds.
///   Pick the token bucket when short, total outages must not be amplified at all.
///
/// When the budget is spent, the failure that would have been retried is returned at once.
///
/// What counts (gRFC A6, as grpc-go and grpc-core agree): a "failure" is an attempt that ends
/// with a code the policy retries, whether it fails before the call commits or after (a call
/// committed by its response headers whose trailers then carry a retryable code), and any
/// response whose `grpc-retry-pushback-ms` tells the client not to retry (negative, malformed or
/// given more than once), whatever its code; a "success" is a call that ends `OK` (read from its
/// trailers, as the response body goes by). A call whose body is dropped before its trailers,
/// or that ends with a code the policy does not retry, is neither. Transparent retries never
/// touch a budget, nor do calls whose policy makes a single attempt (or that carry
/// [`NoRetry`](super::NoRetry)).
///
/// ```
/// use std::time::Duration;
/// use towline::retry::RetryBudget;
///
/// let a6 = RetryBudget::token_bucket(10.0, 0.1)?;
/// let finagle = RetryBudget::percent(Duration::from_secs(10), 10, 0.2)?;
/// assert!(RetryBudget::token_bucket(0.0, 0.1).unwrap_err().to_string().contains("max_tokens"));
/// # let _ = (a6, finagle);
/// # Ok::<(), towline::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget(Arc<Kind>);

enum Kind {
    TokenBucket(TokenBucket),
    Percent(PercentBudget),
}

impl RetryBudget {
    /// gRFC A6 `retryThrottling`: `max_tokens` in (0, 1000], `token_ratio` > 0 and finite, with
    /// at most three decimals' precision (finer ratios round to the nearest thousandth, which must
    /// not be 0). A ratio above `max_tokens` (A6 sets no upper bound) fills the bucket on one
    /// success, exactly as `max_tokens` itself would, so it is used as `max_tokens`.
    pub fn token_bucket(max_tokens: f64, token_ratio: f64) -> Result<Self, ConfigError> {
        if !(max_tokens > 0.0 && max_tokens <= 1000.0) {
            return Err(ConfigError::new(
                "retry_budget.max_tokens",
                "must be greater than 0 and at most 1000",
            ));
        }
        if !(token_ratio.is_finite() && (token_ratio * 1000.0).round() >= 1.0) {
            return Err(ConfigError::new(
                "retry_budget.token_ratio",
                "must be at least 0.001 and finite",
            ));
        }
        // Thousandths of a token in integers, as grpc-java does: lock-free and exact. Both are
        // at most 1,000,000 here, so the casts are exact.
        let max = (max_tokens * 1000.0).round() as u32;
        let ratio = (token_ratio.min(max_tokens) * 1000.0).round() as u32;
        Ok(RetryBudget(Arc::new(Kind::TokenBucket(TokenBucket {
            tokens: AtomicU32::new(max),
            max,
            ratio,
        }))))
    }

    /// The Finagle percentage budget (tower's `TpsBudget`, without its lock): retries may be
    /// `ratio` (0.0 to 10.0) of the calls made in the last `ttl` (1 to 60 s), plus `min_per_sec`
    /// retries per second. Finagle's and tower's defaults are 10 s, 10 per second and 0.2.
    pub fn percent(ttl: Duration, min_per_sec: u32, ratio: f64) -> Result<Self, ConfigError> {
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "retry_budget.ttl",
                "must be between 1 and 60 seconds",
            ));
        }
        if min_per_sec >= i32::MAX as u32 {
            return Err(ConfigError::new("retry_budget.min_per_sec", "is too large"));
        }
        if !(ratio.is_finite() && (0.0..=10.0).contains(&ratio)) {
            return Err(ConfigError::new(
                "retry_budget.ratio",
                "must be between 0.0 and 10.0",
            ));
        }
        let budget = PercentBudget::new(ttl, min_per_sec, ratio);
        Ok(RetryBudget(Arc::new(Kind::Percent(budget))))
    }

    /// A builder for [`percent`](Self::percent) that starts from Finagle's and tower's defaults
    /// (10 s, 10 per second, 0.2), so that one setting can be changed alone:
    ///
    /// ```
    /// use towline::retry::RetryBudget;
    ///
    /// let budget = RetryBudget::percent_builder().ratio(0.1).build()?;
    /// let err = RetryBudget::percent_builder().ratio(11.0).build().unwrap_err();
    /// assert_eq!(err.field(), "retry_budget.ratio");
    /// # let _ = budget;
    /// # Ok::<(), towline::ConfigError>(())
    /// ```
    pub fn percent_builder() -> PercentBuilder {
        PercentBuilder {
            ttl: Duration::from_secs(10),
            min_per_sec: 10,
            ratio: 0.2,
        }
    }

    /// A new logical call starts (its first attempt).
    pub(crate) fn on_call(&self) {
        if let Kind::Percent(budget) = &*self.0 {
            budget.deposit();
        }
    }

    /// Whether successes and failures change the budget (the token bucket), so that a committed
    /// call's trailers are worth reading for it.
    pub(crate) fn counts_outcomes(&self) -> bool {
        matches!(&*self.0, Kind::TokenBucket(_))
    }

    /// A call ended `OK`.
    pub(crate) fn on_success(&self) {
        if let Kind::TokenBucket(bucket) = &*self.0 {
            bucket.add(bucket.ratio);
        }
    }

    /// An attempt failed with a retryable code, or the server asked not to be retried (counted
    /// whether or not a retry follows).
    pub(crate) fn on_failure(&self) {
        if let Kind::TokenBucket(bucket) = &*self.0 {
            bucket.take(1000);
        }
    }

    /// May a retry be made now? Withdraws from a percentage budget when it says yes.
    pub(crate) fn try_retry(&self) -> bool {
        match &*self.0 {
            Kind::TokenBucket(bucket) => bucket.tokens.load(Ordering::Relaxed) > bucket.max / 2,
            Kind::Percent(budget) => budget.withdraw(),
        }
    }

    /// The A6 bucket's current tokens; `None` for a percentage budget.
    pub fn tokens(&self) -> Option<f64> {
        match &*self.0 {
            Kind::TokenBucket(bucket) => {
                Some(f64::from(bucket.tokens.load(Ordering::Relaxed)) / 1000.0)
            }
            Kind::Percent(_) => None,
        }
    }
}

/// Builds a [`RetryBudget::percent`]; [`build`](Self::build) checks every setting and names the
/// first bad one.
#[derive(Debug, Clone)]
pub struct PercentBuilder {
    ttl: Duration,
    min_per_sec: u32,
    ratio: f64,
}

impl PercentBuilder {
    /// How long a call's deposit counts (1 to 60 s; default 10 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Retries per second allowed whatever the traffic (default 10).
    pub fn min_per_sec(mut self, min_per_sec: u32) -> Self {
        self.min_per_sec = min_per_sec;
        self
    }

    /// Retries per call (0.0 to 10.0; default 0.2).
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// The budget, or the first bad setting.
    pub fn build(self) -> Result<RetryBudget, ConfigError> {
        RetryBudget::percent(self.ttl, self.min_per_sec, self.ratio)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            Kind::TokenBucket(bucket) => f
                .debug_struct("RetryBudget::TokenBucket")
                .field("tokens", &bucket.tokens)
                .field("max_milli_tokens", &bucket.max)
                .field("milli_ratio", &bucket.ratio)
                .finish(),
            Kind::Percent(budget) => f.debug_tuple("RetryBudget::Percent").field(budget).finish(),
        }
    }
}

/// gRFC A6's bucket in thousandths of a token.
struct TokenBucket {
    tokens: AtomicU32,
    max: u32,
    ratio: u32,
}

impl TokenBucket {
    fn add(&self, amount: u32) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(amount).min(self.max))
            });
    }

    fn take(&self, amount: u32) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(amount))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_stops_retries_at_half_and_refills_by_the_ratio() {
        let budget = RetryBudget::token_bucket(10.0, 0.5).unwrap();
        assert_eq!(budget.tokens(), Some(10.0));
        for _ in 0..4 {
            budget.on_failure();
            assert!(budget.try_retry());
        }
        budget.on_failure(); // 5 tokens: at half, no more retries
        assert_eq!(budget.tokens(), Some(5.0));
        assert!(!budget.try_retry());
        budget.on_success(); // 5.5
        assert!(budget.try_retry());
        for _ in 0..100 {
            budget.on_success();
        }
        assert_eq!(budget.tokens(), Some(10.0), "never above max_tokens");
        for _ in 0..100 {
            budget.on_failure();
        }
        assert_eq!(budget.tokens(), Some(0.0), "never below zero");
    }

    #[test]
    fn a_huge_token_ratio_refills_the_bucket_in_one_success() {
        for ratio in [10.0, 1e10, 1e300, f64::MAX] {
            let budget = RetryBudget::token_bucket(10.0, ratio).unwrap();
            for _ in 0..10 {
                budget.on_failure();
            }
            assert_eq!(budget.tokens(), Some(0.0));
            budget.on_success();
            assert_eq!(budget.tokens(), Some(10.0), "{ratio}");
        }
    }

    #[test]
    fn percent_budget_allows_its_ratio_of_calls() {
        let budget = RetryBudget::percent(Duration::from_secs(1), 0, 0.1).unwrap();
        for _ in 0..100 {
            budget.on_call();
        }
        let allowed = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(allowed, 10);
    }

    /// Many threads at once: every token-bucket update lands, and a percentage budget grants
    /// exactly the retries its deposits pay for, never one more.
    #[test]
    fn concurrent_accounting_is_exact() {
        const THREADS: usize = 8;
        let bucket = RetryBudget::token_bucket(1000.0, 0.5).unwrap();
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    for _ in 0..100 {
                        bucket.on_failure();
                        bucket.on_success();
                    }
                });
            }
        });
        // 800 failures (-800) and 800 successes (+400), never clamped at either end.
        assert_eq!(bucket.tokens(), Some(600.0));

        let percent = RetryBudget::percent(Duration::from_secs(60), 0, 0.1).unwrap();
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| (0..1000).for_each(|_| percent.on_call()));
            }
        });
        let granted = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    let mine = (0..200).filter(|_| percent.try_retry()).count() as u32;
                    granted.fetch_add(mine, Ordering::Relaxed);
                });
            }
        });
        assert_eq!(granted.into_inner(), 800, "10% of 8,000 calls");
    }

    #[test]
    fn bad_budgets_name_their_field() {
        let s = Duration::from_secs(1);
        let cases = [
            (RetryBudget::token_bucket(0.0, 0.1), "max_tokens"),
            (RetryBudget::token_bucket(1001.0, 0.1), "max_tokens"),
            (RetryBudget::token_bucket(f64::NAN, 0.1), "max_tokens"),
            (RetryBudget::token_bucket(10.0, 0.0), "token_ratio"),
            (RetryBudget::token_bucket(10.0, -1.0), "token_ratio"),
            (RetryBudget::token_bucket(10.0, 0.0001), "token_ratio"),
            (
                RetryBudget::token_bucket(10.0, f64::INFINITY),
                "token_ratio",
            ),
            (RetryBudget::token_bucket(10.0, f64::NAN), "token_ratio"),
            (RetryBudget::token_bucket(1e300, 0.1), "max_tokens"),
            (RetryBudget::percent(s / 2, 10, 0.2), "ttl"),
            (RetryBudget::percent(s * 61, 10, 0.2), "ttl"),
            (RetryBudget::percent(s, u32::MAX, 0.2), "min_per_sec"),
            (RetryBudget::percent(s, 10, -0.1), "ratio"),
            (RetryBudget::percent(s, 10, f64::NAN), "ratio"),
        ];
        for (result, field) in cases {
            let err = result.unwrap_err();
            assert_eq!(err.field(), format!("retry_budget.{field}"), "{err}");
        }
    }
}
