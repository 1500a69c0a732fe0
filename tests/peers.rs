//! The foreign gRPC servers of `towline::testkit::peer`, grpc-core (Python grpcio) and grpc-js
//! (Node), driven through their controls and called with a plain tonic client: each control does
//! what it says on both implementations.
//!
//! Needs `bash tests/peers/install.sh` (`.ci/run` runs it). Without it each test prints a loud
//! notice and returns; with `CI=true` it fails instead.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::time::timeout;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use towline::testkit::ECHO_SERVICE;
use towline::testkit::pb::echo_client::EchoClient;
use towline::testkit::pb::log_client::LogClient;
use towline::testkit::pb::{EchoRequest, ProduceRequest};
use towline::testkit::peer::{DEADLINE_REMAINING_HEADER, Peer, PeerKind, require_peer};

/// The most one test may take on one kind of peer, start to finish.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// Runs `body` against each kind of peer that can run here, each bounded by [`TEST_TIMEOUT`].
async fn each_kind<F, Fut>(test: &str, body: F)
where
    F: Fn(PeerKind) -> Fut,
    Fut: Future<Output = ()>,
{
    for kind in PeerKind::ALL {
        if !require_peer(kind, test) {
            continue;
        }
        if timeout(TEST_TIMEOUT, body(kind)).await.is_err() {
            panic!("{test} on {kind}: not done within {TEST_TIMEOUT:?}");
        }
    }
}

async fn start(kind: PeerKind, name: &str) -> Peer {
    Peer::builder(kind)
        .id(format!("{kind}-{name}"))
        .start()
        .await
        .unwrap_or_else(|err| panic!("starting {kind}: {err}"))
}

async fn channel(peer: &Peer) -> Channel {
    Endpoint::from(peer.uri())
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_or_else(|err| panic!("connecting to {} {}: {err}", peer.kind(), peer.addr()))
}

fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..EchoRequest::default()
    }
}

#[tokio::test]
async fn unary_reports_id_call_number_headers_and_deadline() {
    each_kind(
        "unary_reports_id_call_number_headers_and_deadline",
        |kind| async move {
            let peer = start(kind, "unary").await;
            let mut client = EchoClient::new(channel(&peer).await);

            let mut request = Request::new(EchoRequest {
                message: "hello".into(),
                payload: b"\x00\x01".to_vec(),
                ..EchoRequest::default()
            });
            request.set_timeout(Duration::from_secs(5));
            request
                .metadata_mut()
                .insert("x-towline-test", "yes".parse().expect("ascii"));
            let response = client
                .unary(request)
                .await
                .expect("first call")
                .into_inner();
            assert_eq!(response.message, "hello", "{kind}");
            assert_eq!(response.payload, b"\x00\x01", "{kind}");
            assert_eq!(response.backend, peer.id(), "{kind}");
            assert_eq!(response.call_number, 1, "{kind}");
            assert_eq!(
                response
                    .request_headers
                    .get("x-towline-test")
                    .map(String::as_str),
                Some("yes"),
                "{kind}: {:?}",
                response.request_headers
            );
            let remaining: u64 = response
                .request_headers
                .get(DEADLINE_REMAINING_HEADER)
                .unwrap_or_else(|| {
                    panic!(
                        "{kind}: no deadline header in {:?}",
                        response.request_headers
                    )
                })
                .parse()
                .expect("a number of ms");
            assert!(
                (3_000..=5_000).contains(&remaining),
                "{kind}: {remaining} ms left of a 5 s deadline"
            );

            // No deadline, no header; the per-call latency header delays just this call.
            let mut request = Request::new(echo("slow"));
            request
                .metadata_mut()
                .insert("towline-testkit-latency-ms", "200".parse().expect("ascii"));
            let started = Instant::now();
            let response = client
                .unary(request)
                .await
                .expect("second call")
                .into_inner();
            assert!(started.elapsed() >= Duration::from_millis(190), "{kind}");
            assert_eq!(response.call_number, 2, "{kind}");
            assert!(
                !response
                    .request_headers
                    .contains_key(DEADLINE_REMAINING_HEADER),
                "{kind}: {:?}",
                response.request_headers
            );

            peer.set_latency(Duration::from_millis(150))
                .await
                .expect("latency");
            let started = Instant::now();
            client.unary(echo("x")).await.expect("third call");
            assert!(started.elapsed() >= Duration::from_millis(140), "{kind}");
            peer.clear_faults().await.expect("clear");
            assert_eq!(peer.calls().await.expect("calls"), 3, "{kind}");
        },
    )
    .await;
}

#[tokio::test]
async fn streams_and_produce() {
    each_kind("streams_and_produce", |kind| async move {
        let peer = start(kind, "streams").await;
        let channel = channel(&peer).await;
        let mut client = EchoClient::new(channel.clone());

        let request = EchoRequest {
            message: "s".into(),
            count: 3,
            interval_ms: 10,
            ..EchoRequest::default()
        };
        let mut stream = client
            .server_stream(request)
            .await
            .expect("stream")
            .into_inner();
        let mut received = 0;
        while let Some(response) = stream.message().await.expect("stream message") {
            assert_eq!(
                (response.message.as_str(), response.call_number),
                ("s", 1),
                "{kind}"
            );
            received += 1;
        }
        assert_eq!(received, 3, "{kind}");

        let requests = futures::stream::iter(vec![echo("a"), echo("b"), echo("c")]);
        let response = client.client_stream(requests).await.expect("client stream");
        assert_eq!(response.get_ref().message, "abc", "{kind}");

        let mut log = LogClient::new(channel);
        for expected_offsets in [[0, 1], [2, 3]] {
            let request = ProduceRequest {
                key: "k".into(),
                records: vec!["a".into(), "".into(), "c".into()],
            };
            let results = log
                .produce(request)
                .await
                .expect("produce")
                .into_inner()
                .results;
            let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
            assert_eq!(codes, [0, Code::InvalidArgument as i32, 0], "{kind}");
            assert_eq!(
                [results[0].offset, results[2].offset],
                expected_offsets,
                "{kind}"
            );
        }
        assert_eq!(peer.calls().await.expect("calls"), 4, "{kind}");
    })
    .await;
}

async fn check(client: &mut HealthClient<Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|status| panic!("health check of {service:?}: {status}"))
        .into_inner()
        .status
}

async fn next_status(watch: &mut tonic::Streaming<HealthCheckResponse>) -> i32 {
    timeout(Duration::from_secs(2), watch.message())
        .await
        .expect("a Watch update within 2 s")
        .expect("Watch stream")
        .expect("Watch still open")
        .status
}

#[tokio::test]
async fn health_check_and_watch_follow_set_health() {
    each_kind(
        "health_check_and_watch_follow_set_health",
        |kind| async move {
            let peer = start(kind, "health").await;
            let mut health = HealthClient::new(channel(&peer).await);
            let serving = ServingStatus::Serving as i32;
            let not_serving = ServingStatus::NotServing as i32;
            assert_eq!(check(&mut health, "").await, serving, "{kind}");
            assert_eq!(check(&mut health, ECHO_SERVICE).await, serving, "{kind}");

            let request = HealthCheckRequest {
                service: ECHO_SERVICE.into(),
            };
            let mut watch = health.watch(request).await.expect("watch").into_inner();
            assert_eq!(next_status(&mut watch).await, serving, "{kind}");

            peer.set_health("*", false).await.expect("set_health");
            assert_eq!(next_status(&mut watch).await, not_serving, "{kind}");
            assert_eq!(check(&mut health, "").await, not_serving, "{kind}");

            peer.set_health(ECHO_SERVICE, true)
                .await
                .expect("set_health");
            assert_eq!(next_status(&mut watch).await, serving, "{kind}");
            assert_eq!(check(&mut health, "").await, not_serving, "{kind}");
            peer.set_health("", true).await.expect("set_health");
            assert_eq!(check(&mut health, "").await, serving, "{kind}");
            // Health checks are not Echo/Log calls.
            assert_eq!(peer.calls().await.expect("calls"), 0, "{kind}");
        },
    )
    .await;
}

#[tokio::test]
async fn without_health_service_health_is_unimplemented() {
    each_kind(
        "without_health_service_health_is_unimplemented",
        |kind| async move {
            let peer = Peer::builder(kind)
                .without_health_service()
                .start()
                .await
                .expect("start");
            assert_eq!(peer.id(), peer.addr().to_string(), "{kind}: default id");
            let channel = channel(&peer).await;
            let status = HealthClient::new(channel.clone())
                .check(HealthCheckRequest::default())
                .await
                .expect_err("no health service");
            assert_eq!(status.code(), Code::Unimplemented, "{kind}: {status}");
            let err = peer.set_health("*", false).await.expect_err("refused");
            assert!(
                err.to_string().contains("no health service"),
                "{kind}: {err}"
            );
            // The control channel still works after a refused command.
            let response = EchoClient::new(channel)
                .unary(echo("x"))
                .await
                .expect("echo");
            assert_eq!(response.get_ref().backend, peer.id(), "{kind}");
        },
    )
    .await;
}

#[tokio::test]
async fn fail_next_sends_the_code_and_pushback_then_succeeds() {
    each_kind(
        "fail_next_sends_the_code_and_pushback_then_succeeds",
        |kind| async move {
            let peer = start(kind, "fail").await;
            let mut client = EchoClient::new(channel(&peer).await);

            peer.fail_next(1, Code::Unavailable, Some("100"))
                .await
                .expect("fail_next");
            let status = client.unary(echo("x")).await.expect_err("injected failure");
            assert_eq!(status.code(), Code::Unavailable, "{kind}: {status}");
            let pushback: Vec<_> = status.metadata().get_all(PUSHBACK).iter().collect();
            assert_eq!(pushback, ["100"], "{kind}: {:?}", status.metadata());
            let response = client
                .unary(echo("x"))
                .await
                .expect("the next call succeeds");
            assert_eq!(response.get_ref().call_number, 2, "{kind}");

            peer.fail_next(2, Code::ResourceExhausted, None)
                .await
                .expect("fail_next");
            for _ in 0..2 {
                let status = client.unary(echo("x")).await.expect_err("injected failure");
                assert_eq!(status.code(), Code::ResourceExhausted, "{kind}: {status}");
                assert!(status.metadata().get(PUSHBACK).is_none(), "{kind}");
            }

            // Two values for one header: grpc-js sends both; grpc-core parses the header as one
            // integer, so the last value wins.
            peer.fail_next(1, Code::Unavailable, Some("7,8"))
                .await
                .expect("fail_next");
            let status = client.unary(echo("x")).await.expect_err("injected failure");
            let pushback: Vec<_> = status.metadata().get_all(PUSHBACK).iter().collect();
            let expected: &[&str] = match kind {
                PeerKind::GrpcJs => &["7", "8"],
                PeerKind::GrpcCore => &["8"],
            };
            assert_eq!(pushback, expected, "{kind}: {:?}", status.metadata());

            peer.fail_next(3, Code::Internal, None)
                .await
                .expect("fail_next");
            peer.clear_faults().await.expect("clear");
            client
                .unary(echo("x"))
                .await
                .expect("no failure after clear");
            assert_eq!(peer.calls().await.expect("calls"), 6, "{kind}");
        },
    )
    .await;
}

#[tokio::test]
async fn kill_fails_calls_and_restart_serves_on_the_same_port() {
    each_kind(
        "kill_fails_calls_and_restart_serves_on_the_same_port",
        |kind| async move {
            let peer = start(kind, "kill").await;
            let addr = peer.addr();
            let mut client = EchoClient::new(channel(&peer).await);
            client.unary(echo("before")).await.expect("before the kill");

            peer.kill();
            timeout(Duration::from_secs(5), peer.wait_stopped())
                .await
                .expect("gone within 5 s")
                .expect("wait_stopped");
            assert!(!peer.is_running(), "{kind}");
            let status = client.unary(echo("dead")).await.expect_err("peer is dead");
            assert_eq!(status.code(), Code::Unavailable, "{kind}: {status}");
            let err = peer.calls().await.expect_err("no control channel");
            assert!(err.to_string().contains(peer.id()), "{kind}: {err}");

            peer.restart().await.expect("restart");
            assert!(peer.is_running(), "{kind}");
            assert_eq!(peer.addr(), addr, "{kind}");
            // A fresh process: counters start again.
            let mut fresh = EchoClient::new(channel(&peer).await);
            let response = fresh.unary(echo("after")).await.expect("after the restart");
            assert_eq!(response.get_ref().call_number, 1, "{kind}");
            assert_eq!(response.get_ref().backend, peer.id(), "{kind}");
            // The old channel reconnects to the same address.
            let mut reconnected = false;
            for _ in 0..20 {
                if client.unary(echo("old channel")).await.is_ok() {
                    reconnected = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(reconnected, "{kind}: the old channel never reconnected");
        },
    )
    .await;
}

#[tokio::test]
async fn graceful_stop_finishes_the_call_in_flight_and_refuses_new_connections() {
    each_kind(
        "graceful_stop_finishes_the_call_in_flight_and_refuses_new_connections",
        |kind| async move {
            let peer = start(kind, "stop").await;
            let client = EchoClient::new(channel(&peer).await);
            peer.set_latency(Duration::from_millis(300))
                .await
                .expect("latency");

            let in_flight = tokio::spawn({
                let mut client = client.clone();
                async move { client.unary(echo("in flight")).await }
            });
            // Until the call has reached the handler.
            let deadline = Instant::now() + Duration::from_secs(2);
            while peer.calls().await.expect("calls") == 0 {
                assert!(Instant::now() < deadline, "{kind}: the call never arrived");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }

            let stopping = Instant::now();
            peer.graceful_stop(Duration::from_secs(2))
                .await
                .expect("graceful_stop");
            let refused = Endpoint::from(peer.uri())
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await;
            assert!(
                refused.is_err(),
                "{kind}: a new connection was accepted while stopping"
            );

            let response = in_flight
                .await
                .expect("task")
                .unwrap_or_else(|status| panic!("{kind}: the call in flight failed: {status}"));
            assert_eq!(response.get_ref().message, "in flight", "{kind}");

            timeout(Duration::from_secs(5), peer.wait_stopped())
                .await
                .expect("stopped within 5 s")
                .expect("wait_stopped");
            // Nothing else was open, so it stopped well before the grace ran out.
            assert!(
                stopping.elapsed() < Duration::from_millis(1_900),
                "{kind}: {:?}",
                stopping.elapsed()
            );
            assert!(!peer.is_running(), "{kind}");
        },
    )
    .await;
}

#[tokio::test]
async fn max_concurrent_streams_limits_calls_on_a_connection() {
    each_kind(
        "max_concurrent_streams_limits_calls_on_a_connection",
        |kind| async move {
            let peer = Peer::builder(kind)
                .max_concurrent_streams(1)
                .start()
                .await
                .expect("start");
            let channel = channel(&peer).await;
            // A first call, so that the client has the server's SETTINGS before the test: on a
            // fresh connection grpc-js refuses streams the client opened before they arrived.
            EchoClient::new(channel.clone())
                .unary(echo("warm"))
                .await
                .expect("warm-up");
            peer.set_latency(Duration::from_millis(300))
                .await
                .expect("latency");
            let started = Instant::now();
            let calls: Vec<_> = (0..3)
                .map(|_| {
                    let mut client = EchoClient::new(channel.clone());
                    tokio::spawn(async move { client.unary(echo("x")).await.map(drop) })
                })
                .collect();
            for call in calls {
                call.await
                    .expect("task")
                    .unwrap_or_else(|status| panic!("{kind}: {status}"));
            }
            // One stream at a time: 3 × 300 ms, not 300 ms.
            assert!(
                started.elapsed() >= Duration::from_millis(850),
                "{kind}: {:?}",
                started.elapsed()
            );
        },
    )
    .await;
}

#[tokio::test]
async fn max_connection_age_ends_a_call_after_the_grace() {
    each_kind(
        "max_connection_age_ends_a_call_after_the_grace",
        |kind| async move {
            let peer = Peer::builder(kind)
                .max_connection_age(Duration::from_millis(300))
                .max_connection_age_grace(Duration::from_millis(500))
                .start()
                .await
                .expect("start");
            let mut client = EchoClient::new(channel(&peer).await);
            peer.set_latency(Duration::from_secs(3))
                .await
                .expect("latency");
            let started = Instant::now();
            // grpc-core ends it with UNAVAILABLE "max connection age", grpc-js by destroying the
            // connection (tonic: UNKNOWN, transport error).
            let status = client
                .unary(echo("long"))
                .await
                .expect_err("cut at age + grace");
            assert!(
                started.elapsed() < Duration::from_millis(2_000),
                "{kind}: {status} after {:?}",
                started.elapsed()
            );
            peer.clear_faults().await.expect("clear");
            client
                .unary(echo("x"))
                .await
                .expect("a new connection after the old one aged out");
        },
    )
    .await;
}

#[tokio::test]
async fn grpc_core_answers_frequent_keepalive_pings_with_goaway_unless_permitted() {
    let kind = PeerKind::GrpcCore;
    if !require_peer(
        kind,
        "grpc_core_answers_frequent_keepalive_pings_with_goaway_unless_permitted",
    ) {
        return;
    }
    let test = async {
        for permit in [false, true] {
            let mut builder = Peer::builder(kind);
            if permit {
                builder = builder.permit_keepalive(Duration::from_millis(100));
            }
            let peer = builder.start().await.expect("start");
            let channel = Endpoint::from(peer.uri())
                .http2_keep_alive_interval(Duration::from_millis(300))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
                .connect()
                .await
                .expect("connect");
            // An open Watch keeps the connection busy with a call but sends no data.
            let mut watch = HealthClient::new(channel)
                .watch(HealthCheckRequest::default())
                .await
                .expect("watch")
                .into_inner();
            next_status(&mut watch).await;
            let ended = timeout(Duration::from_secs(3), watch.message()).await;
            if permit {
                assert!(
                    ended.is_err(),
                    "permitted pings still ended the Watch: {ended:?}"
                );
            } else {
                // 2 strikes allowed, the 3rd ping gets GOAWAY ENHANCE_YOUR_CALM too_many_pings.
                let status = ended
                    .expect("GOAWAY within 3 s")
                    .expect_err("Watch ended by GOAWAY");
                assert!(status.message().to_lowercase().contains("ping"), "{status}");
            }
        }
    };
    timeout(TEST_TIMEOUT, test)
        .await
        .expect("not done within the test timeout");
}
