//! `towline::config`: a corpus of service configs written from the gRFCs' field rules
//! (tests/service_configs/{valid,invalid}; each invalid one has a sibling `.expect` holding the
//! JSON path its error must name), what is built from them, and a stack built from JSON against
//! real testkit backends.

use std::path::Path;
use std::time::{Duration, Instant};

use tonic::Code;
use tower::{Layer, ServiceBuilder};
use towline::balance::BalanceLayer;
use towline::config::{LbPolicy, ServiceConfig};
use towline::connect::Connect;
use towline::discover::Static;
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

fn corpus(kind: &str) -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/service_configs")
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
fn every_valid_config_parses_and_builds() {
    let valid = corpus("valid");
    assert!(valid.len() >= 10);
    for (name, json) in valid {
        let config = ServiceConfig::from_json(&json).unwrap_or_else(|e| panic!("{name}: {e}"));
        let _ = config.retry_layer();
        let _ = config.per_method_layer();
        config
            .balance_config()
            .build()
            .unwrap_or_else(|e| panic!("{name}: balance config: {e}"));
    }
}

#[test]
fn every_invalid_config_fails_naming_its_json_path() {
    let invalid = corpus("invalid");
    assert!(invalid.len() >= 40);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/service_configs/invalid");
    let mut wrong = Vec::new();
    for (name, json) in invalid {
        let expect = std::fs::read_to_string(dir.join(format!("{name}.expect")))
            .unwrap_or_else(|_| panic!("{name}.expect is missing"));
        match ServiceConfig::from_json(&json) {
            Ok(_) => wrong.push(format!("{name}: accepted")),
            Err(e) if e.field() != expect.trim() => {
                wrong.push(format!("{name}: expected {}, got {e}", expect.trim()))
            }
            Err(e) => assert!(!e.problem().is_empty(), "{name}"),
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[test]
fn error_messages_read_as_the_issue_asks() {
    let err = ServiceConfig::from_json(
        r#"{"methodConfig": [{"name": [{"service": "a.B"}], "retryPolicy": {"maxAttempts": 1,
        "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "methodConfig[0].retryPolicy.maxAttempts: must be > 1"
    );
}

fn full() -> ServiceConfig {
    let json = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/service_configs/valid/full.json"),
    )
    .unwrap();
    ServiceConfig::from_json(&json).unwrap()
}

#[test]
fn the_most_specific_name_wins() {
    let c = full();
    let unary = c.method_config("/towline.testkit.v1.Echo/Unary").unwrap();
    assert_eq!(unary.timeout, Some(Duration::from_millis(1500)));
    let rp = unary.retry_policy.as_ref().unwrap();
    assert_eq!(rp.max_attempts, 4);
    assert_eq!(
        rp.retryable_status_codes,
        [Code::Unavailable, Code::ResourceExhausted, Code::Aborted]
    );
    assert_eq!(unary.wait_for_ready, Some(true));
    assert_eq!(unary.max_response_message_bytes, Some(4 * 1024 * 1024));

    let stream = c
        .method_config("/towline.testkit.v1.Echo/ServerStream")
        .unwrap();
    assert!(stream.retry_policy.is_none() && stream.hedging_policy.is_some());
    // `{"service": "other.Service", "method": ""}` names the whole service.
    assert!(std::ptr::eq(
        c.method_config("/other.Service/Any").unwrap(),
        stream
    ));
    let default = c.method_config("/x.Y/Z").unwrap();
    assert_eq!(default.timeout, Some(Duration::from_secs(10)));
    assert!(std::ptr::eq(c.method_config("garbage").unwrap(), default));

    let t = c.per_method_layer().unwrap();
    assert_eq!(
        t.timeout_for("/towline.testkit.v1.Echo/Unary"),
        Some(Duration::from_millis(1500))
    );
    // Its own config has no timeout: that overrides the default's.
    assert_eq!(t.timeout_for("/towline.testkit.v1.Echo/ServerStream"), None);
    assert_eq!(t.timeout_for("/x.Y/Z"), Some(Duration::from_secs(10)));
}

#[test]
fn max_attempts_above_five_is_five_and_unknown_lb_policies_fall_through() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/service_configs/valid");
    let read = |f: &str| ServiceConfig::from_json(&std::fs::read_to_string(dir.join(f)).unwrap());
    let c = read("max_attempts_capped.json").unwrap();
    assert_eq!(
        c.method_configs()[0]
            .retry_policy
            .as_ref()
            .unwrap()
            .max_attempts,
        5
    );
    let c = read("lb_fall_through.json").unwrap();
    assert!(matches!(
        c.load_balancing(),
        Some(LbPolicy::WeightedRoundRobin(_))
    ));
    let c = read("lb_outlier_detection.json").unwrap();
    match c.load_balancing() {
        Some(LbPolicy::OutlierDetection { child, .. }) => {
            assert!(matches!(**child, LbPolicy::RoundRobin))
        }
        other => panic!("{other:?}"),
    }
    let c = read("empty.json").unwrap();
    assert!(c.retry_layer().is_none() && c.per_method_layer().is_none());
}

/// A stack built from JSON: the config's timeout bounds the call, its retry policy retries
/// `UNAVAILABLE` three times for `Unary`, and its health check and round robin pick the backend.
#[tokio::test]
async fn a_stack_built_from_json_applies_retries_timeouts_and_balancing() {
    let config = ServiceConfig::from_json(
        r#"{
          "methodConfig": [
            {"name": [{"service": "towline.testkit.v1.Echo", "method": "Unary"}],
             "timeout": "0.3s",
             "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.001s", "maxBackoff": "0.005s",
                             "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}},
            {"name": [{}], "timeout": "5s"}
          ],
          "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
          "loadBalancingConfig": [{"some_future_policy": {}}, {"round_robin": {}}],
          "healthCheckConfig": {"serviceName": ""}
        }"#,
    )
    .unwrap();
    let backends = Backend::start_many(2).await.unwrap();
    let balance = BalanceLayer::new(
        Static::new(backends.iter().map(Backend::uri)),
        config.balance_config().build().unwrap(),
    )
    .layer(Connect::new());
    let stack = ServiceBuilder::new()
        .option_layer(config.per_method_layer())
        .option_layer(config.retry_layer())
        .service(balance);
    let mut client = EchoClient::new(stack);

    // Round robin over both backends.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let reply = client
            .unary(EchoRequest::default())
            .await
            .unwrap()
            .into_inner();
        // 300 ms, less the time the first call waited for the endpoints to connect.
        let sent = towline::deadline::parse(reply.request_headers["grpc-timeout"].as_bytes());
        assert!(
            sent.is_some_and(|t| t <= Duration::from_millis(300) && t > Duration::from_millis(200)),
            "{sent:?}"
        );
        seen.insert(reply.backend);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Retries: one failure queued on each backend; the third attempt succeeds.
    let before: u64 = backends.iter().map(Backend::calls).sum();
    for b in &backends {
        b.fail_next(1, Code::Unavailable);
    }
    client.unary(EchoRequest::default()).await.unwrap();
    let after: u64 = backends.iter().map(Backend::calls).sum();
    assert_eq!(after - before, 3);

    // A code the policy does not list is not retried.
    for b in &backends {
        b.fail_next(1, Code::Internal);
    }
    let before: u64 = backends.iter().map(Backend::calls).sum();
    let err = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert_eq!(backends.iter().map(Backend::calls).sum::<u64>() - before, 1);
    for b in &backends {
        b.clear_faults();
    }

    // The timeout: a backend slower than 0.3 s fails the call at about 0.3 s.
    for b in &backends {
        b.set_latency(Duration::from_secs(2));
    }
    let start = Instant::now();
    let err = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );

    // A caller's shorter deadline is kept.
    for b in &backends {
        b.clear_faults();
    }
    let mut req = tonic::Request::new(EchoRequest::default());
    req.set_timeout(Duration::from_millis(100));
    let reply = client.unary(req).await.unwrap().into_inner();
    assert_eq!(reply.request_headers["grpc-timeout"], "100000u");
}

/// `hedgingPolicy`: with one backend slow, the hedge sent after `hedgingDelay` goes to the other
/// backend and wins, so no call waits for the slow one; a fatal code ends the call at once.
#[tokio::test]
async fn hedging_from_json_hides_a_slow_backend() {
    let config = ServiceConfig::from_json(
        r#"{
          "methodConfig": [{"name": [{"service": "towline.testkit.v1.Echo"}],
            "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.02s",
                              "nonFatalStatusCodes": ["UNAVAILABLE"]}}],
          "loadBalancingConfig": [{"round_robin": {}}]
        }"#,
    )
    .unwrap();
    assert!(config.retry_layer().is_none());
    let backends = Backend::start_many(2).await.unwrap();
    backends[0].set_latency(Duration::from_millis(800));
    let balance = BalanceLayer::new(
        Static::new(backends.iter().map(Backend::uri)),
        config.balance_config().build().unwrap(),
    )
    .layer(Connect::new());
    let stack = ServiceBuilder::new()
        .option_layer(config.hedge_layer())
        .service(balance);
    let mut client = EchoClient::new(stack);
    // Warm up: both endpoints connected.
    for _ in 0..2 {
        client.unary(EchoRequest::default()).await.unwrap();
    }

    for _ in 0..6 {
        let start = Instant::now();
        let reply = client
            .unary(EchoRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.backend, backends[1].id());
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
    }

    // Non-fatal UNAVAILABLE from the fast backend: the slow copy still answers.
    backends[0].set_latency(Duration::from_millis(50));
    backends[1].fail_next(100, Code::Unavailable);
    let reply = client
        .unary(EchoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.backend, backends[0].id());
    // A fatal code ends the call, whatever the other copy would have said.
    backends[1].clear_faults();
    backends[0].set_latency(Duration::ZERO);
    backends[0].fail_next(100, Code::Internal);
    backends[1].fail_next(100, Code::Internal);
    let err = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
}

#[test]
fn wait_for_ready_is_applied_per_method() {
    let c = ServiceConfig::from_json(
        r#"{"methodConfig": [
            {"name": [{"service": "towline.testkit.v1.Echo", "method": "Unary"}], "waitForReady": true},
            {"name": [{"service": "towline.testkit.v1.Echo"}], "timeout": "2s"},
            {"name": [{}], "waitForReady": false}
        ]}"#,
    )
    .unwrap();
    let layer = c.per_method_layer().unwrap();
    assert_eq!(
        layer.wait_for_ready_for("/towline.testkit.v1.Echo/Unary"),
        Some(true)
    );
    // The service-wide config has its own settings: no waitForReady, a timeout.
    assert_eq!(
        layer.wait_for_ready_for("/towline.testkit.v1.Echo/ServerStream"),
        None
    );
    assert_eq!(
        layer.timeout_for("/towline.testkit.v1.Echo/ServerStream"),
        Some(std::time::Duration::from_secs(2))
    );
    assert_eq!(layer.wait_for_ready_for("/other.Svc/M"), Some(false));
}

#[test]
fn huge_numbers_in_retry_throttling_are_refused_or_accepted_without_panic() {
    let throttling = |max_tokens: &str, token_ratio: &str| {
        ServiceConfig::from_json(&format!(
            r#"{{"retryThrottling": {{"maxTokens": {max_tokens}, "tokenRatio": {token_ratio}}}}}"#
        ))
    };
    // gRFC A6 bounds maxTokens (0, 1000] but not tokenRatio: a huge ratio refills the whole
    // bucket on one success.
    let config = throttling("10", "1e300").unwrap();
    assert_eq!(config.retry_throttling().unwrap().token_ratio, 1e300);
    for ratio in ["1.7976931348623157e308", "4294967296", "10"] {
        throttling("1000", ratio).unwrap();
    }
    for (max_tokens, token_ratio, field) in [
        ("1e300", "0.1", "retryThrottling.maxTokens"),
        ("-1e300", "0.1", "retryThrottling.maxTokens"),
        ("10", "-1e300", "retryThrottling.tokenRatio"),
        ("10", "1e-300", "retryThrottling.tokenRatio"),
    ] {
        let err = throttling(max_tokens, token_ratio).unwrap_err();
        assert_eq!(err.field(), field, "{err}");
    }
}

/// The largest proto `Duration`, 10,000 years.
const MAX_PROTO_DURATION: &str = "315576000000s";

#[test]
fn durations_beyond_a_proto_duration_are_refused_naming_their_path() {
    for (json, field) in [
        (
            r#"{"methodConfig": [{"name": [{}], "timeout": "99999999999999999999s"}]}"#,
            "methodConfig[0].timeout",
        ),
        (
            r#"{"methodConfig": [{"name": [{}], "timeout": "315576000001s"}]}"#,
            "methodConfig[0].timeout",
        ),
        (
            r#"{"methodConfig": [{"name": [{}], "hedgingPolicy": {"maxAttempts": 2,
                "hedgingDelay": "99999999999999999999.999999999s"}}]}"#,
            "methodConfig[0].hedgingPolicy.hedgingDelay",
        ),
        (
            r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2,
                "initialBackoff": "1s", "maxBackoff": "99999999999999999999s",
                "backoffMultiplier": 2, "retryableStatusCodes": [14]}}]}"#,
            "methodConfig[0].retryPolicy.maxBackoff",
        ),
        (
            r#"{"loadBalancingConfig": [{"outlier_detection": {
                "interval": "99999999999999999999s", "childPolicy": [{"round_robin": {}}]}}]}"#,
            "loadBalancingConfig[0].outlier_detection.interval",
        ),
    ] {
        let err = ServiceConfig::from_json(json).unwrap_err();
        assert_eq!(err.field(), field, "{err}");
    }
}

/// Every duration at the proto maximum: the layers are built and serve real calls, and nothing
/// overflows (the hedge delay, the backoff, the timeout, the outlier interval).
#[tokio::test]
async fn the_largest_durations_build_layers_that_serve_calls() {
    let d = MAX_PROTO_DURATION;
    let config = ServiceConfig::from_json(&format!(
        r#"{{
          "methodConfig": [
            {{"name": [{{"service": "towline.testkit.v1.Echo", "method": "Unary"}}],
             "timeout": "{d}",
             "hedgingPolicy": {{"maxAttempts": 3, "hedgingDelay": "{d}",
                                "nonFatalStatusCodes": ["UNAVAILABLE"]}}}},
            {{"name": [{{}}], "timeout": "{d}",
             "retryPolicy": {{"maxAttempts": 2, "initialBackoff": "{d}", "maxBackoff": "{d}",
                             "backoffMultiplier": 1e300, "retryableStatusCodes": ["ABORTED"]}}}}
          ],
          "retryThrottling": {{"maxTokens": 1000, "tokenRatio": 1e300}},
          "loadBalancingConfig": [{{"outlier_detection": {{
             "interval": "{d}", "baseEjectionTime": "{d}", "maxEjectionTime": "{d}",
             "childPolicy": [{{"round_robin": {{}}}}]}}}}]
        }}"#
    ))
    .unwrap();
    let backend = Backend::start().await.unwrap();
    let balance = BalanceLayer::new(
        Static::new([backend.uri()]),
        config.balance_config().build().unwrap(),
    )
    .layer(Connect::new());
    let stack = ServiceBuilder::new()
        .option_layer(config.per_method_layer())
        .option_layer(config.retry_layer())
        .option_layer(config.hedge_layer())
        .service(balance);
    let mut client = EchoClient::new(stack);

    // Hedged: the first copy fails non-fatally, the second goes out at once and wins; the next
    // hedge, a proto maximum away, is "never".
    backend.fail_next(1, Code::Unavailable);
    let reply = client
        .unary(EchoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.request_headers["grpc-previous-rpc-attempts"], "1");
    // The hedge carries what is left of 10,000 years.
    let left = towline::deadline::parse(reply.request_headers["grpc-timeout"].as_bytes()).unwrap();
    assert!(left > Duration::from_secs(87_659_999 * 3600), "{left:?}");
    // Retried by policy (not here: UNAVAILABLE is not its code), and a plain success.
    let mut stream = client
        .server_stream(EchoRequest::default())
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
}

#[test]
fn a_multi_megabyte_value_is_not_echoed_in_full() {
    let huge = "x".repeat(2 * 1024 * 1024);
    let cases = [
        (
            format!(r#"{{"methodConfig": [{{"name": [{{}}], "timeout": "{huge}"}}]}}"#),
            "methodConfig[0].timeout",
        ),
        (
            format!(
                r#"{{"methodConfig": [{{"name": [{{}}], "retryPolicy": {{"maxAttempts": 2,
                "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["{huge}"]}}}}]}}"#
            ),
            "methodConfig[0].retryPolicy.retryableStatusCodes[0]",
        ),
        (
            format!(
                r#"{{"methodConfig": [{{"name": [{{"service": "{huge}"}}, {{"service": "{huge}"}}]}}]}}"#
            ),
            "methodConfig[0].name[1]",
        ),
        (
            format!(r#"{{"loadBalancingPolicy": "{huge}"}}"#),
            "loadBalancingPolicy",
        ),
        (
            format!(r#"{{"loadBalancingConfig": [{{"{huge}": {{}}}}, {{"{huge}y": {{}}}}]}}"#),
            "loadBalancingConfig",
        ),
        (
            format!(
                r#"{{"loadBalancingConfig": [{{"ring_hash": {{"requestHashHeader": "{huge}:"}}}}]}}"#
            ),
            "loadBalancingConfig[0].ring_hash.requestHashHeader",
        ),
        (
            format!(r#"{{"methodConfig": [{{"name": [{{}}], "timeout": "{huge}"#),
            "$",
        ),
    ];
    for (json, field) in cases {
        let err = ServiceConfig::from_json(&json).unwrap_err();
        let message = err.to_string();
        assert!(message.len() < 300, "{field}: {} bytes", message.len());
        assert_eq!(err.field(), field, "{message}");
    }
    // A huge policy name is cut in the path too.
    let json = format!(r#"{{"loadBalancingConfig": [{{"{huge}": 5}}]}}"#);
    let err = ServiceConfig::from_json(&json).unwrap_err();
    assert!(
        err.to_string().len() < 300,
        "{} bytes",
        err.to_string().len()
    );
    assert!(
        err.field().starts_with("loadBalancingConfig[0].xxx"),
        "{err}"
    );
}

/// Every builder fails the same way: a `towline::ConfigError` naming the field, at build time.
#[test]
fn every_builder_names_the_bad_field_in_one_error_type() {
    use towline::ConfigError;
    use towline::backoff::Backoff;
    use towline::balance::BalanceConfig;
    use towline::discover::dns::Dns;
    use towline::health::HealthCheck;

    fn field<T: std::fmt::Debug>(built: Result<T, ConfigError>) -> String {
        built.unwrap_err().field().to_owned()
    }
    let name_server = "127.0.0.1:53".parse().unwrap();
    let zero = Duration::ZERO;
    let cases = [
        (
            field(Backoff::builder().initial(zero).build()),
            "backoff.initial",
        ),
        (
            field(Backoff::builder().multiplier(-2.0).build()),
            "backoff.multiplier",
        ),
        (
            field(HealthCheck::check("").fall(0).build()),
            "health_check.fall",
        ),
        (
            // Checked by the balancer's config too, a watch given a check's setting included.
            field(
                BalanceConfig::builder()
                    .health_check(HealthCheck::watch("").interval(Duration::from_secs(1)))
                    .build(),
            ),
            "health_check.interval",
        ),
        (
            field(
                Dns::a_aaaa("svc.example.", 80)
                    .timeout(zero)
                    .nameserver(name_server)
                    .build(),
            ),
            "dns.timeout",
        ),
        (
            field(Static::try_new([
                "http://127.0.0.1:1",
                "http://no such host",
            ])),
            "static.endpoints[1]",
        ),
    ];
    for (got, expected) in cases {
        assert_eq!(got, expected);
    }
}
