//! Writing your own layer that composes with towline's.
//!
//! Every towline layer is a `tower::Layer` over `Service<http::Request<tonic::body::Body>>`, so
//! yours is too: it sees the HTTP request a tonic client builds, may change it, and hands it on.
//! This one adds a bearer token to every call and a default deadline (`grpc-timeout`) to the calls
//! that did not set their own. It only touches the request, so its response future is the inner
//! service's own: no boxing, no allocation per call.
//!
//! Run it with `cargo run --example custom_layer`.

pub mod auth {
    use std::task::{Context, Poll};
    use std::time::Duration;

    use http::{HeaderValue, Request};
    use tower::{Layer, Service};

    /// Adds `authorization: Bearer TOKEN` to every call, and `grpc-timeout` to calls without one.
    #[derive(Debug, Clone)]
    pub struct AuthLayer {
        authorization: HeaderValue,
        default_timeout: HeaderValue,
    }

    impl AuthLayer {
        /// Fails if the token is not a valid header value, so a bad token is caught at start-up
        /// rather than on every call.
        pub fn new(
            token: &str,
            default_timeout: Duration,
        ) -> Result<Self, http::header::InvalidHeaderValue> {
            let mut authorization = HeaderValue::try_from(format!("Bearer {token}"))?;
            authorization.set_sensitive(true);
            Ok(AuthLayer {
                authorization,
                default_timeout: towline::deadline::to_header_value(default_timeout),
            })
        }
    }

    impl<S> Layer<S> for AuthLayer {
        type Service = Auth<S>;

        fn layer(&self, inner: S) -> Auth<S> {
            Auth {
                inner,
                layer: self.clone(),
            }
        }
    }

    /// The service [`AuthLayer`] makes.
    #[derive(Debug, Clone)]
    pub struct Auth<S> {
        inner: S,
        layer: AuthLayer,
    }

    impl<S, B> Service<Request<B>> for Auth<S>
    where
        S: Service<Request<B>>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        // Back-pressure is the inner service's: never report ready on its behalf.
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, mut req: Request<B>) -> S::Future {
            let headers = req.headers_mut();
            headers.insert(
                http::header::AUTHORIZATION,
                self.layer.authorization.clone(),
            );
            headers
                .entry(towline::deadline::GRPC_TIMEOUT)
                .or_insert_with(|| self.layer.default_timeout.clone());
            self.inner.call(req)
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::time::Duration;
    use tower::{ServiceBuilder, ServiceExt};
    use towline::connect::Connect;
    use towline::testkit::Backend;
    use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

    let backend = Backend::start().await?;
    let channel = Connect::new().oneshot(backend.uri()).await?;

    // Your layer sits in the stack like any of towline's or tower's.
    let stack = ServiceBuilder::new()
        .layer(auth::AuthLayer::new("s3cr3t", Duration::from_secs(2))?)
        .service(channel);
    let mut client = EchoClient::new(stack);

    let reply = client.unary(EchoRequest::default()).await?.into_inner();
    println!("the backend saw:");
    for name in ["authorization", "grpc-timeout"] {
        println!("  {name}: {}", reply.request_headers[name]);
    }

    // A call with its own deadline keeps it.
    let mut req = tonic::Request::new(EchoRequest::default());
    req.set_timeout(Duration::from_millis(250));
    let reply = client.unary(req).await?.into_inner();
    println!(
        "  grpc-timeout (caller set 250 ms): {}",
        reply.request_headers["grpc-timeout"]
    );
    Ok(())
}
