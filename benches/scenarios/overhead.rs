//! `overhead`: what one tower layer costs on a real gRPC call.
//!
//! The same load through a bare `Channel` and through that channel under a pass-through layer
//! (forwards `poll_ready` and `call`, nothing else), interleaved round by round, at one call in
//! flight (latency-bound) and at 64 (CPU-bound on two cores).

use std::task::{Context, Poll};

use tower::{Layer, Service, ServiceExt};
use towline::connect::Connect;
use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};
use towline::testkit::{Backend, Load};

use crate::support::{BoxScenario, Figures, Settings, micros, print_table};

const CONCURRENCY: [usize; 2] = [1, 64];

pub fn run(settings: Settings) -> BoxScenario {
    Box::pin(async move {
        let backend = Backend::start().await?;
        let channel = Connect::new().oneshot(backend.uri()).await?;
        let bare = EchoClient::new(channel.clone());
        let layered = EchoClient::new(PassThroughLayer.layer(channel));

        let mut rows = Vec::new();
        let mut json = Vec::new();
        for concurrency in CONCURRENCY {
            let load = Load::new(concurrency)
                .calls(settings.calls)
                .duration(settings.duration);
            // Warm both paths (connection, allocator, branch predictors) before measuring.
            let warm = Load::new(concurrency).calls(500);
            drive(&warm, bare.clone()).await;
            drive(&warm, layered.clone()).await;

            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..settings.rounds {
                a.push(drive(&load, bare.clone()).await);
                b.push(drive(&load, layered.clone()).await);
            }
            let (a, b) = (Figures::median(&a), Figures::median(&b));
            if a.failed + b.failed > 0 {
                return Err(format!("{} calls failed", a.failed + b.failed).into());
            }
            let ratio = |x: f64, y: f64| y / x.max(1e-9);
            let rps_ratio = ratio(a.rps, b.rps);
            let p50_ratio = ratio(a.p50.as_secs_f64(), b.p50.as_secs_f64());
            let p99_ratio = ratio(a.p99.as_secs_f64(), b.p99.as_secs_f64());
            for (variant, f) in [("channel", &a), ("pass-through layer", &b)] {
                rows.push(vec![
                    variant.to_string(),
                    concurrency.to_string(),
                    format!("{:.0}", f.rps),
                    micros(f.p50),
                    micros(f.p99),
                ]);
            }
            rows.push(vec![
                "ratio layer/channel".into(),
                concurrency.to_string(),
                format!("{rps_ratio:.3}"),
                format!("{p50_ratio:.3}"),
                format!("{p99_ratio:.3}"),
            ]);
            json.push(serde_json::json!({
                "concurrency": concurrency,
                "channel": a.json(),
                "pass_through_layer": b.json(),
                "ratio": { "rps": rps_ratio, "p50": p50_ratio, "p99": p99_ratio },
            }));
        }
        print_table(&["variant", "in flight", "req/s", "p50", "p99"], &rows);
        Ok(serde_json::json!({ "rounds": settings.rounds, "runs": json }))
    })
}

pub async fn drive<S>(load: &Load, client: EchoClient<S>) -> Figures
where
    S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<towline::BoxError> + Send,
    S::Error: Into<towline::BoxError>,
{
    let report = load
        .run(move |_| {
            let mut client = client.clone();
            async move {
                client
                    .unary(EchoRequest {
                        payload: vec![0; 64],
                        ..Default::default()
                    })
                    .await?;
                Ok(())
            }
        })
        .await;
    Figures::from(&report)
}

/// Forwards everything: the cost measured is the layer's existence, nothing it does.
#[derive(Debug, Clone, Copy)]
struct PassThroughLayer;

impl<S> Layer<S> for PassThroughLayer {
    type Service = PassThrough<S>;
    fn layer(&self, inner: S) -> PassThrough<S> {
        PassThrough(inner)
    }
}

#[derive(Debug, Clone)]
struct PassThrough<S>(S);

impl<S: Service<R>, R> Service<R> for PassThrough<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> S::Future {
        self.0.call(req)
    }
}
