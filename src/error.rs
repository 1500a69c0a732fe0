//! Errors shared by every layer's configuration.

use std::borrow::Cow;
use std::fmt;

/// A configuration value that cannot work, found when the configuration is built (never on a
/// call). Names the field, as a path (`outlier_detection.interval`), and what is wrong with it.
///
/// ```
/// let err = towline::ConfigError::new("pool.max_connections", "must be greater than zero");
/// assert_eq!(err.to_string(), "pool.max_connections: must be greater than zero");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: Cow<'static, str>,
    problem: Cow<'static, str>,
}

impl ConfigError {
    /// An error about `field`.
    pub fn new(field: impl Into<Cow<'static, str>>, problem: impl Into<Cow<'static, str>>) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The path of the offending field.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for ConfigError {}
