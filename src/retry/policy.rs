//! [`RetryPolicy`]: which failures are retried, how often, after how long, within what budget.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

use super::budget::RetryBudget;
use crate::ConfigError;
use crate::backoff::{Backoff, BackoffFields, Jitter};

/// gRFC A6: "maxAttempts … values greater than 5 are treated as 5".
pub const MAX_ATTEMPTS_CAP: u32 = 5;

/// The default cap on the request bytes buffered for replay (linkerd2-proxy's default).
pub const DEFAULT_MAX_REPLAY_BYTES: usize = 64 * 1024;

/// A retry policy: validated, immutable and cheap to clone (clones share one budget).
///
/// Build one with [`RetryPolicy::builder`]. The defaults:
///
/// | setting | default |
/// |---|---|
/// | `max_attempts` | 3 (the first attempt included; values above 5 are capped at 5, as gRFC A6 says) |
/// | `retryable_codes` | `[UNAVAILABLE]` |
/// | `initial_backoff`, `max_backoff`, `backoff_multiplier` | 100 ms, 1 s, 2.0 |
/// | `jitter` | [`Jitter::Grpc`] (gRFC A6: ±20 %) |
/// | `budget` | [`RetryBudget::percent`]`(10 s, 10/s, 0.2)`, Finagle's and tower's defaults |
/// | `max_replay_bytes` | 64 KiB |
/// | `max_transparent_retries` | 2 |
///
/// ```
/// use std::time::Duration;
/// use tonic::Code;
/// use towline::retry::{Jitter, RetryBudget, RetryPolicy};
///
/// let policy = RetryPolicy::builder()
///     .max_attempts(4)
///     .retryable_codes([Code::Unavailable, Code::ResourceExhausted])
///     .initial_backoff(Duration::from_millis(25))
///     .max_backoff(Duration::from_millis(250))
///     .jitter(Jitter::Full)
///     .budget(RetryBudget::token_bucket(10.0, 0.1)?)
///     .build()?;
/// assert_eq!(policy.max_attempts(), 4);
///
/// let err = RetryPolicy::builder().max_attempts(0).build().unwrap_err();
/// assert_eq!(err.field(), "retry_policy.max_attempts");
/// assert!(err.to_string().contains("max_attempts"));
/// # Ok::<(), towline::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct RetryPolicy(Arc<Inner>);

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) max_attempts: u32,
    pub(crate) retryable: CodeSet,
    pub(crate) backoff: Backoff,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) max_replay_bytes: usize,
    pub(crate) max_transparent_retries: u32,
}

impl RetryPolicy {
    /// A builder with the defaults in the table above.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder::default()
    }

    /// Attempts per call, the first included (1 to 5).
    pub fn max_attempts(&self) -> u32 {
        self.0.max_attempts
    }

    /// Whether a failure with this code is retried.
    pub fn is_retryable(&self, code: Code) -> bool {
        self.0.retryable.contains(code)
    }

    /// The backoff between attempts.
    pub fn backoff(&self) -> &Backoff {
        &self.0.backoff
    }

    /// The budget retries draw from, if any.
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.0.budget.as_ref()
    }

    /// The cap on request bytes buffered for replay.
    pub fn max_replay_bytes(&self) -> usize {
        self.0.max_replay_bytes
    }

    /// How many transparent retries (of requests that provably never reached the server) a call
    /// may make, on top of `max_attempts`.
    pub fn max_transparent_retries(&self) -> u32 {
        self.0.max_transparent_retries
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.0
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::builder()
            .build()
            .expect("the default policy is valid")
    }
}

/// Builds a [`RetryPolicy`]; every setting is checked by [`build`](Self::build).
#[derive(Debug, Clone)]
pub struct RetryPolicyBuilder {
    max_attempts: u32,
    retryable: Vec<Code>,
    initial_backoff: Duration,
    max_backoff: Duration,
    multiplier: f64,
    jitter: Jitter,
    budget: BudgetChoice,
    max_replay_bytes: usize,
    max_transparent_retries: u32,
}

#[derive(Debug, Clone)]
enum BudgetChoice {
    Default,
    None,
    Some(RetryBudget),
}

impl Default for RetryPolicyBuilder {
    fn default() -> Self {
        RetryPolicyBuilder {
            max_attempts: 3,
            retryable: vec![Code::Unavailable],
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: Jitter::Grpc,
            budget: BudgetChoice::Default,
            max_replay_bytes: DEFAULT_MAX_REPLAY_BYTES,
            max_transparent_retries: 2,
        }
    }
}

impl RetryPolicyBuilder {
    /// Attempts per call, the first included: at least 1 (1 disables retries); above 5 is capped
    /// at 5 (gRFC A6).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The status codes worth retrying (not empty, not `OK`).
    pub fn retryable_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        self.retryable = codes.into_iter().collect();
        self
    }

    /// The first retry's base delay (> 0).
    pub fn initial_backoff(mut self, initial: Duration) -> Self {
        self.initial_backoff = initial;
        self
    }

    /// The cap on the base delay (> 0, ≥ `initial_backoff`).
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// The growth factor between retries (finite, > 0).
    pub fn backoff_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// The jitter applied to each delay.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The budget retries draw from. Share one budget between policies by passing clones.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = BudgetChoice::Some(budget);
        self
    }

    /// No budget: every failure may be retried up to `max_attempts`. Beware of retry storms.
    pub fn no_budget(mut self) -> Self {
        self.budget = BudgetChoice::None;
        self
    }

    /// The cap on request bytes buffered for replay (> 0). A request whose body grows past it is
    /// sent once and never retried.
    pub fn max_replay_bytes(mut self, max: usize) -> Self {
        self.max_replay_bytes = max;
        self
    }

    /// Transparent retries per call (0 disables them), on top of `max_attempts` and outside the
    /// budget, for failures that prove the request never reached the server.
    pub fn max_transparent_retries(mut self, max: u32) -> Self {
        self.max_transparent_retries = max;
        self
    }

    /// Checks every setting; the error names the first bad one.
    pub fn build(self) -> Result<RetryPolicy, ConfigError> {
        if self.max_attempts < 1 {
            return Err(ConfigError::new(
                "retry_policy.max_attempts",
                "must be at least 1",
            ));
        }
        if self.retryable.is_empty() {
            return Err(ConfigError::new(
                "retry_policy.retryable_codes",
                "must not be empty",
            ));
        }
        if self.retryable.contains(&Code::Ok) {
            return Err(ConfigError::new(
                "retry_policy.retryable_codes",
                "must not contain OK",
            ));
        }
        let backoff = Backoff::validated(
            self.jitter,
            self.initial_backoff,
            self.max_backoff,
            self.multiplier,
            BackoffFields {
                initial: "retry_policy.initial_backoff",
                max: "retry_policy.max_backoff",
                multiplier: "retry_policy.backoff_multiplier",
            },
        )?;
        if self.max_replay_bytes == 0 {
            return Err(ConfigError::new(
                "retry_policy.max_replay_bytes",
                "must be greater than zero",
            ));
        }
        let budget = match self.budget {
            BudgetChoice::Default => Some(
                RetryBudget::percent_builder()
                    .build()
                    .expect("the default budget is valid"),
            ),
            BudgetChoice::None => None,
            BudgetChoice::Some(budget) => Some(budget),
        };
        Ok(RetryPolicy(Arc::new(Inner {
            max_attempts: self.max_attempts.min(MAX_ATTEMPTS_CAP),
            retryable: self.retryable.into_iter().collect(),
            backoff,
            budget,
            max_replay_bytes: self.max_replay_bytes,
            max_transparent_retries: self.max_transparent_retries,
        })))
    }
}

/// A set of gRPC codes as a bit mask: membership is one AND.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CodeSet(u32);

impl CodeSet {
    pub(crate) fn contains(self, code: Code) -> bool {
        let bit = code as i32;
        (0..32).contains(&bit) && self.0 & (1 << bit) != 0
    }
}

impl FromIterator<Code> for CodeSet {
    fn from_iter<I: IntoIterator<Item = Code>>(codes: I) -> Self {
        CodeSet(
            codes
                .into_iter()
                .map(|c| c as i32)
                .filter(|bit| (0..32).contains(bit))
                .fold(0, |set, bit| set | (1 << bit)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_as_documented() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts(), 3);
        assert!(p.is_retryable(Code::Unavailable));
        assert!(!p.is_retryable(Code::Internal));
        assert!(!p.is_retryable(Code::Ok));
        assert_eq!(p.backoff().initial(), Duration::from_millis(100));
        assert_eq!(p.backoff().max(), Duration::from_secs(1));
        assert_eq!(p.backoff().multiplier(), 2.0);
        assert_eq!(p.backoff().jitter(), Jitter::Grpc);
        assert!(p.budget().is_some_and(|b| b.tokens().is_none()));
        assert_eq!(p.max_replay_bytes(), 64 * 1024);
        assert_eq!(p.max_transparent_retries(), 2);
    }

    #[test]
    fn max_attempts_is_capped_at_five() {
        let p = RetryPolicy::builder().max_attempts(9).build().unwrap();
        assert_eq!(p.max_attempts(), 5);
    }

    #[test]
    fn bad_settings_fail_at_build_naming_the_field() {
        let s = Duration::from_secs(1);
        let cases = [
            (RetryPolicy::builder().max_attempts(0), "max_attempts"),
            (
                RetryPolicy::builder().retryable_codes([]),
                "retryable_codes",
            ),
            (
                RetryPolicy::builder().retryable_codes([Code::Ok]),
                "retryable_codes",
            ),
            (
                RetryPolicy::builder().initial_backoff(Duration::ZERO),
                "initial_backoff",
            ),
            (
                RetryPolicy::builder().max_backoff(Duration::ZERO),
                "max_backoff",
            ),
            (
                RetryPolicy::builder().initial_backoff(s * 2).max_backoff(s),
                "max_backoff",
            ),
            (
                RetryPolicy::builder().backoff_multiplier(0.0),
                "backoff_multiplier",
            ),
            (
                RetryPolicy::builder().backoff_multiplier(-2.0),
                "backoff_multiplier",
            ),
            (
                RetryPolicy::builder().max_replay_bytes(0),
                "max_replay_bytes",
            ),
        ];
        for (builder, field) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.field(), format!("retry_policy.{field}"));
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn code_set_holds_exactly_its_codes() {
        let set: CodeSet = [Code::Unavailable, Code::Aborted].into_iter().collect();
        for i in 0..17 {
            let code = Code::from(i);
            assert_eq!(
                set.contains(code),
                matches!(code, Code::Unavailable | Code::Aborted)
            );
        }
    }
}
