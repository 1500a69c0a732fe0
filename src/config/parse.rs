//! JSON → the validated model, walking a `serde_json::Value` so that every error names the JSON
//! path of the field it is about (serde's derive would only give a line and column).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Map, Value};
use tonic::Code;

use super::{
    HealthCheckConfig, HedgingPolicyConfig, LbPolicy, MethodConfig, MethodName, RetryPolicyConfig,
    RetryThrottling, RingHashConfig, ServiceConfig, WeightedRoundRobinConfig,
};
use crate::ConfigError;
use crate::outlier::{FailurePercentageEjection, OutlierDetection, SuccessRateEjection};

type Result<T> = std::result::Result<T, ConfigError>;

/// gRFC A42: ring sizes are capped at 8M.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// The largest proto `Duration` (10,000 years).
const MAX_DURATION_SECS: u64 = 315_576_000_000;

/// The longest value from the config an error echoes, in characters.
const MAX_ECHOED_CHARS: usize = 64;
/// The longest path an error names, and the longest problem it states, in characters: a config
/// is input, and an error about a multi-megabyte field must not repeat it into every log line.
const MAX_PATH_CHARS: usize = 160;
const MAX_PROBLEM_CHARS: usize = 200;

fn err(path: &str, problem: impl Into<String>) -> ConfigError {
    let problem = problem.into();
    let problem = if problem.chars().count() > MAX_PROBLEM_CHARS {
        truncated(&problem, MAX_PROBLEM_CHARS)
    } else {
        problem
    };
    ConfigError::new(truncated(path, MAX_PATH_CHARS), problem)
}

/// `s` cut to at most `max` characters, with an ellipsis when it was cut.
fn truncated(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

/// A value from the config, quoted as an error echoes it: at most [`MAX_ECHOED_CHARS`].
fn echo(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHOED_CHARS) {
        None => format!("{s:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &s[..end], s.len()),
    }
}

fn key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// A field of an object; proto JSON reads `null` as "not set".
fn field<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name).filter(|v| !v.is_null())
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| err(path, "must be an object"))
}

fn array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>> {
    v.as_array().ok_or_else(|| err(path, "must be a list"))
}

fn string<'a>(v: &'a Value, path: &str) -> Result<&'a str> {
    v.as_str().ok_or_else(|| err(path, "must be a string"))
}

fn boolean(v: &Value, path: &str) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| err(path, "must be true or false"))
}

/// A proto JSON integer: a JSON number with no fraction, or the same as a decimal string.
fn uint(v: &Value, path: &str, max: u64) -> Result<u64> {
    let n = match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n <= max => Ok(n),
        Some(_) => Err(err(path, format!("must be at most {max}"))),
        None => Err(err(path, "must be a non-negative integer")),
    }
}

fn number(v: &Value, path: &str) -> Result<f64> {
    v.as_f64()
        .filter(|f| f.is_finite())
        .ok_or_else(|| err(path, "must be a number"))
}

/// A proto JSON `google.protobuf.Duration`: decimal seconds with up to 9 fractional digits and a
/// trailing `s` (`"1.5s"`, `"0.000001s"`). Negative durations are refused: no field here takes one.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let body = s.strip_suffix('s')?;
    let (secs, frac) = match body.split_once('.') {
        Some((secs, frac)) => (secs, frac),
        None => (body, ""),
    };
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) || body.ends_with('.') {
        return None;
    }
    let secs: u64 = secs.parse().ok().filter(|&s| s <= MAX_DURATION_SECS)?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(Duration::new(secs, nanos))
}

fn duration(v: &Value, path: &str) -> Result<Duration> {
    let s = v
        .as_str()
        .ok_or_else(|| err(path, "must be a duration string such as \"1.5s\""))?;
    parse_duration(s).ok_or_else(|| {
        err(
            path,
            format!(
                "{} is not a non-negative duration of at most {MAX_DURATION_SECS} seconds, such as \"1.5s\"",
                echo(s)
            ),
        )
    })
}

fn positive_duration(v: &Value, path: &str) -> Result<Duration> {
    let d = duration(v, path)?;
    if d.is_zero() {
        return Err(err(path, "must be greater than zero"));
    }
    Ok(d)
}

const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A status code by its name (`"UNAVAILABLE"`) or number (`14`).
fn code(v: &Value, path: &str) -> Result<Code> {
    let n = match v {
        Value::String(s) => CODE_NAMES
            .iter()
            .position(|name| name == s)
            .ok_or_else(|| err(path, format!("{} is not a gRPC status code name", echo(s))))?,
        Value::Number(n) => n
            .as_u64()
            .filter(|&n| n < 17)
            .ok_or_else(|| err(path, format!("{n} is not a gRPC status code (0 to 16)")))?
            as usize,
        _ => return Err(err(path, "must be a status code name or number")),
    };
    Ok(Code::from(n as i32))
}

fn codes(v: &Value, path: &str) -> Result<Vec<Code>> {
    let list = array(v, path)?;
    let mut out = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let p = index(path, i);
        let c = code(c, &p)?;
        if c == Code::Ok {
            return Err(err(&p, "OK is not a failure"));
        }
        out.push(c);
    }
    Ok(out)
}

/// `maxAttempts`: > 1, values above 5 are treated as 5 (gRFC A6), with no error.
fn max_attempts(map: &Map<String, Value>, path: &str) -> Result<u32> {
    let p = key(path, "maxAttempts");
    let v = field(map, "maxAttempts").ok_or_else(|| err(&p, "is required"))?;
    let n = uint(v, &p, u64::from(u32::MAX))?;
    if n <= 1 {
        return Err(err(&p, "must be > 1"));
    }
    Ok(n.min(u64::from(crate::retry::MAX_ATTEMPTS_CAP)) as u32)
}

pub(crate) fn service_config(json: &str) -> Result<ServiceConfig> {
    let root: Value =
        serde_json::from_str(json).map_err(|e| err("$", format!("not valid JSON: {e}")))?;
    let root = object(&root, "$")?;

    let mut method_configs = Vec::new();
    if let Some(v) = field(root, "methodConfig") {
        let mut seen = HashSet::new();
        for (i, mc) in array(v, "methodConfig")?.iter().enumerate() {
            method_configs.push(method_config(mc, &index("methodConfig", i), &mut seen)?);
        }
    }

    let retry_throttling = field(root, "retryThrottling")
        .map(|v| retry_throttling(v, "retryThrottling"))
        .transpose()?;

    let load_balancing = if let Some(v) = field(root, "loadBalancingConfig") {
        Some(lb_config_list(v, "loadBalancingConfig", true)?)
    } else if let Some(v) = field(root, "loadBalancingPolicy") {
        let p = "loadBalancingPolicy";
        // The deprecated field: a policy name with its default config (case-insensitive, as
        // grpc-go reads it).
        let name = string(v, p)?.to_ascii_lowercase();
        if name == "outlier_detection" || name == "outlier_detection_experimental" {
            return Err(err(
                p,
                "outlier_detection needs loadBalancingConfig (a child policy)",
            ));
        }
        Some(
            lb_policy(&name, &Value::Object(Map::new()), p, false)?.ok_or_else(|| {
                err(
                    p,
                    format!("{} is not a policy towline supports", echo(&name)),
                )
            })?,
        )
    } else {
        None
    };

    let health_check = field(root, "healthCheckConfig")
        .map(|v| {
            let p = "healthCheckConfig";
            let map = object(v, p)?;
            let service_name = match field(map, "serviceName") {
                Some(v) => string(v, &key(p, "serviceName"))?.to_owned(),
                None => String::new(),
            };
            Ok(HealthCheckConfig { service_name })
        })
        .transpose()?;

    let budget = retry_throttling
        .map(|t| {
            // Validated above; an error here would be a field the two checks disagree on, and
            // it is reported as that field rather than trusted away.
            crate::retry::RetryBudget::token_bucket(t.max_tokens, t.token_ratio).map_err(|e| {
                let field = match e.field() {
                    "retry_budget.max_tokens" => "retryThrottling.maxTokens",
                    _ => "retryThrottling.tokenRatio",
                };
                err(field, e.problem().to_owned())
            })
        })
        .transpose()?;
    Ok(ServiceConfig {
        budget,
        method_configs,
        retry_throttling,
        load_balancing,
        health_check,
    })
}

fn method_config(v: &Value, path: &str, seen: &mut HashSet<MethodName>) -> Result<MethodConfig> {
    let map = object(v, path)?;
    let names_path = key(path, "name");
    let names_v = field(map, "name").ok_or_else(|| err(&names_path, "is required"))?;
    let names_list = array(names_v, &names_path)?;
    if names_list.is_empty() {
        return Err(err(&names_path, "must name at least one method"));
    }
    let mut names = Vec::with_capacity(names_list.len());
    for (i, n) in names_list.iter().enumerate() {
        let p = index(&names_path, i);
        let nmap = object(n, &p)?;
        let part = |k: &str| -> Result<Option<String>> {
            field(nmap, k)
                .map(|v| string(v, &key(&p, k)).map(str::to_owned))
                .transpose()
                .map(|s| s.filter(|s| !s.is_empty()))
        };
        let service = part("service")?;
        let method = part("method")?;
        if service.is_none() && method.is_some() {
            return Err(err(
                &key(&p, "service"),
                "is required when method is set (a method name alone matches nothing)",
            ));
        }
        for (k, s) in [("service", &service), ("method", &method)] {
            if let Some(s) = s
                && s.contains('/')
            {
                return Err(err(&key(&p, k), "must not contain '/'"));
            }
        }
        let name = MethodName { service, method };
        if !seen.insert(name.clone()) {
            return Err(err(
                &p,
                format!("duplicate name {}", echo(&name.to_string())),
            ));
        }
        names.push(name);
    }

    let wait_for_ready = field(map, "waitForReady")
        .map(|v| boolean(v, &key(path, "waitForReady")))
        .transpose()?;
    let timeout = field(map, "timeout")
        .map(|v| positive_duration(v, &key(path, "timeout")))
        .transpose()?;
    let bytes = |k: &str| {
        field(map, k)
            .map(|v| uint(v, &key(path, k), u64::from(u32::MAX)))
            .transpose()
    };
    let max_request_message_bytes = bytes("maxRequestMessageBytes")?;
    let max_response_message_bytes = bytes("maxResponseMessageBytes")?;

    let retry_policy = field(map, "retryPolicy")
        .map(|v| retry_policy(v, &key(path, "retryPolicy")))
        .transpose()?;
    let hedging_policy = field(map, "hedgingPolicy")
        .map(|v| hedging_policy(v, &key(path, "hedgingPolicy")))
        .transpose()?;
    if retry_policy.is_some() && hedging_policy.is_some() {
        return Err(err(
            &key(path, "hedgingPolicy"),
            "a method may have a retryPolicy or a hedgingPolicy, not both",
        ));
    }
    Ok(MethodConfig {
        names,
        wait_for_ready,
        timeout,
        max_request_message_bytes,
        max_response_message_bytes,
        retry_policy,
        hedging_policy,
    })
}

fn retry_policy(v: &Value, path: &str) -> Result<RetryPolicyConfig> {
    let map = object(v, path)?;
    let max_attempts = max_attempts(map, path)?;
    let required = |k: &str| {
        let p = key(path, k);
        field(map, k)
            .map(|v| (v, p.clone()))
            .ok_or_else(|| err(&p, "is required"))
    };
    let (v, p) = required("initialBackoff")?;
    let initial_backoff = positive_duration(v, &p)?;
    let (v, p) = required("maxBackoff")?;
    let max_backoff = positive_duration(v, &p)?;
    let (v, p) = required("backoffMultiplier")?;
    let backoff_multiplier = number(v, &p)?;
    if backoff_multiplier <= 0.0 {
        return Err(err(&p, "must be > 0"));
    }
    let (v, p) = required("retryableStatusCodes")?;
    let retryable_status_codes = codes(v, &p)?;
    if retryable_status_codes.is_empty() {
        return Err(err(&p, "must not be empty"));
    }
    Ok(RetryPolicyConfig {
        max_attempts,
        initial_backoff,
        max_backoff,
        backoff_multiplier,
        retryable_status_codes,
    })
}

fn hedging_policy(v: &Value, path: &str) -> Result<HedgingPolicyConfig> {
    let map = object(v, path)?;
    let max_attempts = max_attempts(map, path)?;
    let hedging_delay = field(map, "hedgingDelay")
        .map(|v| duration(v, &key(path, "hedgingDelay")))
        .transpose()?
        .unwrap_or_default();
    let non_fatal_status_codes = field(map, "nonFatalStatusCodes")
        .map(|v| codes(v, &key(path, "nonFatalStatusCodes")))
        .transpose()?
        .unwrap_or_default();
    Ok(HedgingPolicyConfig {
        max_attempts,
        hedging_delay,
        non_fatal_status_codes,
    })
}

fn retry_throttling(v: &Value, path: &str) -> Result<RetryThrottling> {
    let map = object(v, path)?;
    let p = key(path, "maxTokens");
    let max_tokens = number(
        field(map, "maxTokens").ok_or_else(|| err(&p, "is required"))?,
        &p,
    )?;
    if !(max_tokens > 0.0 && max_tokens <= 1000.0) {
        return Err(err(&p, "must be > 0 and <= 1000"));
    }
    let p = key(path, "tokenRatio");
    let token_ratio = number(
        field(map, "tokenRatio").ok_or_else(|| err(&p, "is required"))?,
        &p,
    )?;
    if token_ratio <= 0.0 {
        return Err(err(&p, "must be > 0"));
    }
    // gRFC A6: at most three decimal places are used.
    if (token_ratio * 1000.0).round() < 1.0 {
        return Err(err(
            &p,
            "must be at least 0.001 (three decimal places are used)",
        ));
    }
    Ok(RetryThrottling {
        max_tokens,
        token_ratio,
    })
}

/// A `loadBalancingConfig` list: the first policy towline supports wins; unsupported names are
/// skipped (the spec's fall-through), and a list with none supported is an error. The chosen
/// policy's config must be valid: an invalid one fails the whole service config, it does not fall
/// through.
fn lb_config_list(v: &Value, path: &str, outermost: bool) -> Result<LbPolicy> {
    let list = array(v, path)?;
    let mut skipped = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        let p = index(path, i);
        let map = object(entry, &p)?;
        let mut entries = map.iter();
        let (name, config) = match (entries.next(), entries.next()) {
            (Some(only), None) => only,
            _ => {
                return Err(err(
                    &p,
                    "must have exactly one field: the policy name, mapped to its config",
                ));
            }
        };
        // The name is the config's own: its echo in the path is cut like any other.
        let p = key(&p, &truncated(name, MAX_ECHOED_CHARS));
        if let Some(policy) = lb_policy(name, config, &p, outermost)? {
            return Ok(policy);
        }
        skipped.push(name.as_str());
    }
    /// The skipped names an error lists; the rest are counted.
    const LISTED: usize = 3;
    Err(err(
        path,
        if skipped.is_empty() {
            "must name at least one policy".to_owned()
        } else {
            let mut saw: Vec<String> = skipped.iter().take(LISTED).map(|n| echo(n)).collect();
            if skipped.len() > LISTED {
                saw.push(format!("and {} more", skipped.len() - LISTED));
            }
            format!("names no policy towline supports (saw {})", saw.join(", "))
        },
    ))
}

/// One policy's config, or `None` when the name is not one towline supports.
fn lb_policy(name: &str, config: &Value, path: &str, outermost: bool) -> Result<Option<LbPolicy>> {
    // A policy's config is an object; `null` means its defaults.
    let empty = Map::new();
    let map = if config.is_null() {
        &empty
    } else {
        object(config, path)?
    };
    let policy = match name {
        "pick_first" => LbPolicy::PickFirst {
            shuffle_address_list: field(map, "shuffleAddressList")
                .map(|v| boolean(v, &key(path, "shuffleAddressList")))
                .transpose()?
                .unwrap_or(false),
        },
        "round_robin" => LbPolicy::RoundRobin,
        "weighted_round_robin" => {
            let d = |k: &str, default: Duration| {
                field(map, k)
                    .map(|v| duration(v, &key(path, k)))
                    .transpose()
                    .map(|d| d.unwrap_or(default))
            };
            let penalty_path = key(path, "errorUtilizationPenalty");
            let error_utilization_penalty = field(map, "errorUtilizationPenalty")
                .map(|v| number(v, &penalty_path))
                .transpose()?
                .unwrap_or(1.0);
            if error_utilization_penalty < 0.0 {
                return Err(err(&penalty_path, "must be >= 0"));
            }
            LbPolicy::WeightedRoundRobin(WeightedRoundRobinConfig {
                enable_oob_load_report: field(map, "enableOobLoadReport")
                    .map(|v| boolean(v, &key(path, "enableOobLoadReport")))
                    .transpose()?
                    .unwrap_or(false),
                oob_reporting_period: d("oobReportingPeriod", Duration::from_secs(10))?,
                blackout_period: d("blackoutPeriod", Duration::from_secs(10))?,
                weight_expiration_period: d("weightExpirationPeriod", Duration::from_secs(180))?,
                // gRFC A58: values below 100 ms are treated as 100 ms.
                weight_update_period: d("weightUpdatePeriod", Duration::from_secs(1))?
                    .max(Duration::from_millis(100)),
                error_utilization_penalty,
            })
        }
        "ring_hash" | "ring_hash_experimental" => {
            let size = |k: &str, default: u64| -> Result<u64> {
                let p = key(path, k);
                let n = field(map, k)
                    .map(|v| uint(v, &p, MAX_RING_SIZE))
                    .transpose()?
                    .unwrap_or(default);
                if n == 0 {
                    return Err(err(&p, "must be > 0"));
                }
                Ok(n)
            };
            let min_ring_size = size("minRingSize", 1024)?;
            let max_ring_size = size("maxRingSize", 4096)?;
            if min_ring_size > max_ring_size {
                return Err(err(&key(path, "minRingSize"), "must be <= maxRingSize"));
            }
            let header_path = key(path, "requestHashHeader");
            let request_hash_header = field(map, "requestHashHeader")
                .map(|v| string(v, &header_path))
                .transpose()?
                .filter(|h| !h.is_empty())
                .map(|h| {
                    http::HeaderName::try_from(h)
                        .map_err(|_| err(&header_path, format!("{} is not a header name", echo(h))))
                })
                .transpose()?;
            LbPolicy::RingHash(RingHashConfig {
                min_ring_size,
                max_ring_size,
                request_hash_header,
            })
        }
        "outlier_detection" | "outlier_detection_experimental" => {
            if !outermost {
                return Err(err(path, "outlier_detection cannot be nested"));
            }
            let detection = outlier_detection(map, path)?;
            let p = key(path, "childPolicy");
            let child = field(map, "childPolicy").ok_or_else(|| err(&p, "is required"))?;
            let child = lb_config_list(child, &p, false)?;
            LbPolicy::OutlierDetection {
                detection,
                child: Box::new(child),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(policy))
}

/// gRFC A50's `outlier_detection` config. An absent `successRateEjection` or
/// `failurePercentageEjection` turns that algorithm off, as the spec says; towline's failure
/// accrual (not in A50) stays off.
fn outlier_detection(map: &Map<String, Value>, path: &str) -> Result<OutlierDetection> {
    let d = |k: &str, default: Duration, positive: bool| -> Result<Duration> {
        let p = key(path, k);
        match field(map, k) {
            Some(v) if positive => positive_duration(v, &p),
            Some(v) => duration(v, &p),
            None => Ok(default),
        }
    };
    let interval = d("interval", Duration::from_secs(10), true)?;
    let base = d("baseEjectionTime", Duration::from_secs(30), true)?;
    let max = d("maxEjectionTime", Duration::from_secs(300).max(base), false)?;
    let percent = |m: &Map<String, Value>, p: &str, k: &str, default: u32| -> Result<u32> {
        field(m, k)
            .map(|v| uint(v, &key(p, k), 100).map(|n| n as u32))
            .transpose()
            .map(|n| n.unwrap_or(default))
    };
    let count = |m: &Map<String, Value>, p: &str, k: &str, default: u32| -> Result<u32> {
        field(m, k)
            .map(|v| uint(v, &key(p, k), u64::from(u32::MAX)).map(|n| n as u32))
            .transpose()
            .map(|n| n.unwrap_or(default))
    };
    let max_ejection_percent = percent(map, path, "maxEjectionPercent", 10)?;

    let success_rate = field(map, "successRateEjection")
        .map(|v| {
            let p = key(path, "successRateEjection");
            let m = object(v, &p)?;
            let def = SuccessRateEjection::default();
            Ok::<_, ConfigError>(SuccessRateEjection {
                stdev_factor: count(m, &p, "stdevFactor", def.stdev_factor)?,
                enforcement_percentage: percent(
                    m,
                    &p,
                    "enforcementPercentage",
                    def.enforcement_percentage,
                )?,
                minimum_hosts: count(m, &p, "minimumHosts", def.minimum_hosts)?,
                request_volume: count(m, &p, "requestVolume", def.request_volume)?,
            })
        })
        .transpose()?;
    let failure_percentage = field(map, "failurePercentageEjection")
        .map(|v| {
            let p = key(path, "failurePercentageEjection");
            let m = object(v, &p)?;
            let def = FailurePercentageEjection::default();
            Ok::<_, ConfigError>(FailurePercentageEjection {
                threshold: percent(m, &p, "threshold", def.threshold)?,
                enforcement_percentage: percent(
                    m,
                    &p,
                    "enforcementPercentage",
                    def.enforcement_percentage,
                )?,
                minimum_hosts: count(m, &p, "minimumHosts", def.minimum_hosts)?,
                request_volume: count(m, &p, "requestVolume", def.request_volume)?,
            })
        })
        .transpose()?;

    OutlierDetection::builder()
        .interval(interval)
        .base_ejection_time(base)
        .max_ejection_time(max)
        .max_ejection_percent(max_ejection_percent)
        .success_rate(success_rate)
        .failure_percentage(failure_percentage)
        .consecutive_failures(None)
        .build()
        .map_err(|e| err(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_proto_json() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(
            parse_duration("0.000000001s"),
            Some(Duration::from_nanos(1))
        );
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        for bad in [
            "",
            "s",
            "1",
            "1.s",
            ".5s",
            "-1s",
            "1.0000000001s",
            "1ms",
            " 1s",
            "1e3s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn echoed_values_and_paths_are_cut() {
        assert_eq!(truncated("abc", 3), "abc");
        assert_eq!(truncated("abcd", 3), "abc…");
        assert_eq!(truncated("ééé", 2), "éé…", "on character boundaries");
        assert_eq!(echo("x"), "\"x\"");
        let long = "y".repeat(1000);
        assert!(echo(&long).starts_with(&format!("{:?}", &long[..64])[..65]));
        assert!(echo(&long).ends_with("… (1000 bytes)"));
        let e = err(&"p".repeat(1000), "q".repeat(1000));
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
    }

    #[test]
    fn codes_by_name_or_number() {
        assert_eq!(
            code(&Value::from("UNAVAILABLE"), "x").unwrap(),
            Code::Unavailable
        );
        assert_eq!(code(&Value::from(14), "x").unwrap(), Code::Unavailable);
        assert!(code(&Value::from("unavailable"), "x").is_err());
        assert!(code(&Value::from(17), "x").is_err());
    }
}
