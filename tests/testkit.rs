//! The testkit backend over real HTTP/2: a plain tonic `EchoClient::new(channel)` sees each
//! control take effect.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{BACKEND_HEADER, Backend, ECHO_SERVICE, LATENCY_HEADER};

async fn client(backend: &Backend) -> EchoClient<Channel> {
    EchoClient::new(Endpoint::from(backend.uri()).connect().await.unwrap())
}

fn request(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        payload: vec![7; 64],
        ..Default::default()
    }
}

#[tokio::test]
async fn echoes_and_names_itself() {
    let backend = Backend::builder().id("alpha").start().await.unwrap();
    let mut client = client(&backend).await;
    let reply = client.unary(request("hello")).await.unwrap();
    assert_eq!(reply.metadata().get(BACKEND_HEADER).unwrap(), "alpha");
    let reply = reply.into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.payload, vec![7; 64]);
    assert_eq!(reply.backend, "alpha");
    assert_eq!(reply.call_number, 1);
    assert_eq!(backend.calls(), 1);
}

#[tokio::test]
async fn fixed_and_per_call_latency_delay_the_answer() {
    let backend = Backend::start().await.unwrap();
    let mut client = client(&backend).await;
    client.unary(request("warm")).await.unwrap();

    backend.set_latency(Duration::from_millis(80));
    let t0 = Instant::now();
    client.unary(request("slow")).await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(80),
        "{:?}",
        t0.elapsed()
    );

    backend.clear_faults();
    let mut req = tonic::Request::new(request("per call"));
    req.metadata_mut()
        .insert(LATENCY_HEADER, "60".parse().unwrap());
    let t0 = Instant::now();
    client.unary(req).await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(60),
        "{:?}",
        t0.elapsed()
    );

    backend.set_latency_range(Duration::from_millis(30), Duration::from_millis(40));
    let t0 = Instant::now();
    client.unary(request("ranged")).await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(30),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn fail_next_fails_exactly_n_calls_as_trailers_only() {
    let backend = Backend::builder().id("beta").start().await.unwrap();
    let mut client = client(&backend).await;
    backend.fail_next(2, Code::ResourceExhausted);
    for _ in 0..2 {
        let status = client.unary(request("x")).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        // The id rides on the Trailers-Only response's headers too.
        assert_eq!(status.metadata().get(BACKEND_HEADER).unwrap(), "beta");
    }
    client.unary(request("x")).await.unwrap();
    assert_eq!(backend.calls(), 3, "failed calls are counted too");
}

#[tokio::test]
async fn trailers_only_failures_classify_from_headers() {
    use tower::ServiceExt;
    let backend = Backend::start().await.unwrap();
    backend.fail_next(1, Code::Unavailable);
    let channel = Endpoint::from(backend.uri()).connect().await.unwrap();
    // Send a raw gRPC request to see the HTTP response head itself.
    let body = {
        use prost::Message;
        let msg = request("raw").encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(&msg);
        tonic::body::Body::new(
            http_body_util::Full::new(bytes::Bytes::from(frame)).map_err(|e| match e {}),
        )
    };
    let req = http::Request::post(format!("{}towline.testkit.v1.Echo/Unary", backend.uri()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let res = channel.oneshot(req).await.unwrap();
    assert_eq!(
        towline::status::classify_response(&res),
        towline::status::ResponseStatus::TrailersOnly(Code::Unavailable)
    );
}

#[tokio::test]
async fn fail_fraction_fails_about_that_share() {
    let backend = Backend::start().await.unwrap();
    let mut client = client(&backend).await;
    backend.fail_fraction(0.5, Code::Unavailable);
    let mut failed = 0;
    for _ in 0..400 {
        if let Err(status) = client.unary(request("x")).await {
            assert_eq!(status.code(), Code::Unavailable);
            failed += 1;
        }
    }
    // Binomial(400, 0.5): mean 200, sd 10; ±60 is six standard deviations.
    assert!((140..=260).contains(&failed), "{failed} of 400 failed");

    backend.fail_fraction(1.0, Code::Internal);
    assert_eq!(
        client.unary(request("x")).await.unwrap_err().code(),
        Code::Internal
    );
    backend.clear_faults();
    client.unary(request("x")).await.unwrap();
}

#[tokio::test]
async fn health_status_reaches_check_and_watch() {
    let backend = Backend::start().await.unwrap();
    let channel = Endpoint::from(backend.uri()).connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let serving = WireStatus::Serving as i32;
    let not_serving = WireStatus::NotServing as i32;

    assert_eq!(
        health.check(check("")).await.unwrap().get_ref().status,
        serving
    );
    assert_eq!(
        health
            .check(check(ECHO_SERVICE))
            .await
            .unwrap()
            .get_ref()
            .status,
        serving
    );

    let mut watch = health
        .watch(check(ECHO_SERVICE))
        .await
        .unwrap()
        .into_inner();
    let first: HealthCheckResponse = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status, serving);

    backend.set_health(ServingStatus::NotServing).await;
    let update = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the watch stream sees the change")
        .unwrap()
        .unwrap();
    assert_eq!(update.status, not_serving);
    assert_eq!(
        health.check(check("")).await.unwrap().get_ref().status,
        not_serving
    );

    // Faults never touch health checks, and health never touches Echo.
    backend.fail_fraction(1.0, Code::Unavailable);
    backend.set_health(ServingStatus::Serving).await;
    assert_eq!(
        health.check(check("")).await.unwrap().get_ref().status,
        serving
    );
}

#[tokio::test]
async fn stop_closes_connections_and_restart_serves_again_on_the_same_port() {
    let backend = Backend::start().await.unwrap();
    let addr = backend.addr();
    let mut client = client(&backend).await;
    client.unary(request("before")).await.unwrap();
    assert_eq!(backend.connections_accepted(), 1);

    // A call in flight when the backend stops fails rather than hangs.
    backend.set_latency(Duration::from_secs(30));
    let mut in_flight_client = client.clone();
    let in_flight = tokio::spawn(async move { in_flight_client.unary(request("during")).await });
    while backend.calls() < 2 {
        tokio::task::yield_now().await;
    }
    backend.stop().await;
    assert!(!backend.is_running());
    let status = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the in-flight call ends when its connection closes")
        .unwrap()
        .unwrap_err();
    // Plain tonic reports a dropped connection as UNKNOWN "transport error"; towline's
    // classifier reads the transport error under it as the UNAVAILABLE it is.
    let source = std::error::Error::source(&status).expect("a transport error");
    assert_eq!(
        towline::status::code_from_error(source),
        Code::Unavailable,
        "{status:?}"
    );

    // New connections are refused while stopped.
    let refused = Endpoint::from(backend.uri()).connect().await.unwrap_err();
    assert!(towline::status::is_unprocessed(&refused), "{refused:?}");

    backend.restart().await.unwrap();
    backend.clear_faults();
    assert_eq!(backend.addr(), addr);
    let mut fresh = EchoClient::new(Endpoint::from(backend.uri()).connect().await.unwrap());
    let reply = fresh.unary(request("after")).await.unwrap();
    assert_eq!(
        reply.get_ref().call_number,
        3,
        "counters carry over a restart"
    );
    assert_eq!(backend.connections_accepted(), 2);
}

#[tokio::test]
async fn streaming_calls_work_both_ways() {
    let backend = Backend::start().await.unwrap();
    let mut client = client(&backend).await;
    let mut stream = client
        .server_stream(EchoRequest {
            message: "s".into(),
            count: 5,
            interval_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(msg) = stream.message().await.unwrap() {
        assert_eq!(msg.message, "s");
        n += 1;
    }
    assert_eq!(n, 5);

    let parts = futures::stream::iter((0..4).map(|i| EchoRequest {
        message: i.to_string(),
        payload: vec![i as u8; 3],
        ..Default::default()
    }));
    let merged = client.client_stream(parts).await.unwrap().into_inner();
    assert_eq!(merged.message, "0123");
    assert_eq!(merged.payload, vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
}

#[tokio::test]
async fn max_concurrent_streams_is_announced() {
    let backend = Backend::builder()
        .max_concurrent_streams(2)
        .start()
        .await
        .unwrap();
    backend.set_latency(Duration::from_millis(100));
    let mut client = client(&backend).await;
    // The first call makes sure the server's SETTINGS frame has arrived: before it, h2 assumes
    // no stream limit and the server would refuse the excess streams (REFUSED_STREAM).
    backend.set_latency(Duration::ZERO);
    client.unary(request("warm")).await.unwrap();
    backend.set_latency(Duration::from_millis(100));
    // Six calls over one connection that allows two streams at a time take three rounds.
    let t0 = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.unary(request("x")).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(backend.connections_accepted(), 1);
}

#[tokio::test]
async fn pushback_rides_on_injected_failures_only_while_set() {
    let backend = Backend::start().await.unwrap();
    let mut client = client(&backend).await;
    backend.set_pushback(Some("250"));
    backend.fail_next(1, Code::Unavailable);
    let status = client.unary(request("x")).await.unwrap_err();
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "250"
    );
    // Successes never carry it.
    let ok = client.unary(request("x")).await.unwrap();
    assert!(ok.metadata().get("grpc-retry-pushback-ms").is_none());
    // Sent as given, malformed or not.
    backend.set_pushback(Some("-1"));
    backend.fail_next(1, Code::Unavailable);
    let status = client.unary(request("x")).await.unwrap_err();
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "-1"
    );
    backend.clear_faults();
    backend.fail_next(1, Code::Unavailable);
    let status = client.unary(request("x")).await.unwrap_err();
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_none());
}
