//! The one-call client: `Channel::builder(target)?.service_config(json)?.build()?` against real
//! tonic servers on loopback, through generated clients.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::timeout;
use tonic::metadata::MetadataValue;
use tonic_health::ServingStatus;
use towline::Channel;
use towline::balance::{EndpointState, RoundRobin};
use towline::pool::PoolConfig;
use towline::testkit::Backend;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

/// `ipv4:127.0.0.1:a,127.0.0.1:b,…` for `backends`.
fn ipv4_target(backends: &[Backend]) -> String {
    let addrs: Vec<String> = backends.iter().map(|b| b.addr().to_string()).collect();
    format!("ipv4:{}", addrs.join(","))
}

async fn all_ready(channel: &Channel, n: usize) {
    timeout(
        Duration::from_secs(10),
        channel.balance().wait_until(|endpoints| {
            endpoints.len() == n && endpoints.iter().all(|e| e.state == EndpointState::Ready)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("endpoints not ready: {:#?}", channel.snapshot()));
}

const ROUND_ROBIN: &str = r#"{
  "loadBalancingConfig": [{"round_robin": {}}],
  "methodConfig": [{
    "name": [{"service": "towline.testkit.v1.Echo"}],
    "retryPolicy": {
      "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
      "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }],
  "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
}"#;

#[tokio::test]
async fn three_endpoints_from_an_ipv4_target_share_the_calls() {
    let backends = Backend::start_many(3).await.unwrap();
    let channel = Channel::builder(&ipv4_target(&backends))
        .unwrap()
        .service_config(ROUND_ROBIN)
        .unwrap()
        .build()
        .unwrap();
    all_ready(&channel, 3).await;
    let mut client = EchoClient::new(channel.clone());
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let reply = client.unary(EchoRequest::default()).await.unwrap();
        *per_backend.entry(reply.into_inner().backend).or_default() += 1;
    }
    // round_robin from the service config: ten each.
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    assert!(per_backend.values().all(|&n| n == 10), "{per_backend:?}");

    // The pieces are exposed: one pool per endpoint, keyed by the endpoint's URI.
    let mut pools: Vec<String> = channel
        .pool_stats()
        .iter()
        .map(|(uri, stats)| {
            assert!(stats.open >= 1, "{uri}: {stats:?}");
            uri.to_string()
        })
        .collect();
    pools.sort();
    let mut expected: Vec<String> = backends.iter().map(|b| b.uri().to_string()).collect();
    expected.sort();
    assert_eq!(pools, expected);
}

/// A service config that says only a timeout keeps the channel's balancing defaults: the
/// health check (a NOT_SERVING backend gets nothing) and a balancing strategy (not gRPC's
/// `pick_first` fallback, which would send every call to one backend).
#[tokio::test]
async fn a_service_config_without_balancing_keeps_the_channel_defaults() {
    let backends = Backend::start_many(3).await.unwrap();
    backends[0].set_health(ServingStatus::NotServing).await;
    let channel = Channel::builder(&ipv4_target(&backends))
        .unwrap()
        .service_config(r#"{"methodConfig": [{"name": [{}], "timeout": "2s"}]}"#)
        .unwrap()
        .build()
        .unwrap();
    timeout(
        Duration::from_secs(10),
        channel.balance().wait_until(|endpoints| {
            let state = |b: &Backend| endpoints.iter().find(|e| e.uri == b.uri()).map(|e| e.state);
            state(&backends[0]) == Some(EndpointState::Unhealthy)
                && backends[1..]
                    .iter()
                    .all(|b| state(b) == Some(EndpointState::Ready))
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("not gated as expected: {:#?}", channel.snapshot()));
    // 16 calls in flight at a time: peak-EWMA weighs calls in flight, so both healthy backends
    // take a share (with one call at a time the faster one would rightly take them all);
    // `pick_first` would send every call to one backend however many were in flight.
    let client = EchoClient::new(channel.clone());
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for _ in 0..4 {
        let calls = (0..16).map(|_| {
            let mut client = client.clone();
            async move { client.unary(EchoRequest::default()).await }
        });
        for reply in futures::future::join_all(calls).await {
            *per_backend
                .entry(reply.unwrap().into_inner().backend)
                .or_default() += 1;
        }
    }
    assert_eq!(backends[0].calls(), 0, "{per_backend:?}");
    assert_eq!(
        per_backend.len(),
        2,
        "one backend took every call: {per_backend:?}"
    );
}

#[tokio::test]
async fn the_service_config_retry_policy_retries_on_another_call() {
    let backend = Backend::start().await.unwrap();
    let channel = Channel::builder(&format!("ipv4:{}", backend.addr()))
        .unwrap()
        .service_config(ROUND_ROBIN)
        .unwrap()
        .build()
        .unwrap();
    backend.fail_next(2, tonic::Code::Unavailable);
    let reply = EchoClient::new(channel)
        .unary(EchoRequest {
            message: "again".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reply.get_ref().message, "again");
    assert_eq!(
        backend.calls(),
        3,
        "two failures, then the retry that succeeded"
    );
}

#[tokio::test]
async fn the_default_stack_retries_unavailable_without_a_service_config() {
    let backend = Backend::start().await.unwrap();
    let channel = Channel::builder(&backend.addr().to_string())
        .unwrap()
        .build()
        .unwrap();
    backend.fail_next(1, tonic::Code::Unavailable);
    EchoClient::new(channel)
        .unary(EchoRequest::default())
        .await
        .unwrap();
    assert_eq!(backend.calls(), 2);
}

#[tokio::test]
async fn with_interceptor_and_metrics_off_through_a_generated_client() {
    let backends = Backend::start_many(2).await.unwrap();
    for metrics in [true, false] {
        let channel = Channel::builder(&ipv4_target(&backends))
            .unwrap()
            .metrics(metrics)
            .strategy(RoundRobin::new())
            .pool(PoolConfig::builder().size(2).build().unwrap())
            .build()
            .unwrap();
        let mut client =
            EchoClient::with_interceptor(channel.clone(), |mut request: tonic::Request<()>| {
                request
                    .metadata_mut()
                    .insert("x-tenant", MetadataValue::from_static("acme"));
                Ok(request)
            });
        let reply = client.unary(EchoRequest::default()).await.unwrap();
        assert_eq!(reply.get_ref().request_headers["x-tenant"], "acme");
        all_ready(&channel, 2).await;
        // The pool setting reached every endpoint: two connections each.
        for (uri, stats) in channel.pool_stats() {
            assert_eq!(stats.open, 2, "{uri}: {stats:?}");
        }
    }
}

#[tokio::test]
async fn an_ip_literal_dns_target_needs_no_resolver() {
    let backend = Backend::start().await.unwrap();
    let channel = Channel::builder(&format!("dns:///{}", backend.addr()))
        .unwrap()
        .build()
        .unwrap();
    EchoClient::new(channel.clone())
        .unary(EchoRequest::default())
        .await
        .unwrap();
    assert_eq!(channel.snapshot()[0].uri, backend.uri());
}

#[tokio::test]
async fn a_dead_target_fails_calls_with_unavailable_saying_why() {
    let backend = Backend::start().await.unwrap();
    backend.stop().await;
    let channel = Channel::builder(&format!("ipv4:{}", backend.addr()))
        .unwrap()
        .balance(|b| b.endpoint_wait(Duration::from_millis(300)))
        .build()
        .unwrap();
    assert!(!channel.ready_within(Duration::from_millis(300)).await);
    let status = timeout(
        Duration::from_secs(10),
        EchoClient::new(channel).unary(EchoRequest::default()),
    )
    .await
    .expect("fails fast, never hangs")
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn settings_that_cannot_work_fail_at_build_naming_the_field() {
    let err = Channel::builder("ipv4:127.0.0.1:1")
        .unwrap()
        .balance(|b| b.panic_threshold(2.0))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "balance.panic_threshold");

    let err = Channel::builder("ipv4:127.0.0.1:1")
        .unwrap()
        .service_config(r#"{"methodConfig": [{"name": [{}], "timeout": "0s"}]}"#)
        .unwrap_err();
    assert_eq!(err.field(), "methodConfig[0].timeout");

    let err = Channel::builder("consul://x/y").unwrap_err();
    assert_eq!(err.field(), "target");
    assert!(err.problem().contains("unknown scheme `consul`"), "{err}");
}

#[test]
fn building_outside_a_runtime_is_a_config_error() {
    let err = Channel::builder("ipv4:127.0.0.1:1")
        .unwrap()
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "runtime");
}

#[tokio::test]
async fn a_dns_target_resolves_through_the_system_resolver() {
    // `localhost` from the hosts file: 127.0.0.1 (and ::1 where the hosts file says so, served
    // too when this machine has IPv6), all on one port, as DNS gives one port for every address.
    let v4 = Backend::builder().id("v4").start().await.unwrap();
    let port = v4.addr().port();
    let v6 = Backend::builder()
        .id("v6")
        .addr(std::net::SocketAddr::from((
            std::net::Ipv6Addr::LOCALHOST,
            port,
        )))
        .start()
        .await
        .ok();
    let channel = Channel::builder(&format!("dns:///localhost:{port}"))
        .unwrap()
        .build()
        .unwrap();
    let reply = EchoClient::new(channel.clone())
        .unary(EchoRequest::default())
        .await
        .unwrap();
    assert!(["v4", "v6"].contains(&reply.get_ref().backend.as_str()));
    let snapshot = channel.snapshot();
    assert!(!snapshot.is_empty());
    for endpoint in &snapshot {
        let authority = endpoint.uri.authority().unwrap();
        assert_eq!(authority.port_u16(), Some(port), "{snapshot:#?}");
        let ip: std::net::IpAddr = authority
            .host()
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .unwrap();
        assert!(ip.is_loopback(), "{snapshot:#?}");
    }
    drop(v6);
}

#[tokio::test]
async fn a_panicking_configure_marks_the_endpoint_down_with_the_reason() {
    let backend = Backend::start().await.unwrap();
    let channel = Channel::builder(&format!("ipv4:{}", backend.addr()))
        .unwrap()
        .connect(|c| c.configure(|_| panic!("bad TLS file")))
        .balance(|b| b.endpoint_wait(Duration::from_millis(200)))
        .build()
        .unwrap();
    timeout(
        Duration::from_secs(10),
        channel.balance().wait_until(|e| {
            e.len() == 1
                && e[0].state == EndpointState::Down
                && e[0]
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("Connect::configure panicked: bad TLS file"))
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("no reason: {:#?}", channel.snapshot()));
    let status = EchoClient::new(channel)
        .unary(EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(backend.connections_accepted(), 0);
}

#[tokio::test]
async fn a_dns_server_in_the_target_is_the_one_asked() {
    // A UDP socket standing in for the DNS server: the query reaching it is the proof.
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let channel = Channel::builder(&format!("dns://{addr}/greeter.test:50051"))
        .unwrap()
        .build()
        .unwrap();
    let mut query = [0u8; 512];
    let (len, _) = timeout(Duration::from_secs(10), server.recv_from(&mut query))
        .await
        .expect("a DNS query reaches the server named in the target")
        .unwrap();
    // The question carries the name as DNS labels: 8 "greeter" 4 "test" 0.
    let wire = b"\x07greeter\x04test\x00";
    assert!(
        query[..len].windows(wire.len()).any(|w| w == wire),
        "{:?}",
        &query[..len]
    );
    drop(channel);
}

#[tokio::test]
async fn into_parts_takes_a_layer_of_your_own_between_balance_and_pool() {
    use tower::{Layer, ServiceBuilder};
    use towline::balance::Balance;

    let backends = Backend::start_many(2).await.unwrap();
    let parts = Channel::builder(&ipv4_target(&backends))
        .unwrap()
        .into_parts()
        .unwrap();
    // Per-endpoint middleware: every call through an endpoint's pool is stamped.
    let stamp =
        tower::util::MapRequestLayer::new(|mut request: http::Request<tonic::body::Body>| {
            request
                .headers_mut()
                .insert("x-per-endpoint", http::HeaderValue::from_static("yes"));
            request
        });
    let make_endpoint = ServiceBuilder::new()
        .map_response(move |pool| stamp.layer(pool))
        .layer(parts.pool)
        .service(parts.connect);
    let balance = Balance::new(parts.discovery, make_endpoint, parts.balance);
    let stack = ServiceBuilder::new()
        .layer(parts.metrics.expect("metrics are on by default"))
        .layer(parts.retry)
        .service(balance);
    let reply = EchoClient::new(stack)
        .unary(EchoRequest::default())
        .await
        .unwrap();
    assert_eq!(reply.get_ref().request_headers["x-per-endpoint"], "yes");
}

/// Side by side in one run (these machines vary ±20–30 % between runs): the one-call client
/// and tonic's `Channel::balance_list` over the same three backends, 32 calls in flight,
/// each bounded at 20,000 calls or 5 s, twice in alternation. Prints the figures; fails only
/// on failed calls. `cargo test --release --all-features --test channel -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run it on purpose"]
async fn side_by_side_with_tonic_balance_list() {
    use towline::testkit::Load;
    let backends = Backend::start_many(3).await.unwrap();
    let towline = Channel::builder(&ipv4_target(&backends))
        .unwrap()
        .strategy(RoundRobin::new())
        .build()
        .unwrap();
    all_ready(&towline, 3).await;
    let tonic = tonic::transport::Channel::balance_list(
        backends
            .iter()
            .map(|b| tonic::transport::Endpoint::from(b.uri())),
    );
    let load = Load::new(32).calls(20_000).duration(Duration::from_secs(5));
    for round in 0..2 {
        for name in ["towline::Channel", "tonic balance_list"] {
            let (towline, tonic) = (towline.clone(), tonic.clone());
            let report = load
                .run(move |_| {
                    let (towline, tonic) = (towline.clone(), tonic.clone());
                    async move {
                        let reply = if name == "towline::Channel" {
                            EchoClient::new(towline)
                                .unary(EchoRequest::default())
                                .await?
                        } else {
                            EchoClient::new(tonic).unary(EchoRequest::default()).await?
                        };
                        Ok(reply.into_inner().backend)
                    }
                })
                .await;
            assert_eq!(report.failed(), 0, "{:?}", report.failures());
            println!(
                "round {round} {name:20} {:>8.0} calls/s  p50 {:>7.0?}  p99 {:>7.0?}  ({} calls, {:?})",
                report.throughput(),
                report.p50(),
                report.p99(),
                report.calls(),
                report.tally()
            );
        }
    }
}
