//! Transports through the one-call client's balancer and pools: Unix domain sockets (and
//! Linux abstract sockets), TLS with a self-signed certificate, and connector settings that
//! compose.

use std::time::Duration;

use tokio::time::timeout;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response};
use tower::ServiceExt;
use towline::Channel;
use towline::balance::EndpointState;
use towline::connect::Connect;
use towline::pool::PoolConfig;

/// A real tonic server (grpc.health.v1) on `listener`, reporting the service `who` as SERVING.
/// Served until the returned handle is dropped... or aborted by the test's end.
async fn health_server<I, IO, IE>(incoming: I) -> tokio::task::JoinHandle<()>
where
    I: futures::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<towline::BoxError>,
{
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("who", ServingStatus::Serving)
        .await;
    tokio::spawn(async move {
        Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
            .expect("the server runs");
    })
}

/// One `Check("who")` through `channel`.
async fn check(channel: &Channel) -> Result<i32, tonic::Status> {
    let mut client = HealthClient::new(channel.clone());
    let request = HealthCheckRequest {
        service: "who".into(),
    };
    let reply = timeout(Duration::from_secs(10), client.check(request))
        .await
        .expect("the call ends")?;
    Ok(reply.into_inner().status)
}

const SERVING: i32 = health_check_response::ServingStatus::Serving as i32;

async fn ready(channel: &Channel) {
    timeout(
        Duration::from_secs(10),
        channel
            .balance()
            .wait_until(|e| e.len() == 1 && e[0].state == EndpointState::Ready),
    )
    .await
    .unwrap_or_else(|_| panic!("not ready: {:#?}", channel.snapshot()));
}

#[tokio::test]
async fn a_unix_socket_target_goes_through_balance_and_pool() {
    let dir = std::env::temp_dir().join(format!("towline-uds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("health.sock");
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = health_server(tokio_stream::wrappers::UnixListenerStream::new(listener)).await;

    for target in [
        format!("unix:{}", path.display()),
        format!("unix://{}", path.display()),
    ] {
        let channel = Channel::builder(&target)
            .unwrap()
            .pool(PoolConfig::builder().size(2).build().unwrap())
            .build()
            .unwrap();
        assert_eq!(check(&channel).await.unwrap(), SERVING);
        ready(&channel).await;
        // The endpoint's key, the balancer's health Watch and the pool all speak Unix.
        let key = format!("unix://localhost{}", path.display());
        assert_eq!(channel.snapshot()[0].uri, key.as_str());
        let stats = channel.pool_stats();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].0, key.as_str());
        assert_eq!(stats[0].1.open, 2, "{:?}", stats[0].1);
    }
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_relative_unix_path_is_relative_to_the_working_directory() {
    // Relative to the test's working directory (the crate root): a name no one else uses.
    let name = format!("target/towline-rel-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&name);
    let listener = tokio::net::UnixListener::bind(&name).unwrap();
    let server = health_server(tokio_stream::wrappers::UnixListenerStream::new(listener)).await;
    let channel = Channel::builder(&format!("unix:{name}"))
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(check(&channel).await.unwrap(), SERVING);
    assert_eq!(
        channel.snapshot()[0].uri,
        format!("unix://localhost/./{name}").as_str()
    );
    server.abort();
    let _ = std::fs::remove_file(&name);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_abstract_socket_target_goes_through_balance_and_pool() {
    let name = format!("towline-test-{}", std::process::id());
    let listener = tokio::net::UnixListener::bind(format!("\0{name}")).unwrap();
    let server = health_server(tokio_stream::wrappers::UnixListenerStream::new(listener)).await;
    let channel = Channel::builder(&format!("unix-abstract:{name}"))
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(check(&channel).await.unwrap(), SERVING);
    ready(&channel).await;
    assert_eq!(
        channel.snapshot()[0].uri,
        format!("unix-abstract://localhost/{name}").as_str()
    );
    // A name nobody listens on: Down, with the reason, and calls fail UNAVAILABLE.
    let missing = Channel::builder(&format!("unix-abstract:{name}-missing"))
        .unwrap()
        .balance(|b| b.endpoint_wait(Duration::from_millis(200)))
        .build()
        .unwrap();
    let status = check(&missing).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // The reason names the socket.
    let key = format!("unix-abstract://localhost/{name}-missing");
    assert!(status.message().contains(&key), "{status:?}");
    server.abort();
}

#[tokio::test]
async fn pool_settings_survive_a_later_configure() {
    let pool = PoolConfig::builder()
        .connect_timeout(Duration::from_millis(1234))
        .keepalive(Duration::from_secs(30), Duration::from_secs(7))
        .build()
        .unwrap();
    let connect = pool
        .connector()
        .configure(|endpoint| endpoint.tcp_keepalive(Some(Duration::from_secs(9))));
    let endpoint = connect
        .try_endpoint(http::Uri::from_static("http://127.0.0.1:1"))
        .unwrap();
    // The pool's connect timeout is kept (a configure used to replace it) …
    assert_eq!(
        endpoint.get_connect_timeout(),
        Some(Duration::from_millis(1234))
    );
    // … and so is the later configure's own setting.
    assert_eq!(endpoint.get_tcp_keepalive(), Some(Duration::from_secs(9)));
    // The keepalive is the connector's own setting, kept through any configure.
    let debug = format!("{connect:?}");
    assert!(
        debug.contains("interval: 30s") && debug.contains("timeout: 7s"),
        "{debug}"
    );

    // Through the channel builder: the pool's timeout, then the user's configure.
    let parts = Channel::builder("ipv4:127.0.0.1:1")
        .unwrap()
        .pool(pool)
        .connect(|c| c.configure(|e| e.tcp_keepalive(Some(Duration::from_secs(11)))))
        .into_parts()
        .unwrap();
    let endpoint = parts
        .connect
        .try_endpoint(http::Uri::from_static("http://127.0.0.1:1"))
        .unwrap();
    assert_eq!(
        endpoint.get_connect_timeout(),
        Some(Duration::from_millis(1234))
    );
    assert_eq!(endpoint.get_tcp_keepalive(), Some(Duration::from_secs(11)));
}

#[tokio::test]
async fn a_failing_configure_after_the_pool_settings_still_fails_the_connect() {
    let connect = PoolConfig::default()
        .connector()
        .try_configure(|_| Err::<tonic::transport::Endpoint, _>("no certificate"));
    let err = connect
        .oneshot(http::Uri::from_static("http://127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(
        towline::status::describe_error(&err)
            .contains("Connect::try_configure failed: no certificate"),
        "{err:?}"
    );
}

#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

    /// A TLS server with a fresh self-signed certificate for `localhost` and 127.0.0.1; its
    /// address and the certificate (PEM) to trust.
    async fn tls_server() -> (std::net::SocketAddr, String, tokio::task::JoinHandle<()>) {
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        let cert_pem = cert.cert.pem();
        let key_pem = cert.signing_key.serialize_pem();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("who", ServingStatus::Serving)
            .await;
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(&cert_pem, &key_pem));
        let server = tokio::spawn(async move {
            Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (addr, cert_pem, server)
    }

    #[tokio::test]
    async fn tls_by_one_call_against_a_self_signed_server() {
        let (addr, cert, server) = tls_server().await;
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cert));
        let channel = Channel::builder(&format!("ipv4:{addr}"))
            .unwrap()
            .tls(tls)
            .build()
            .unwrap();
        assert_eq!(check(&channel).await.unwrap(), SERVING);
        // The scheme was set for us.
        assert_eq!(
            channel.snapshot()[0].uri,
            format!("https://{addr}").as_str()
        );

        // Without TLS the same server is unreachable (the balancer says why), not garbled.
        let plain = Channel::builder(&format!("ipv4:{addr}"))
            .unwrap()
            .balance(|b| b.endpoint_wait(Duration::from_millis(300)))
            .build()
            .unwrap();
        assert!(check(&plain).await.is_err());

        // A certificate we do not trust: the handshake fails, the call is UNAVAILABLE.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let untrusted = Channel::builder(&format!("ipv4:{addr}"))
            .unwrap()
            .tls(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(other.cert.pem())))
            .balance(|b| b.endpoint_wait(Duration::from_millis(300)))
            .build()
            .unwrap();
        let status = check(&untrusted).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        server.abort();
    }

    #[tokio::test]
    async fn tls_over_http_or_a_unix_socket_fails_saying_so() {
        let err = Channel::builder("unix:/run/app.sock")
            .unwrap()
            .tls(ClientTlsConfig::new())
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "tls");

        // A URL where a target belongs is refused with the way to write it.
        let err = Channel::builder("https://greeter:50051").unwrap_err();
        assert!(
            err.problem().contains("and set TLS with `.tls(..)`"),
            "{err}"
        );
        let err = Channel::builder("http://greeter:50051").unwrap_err();
        assert!(err.problem().contains("write `dns:///host:port`"), "{err}");

        // Connect itself refuses an http:// target with TLS rather than send plaintext.
        let err = Connect::new()
            .tls(ClientTlsConfig::new())
            .oneshot(http::Uri::from_static("http://127.0.0.1:1"))
            .await
            .unwrap_err();
        let message = towline::status::describe_error(&err);
        assert!(message.contains("is not https://"), "{message}");
    }
}
