//! DNS discovery against a real DNS server: hickory-server serving an in-memory zone on loopback
//! (UDP and TCP, a free port), queried by `Dns` through `.nameserver(addr)`.
#![cfg(feature = "dns")]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use tokio::net::{TcpListener, UdpSocket};
use towline::BoxError;
use towline::discover::dns::{Dns, EmptyAnswer, ResolveError};
use towline::discover::{Change, Discover, Update};

const ORIGIN: &str = "test.towline.";
/// Long enough for a loaded CI machine; every wait is for a signal, bounded by this.
const WAIT: Duration = Duration::from_secs(15);

/// An authoritative DNS server for `test.towline.` whose records tests change while it runs.
struct DnsServer {
    zone: Arc<InMemoryZoneHandler>,
    addr: SocketAddr,
    server: Option<Server<Catalog>>,
}

impl DnsServer {
    async fn start() -> DnsServer {
        let origin = Name::from_ascii(ORIGIN).unwrap();
        let zone = InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            Name::from_ascii("ns.test.towline.").unwrap(),
            Name::from_ascii("admin.test.towline.").unwrap(),
            1,
            60,
            60,
            60,
            0, // negative answers are not cached
        );
        assert!(
            zone.upsert(Record::from_rdata(origin, 0, RData::SOA(soa)), 1)
                .await
        );
        // A free port for UDP and TCP both.
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = TcpListener::bind(addr).await {
                let mut server = DnsServer {
                    zone: Arc::new(zone),
                    addr,
                    server: None,
                };
                server.serve(udp, tcp);
                return server;
            }
        }
        panic!("no free port for UDP and TCP");
    }

    fn serve(&mut self, udp: UdpSocket, tcp: TcpListener) {
        let mut catalog = Catalog::new();
        let origin = LowerName::from(Name::from_ascii(ORIGIN).unwrap());
        catalog.upsert(origin, vec![self.zone.clone() as Arc<dyn ZoneHandler>]);
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 16);
        self.server = Some(server);
    }

    async fn stop(&mut self) {
        let mut server = self.server.take().expect("server running");
        server.shutdown_gracefully().await.unwrap();
    }

    async fn restart(&mut self) {
        assert!(self.server.is_none(), "stop before restart");
        let udp = UdpSocket::bind(self.addr).await.unwrap();
        let tcp = TcpListener::bind(self.addr).await.unwrap();
        self.serve(udp, tcp);
    }

    /// Replaces every record of `rtype` at `name` with `rdatas` (TTL 0: never cached).
    async fn set(&self, name: &str, rtype: RecordType, rdatas: Vec<RData>) {
        let name = Name::from_ascii(name).unwrap();
        self.zone
            .records_mut()
            .await
            .remove(&RrKey::new(LowerName::from(&name), rtype));
        for rdata in rdatas {
            assert_eq!(rdata.record_type(), rtype);
            assert!(
                self.zone
                    .upsert(Record::from_rdata(name.clone(), 0, rdata), 1)
                    .await
            );
        }
    }

    async fn set_ips(&self, name: &str, ips: &[&str]) {
        let ips: Vec<IpAddr> = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        let v4 = ips.iter().filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(RData::A(A(*v4))),
            IpAddr::V6(_) => None,
        });
        let v6 = ips.iter().filter_map(|ip| match ip {
            IpAddr::V6(v6) => Some(RData::AAAA(AAAA(*v6))),
            IpAddr::V4(_) => None,
        });
        self.set(name, RecordType::A, v4.collect()).await;
        self.set(name, RecordType::AAAA, v6.collect()).await;
    }

    /// `(weight, port, target)` records, all priority 0.
    async fn set_srv(&self, name: &str, records: &[(u16, u16, &str)]) {
        let rdatas = records
            .iter()
            .map(|(weight, port, target)| {
                RData::SRV(SRV::new(
                    0,
                    *weight,
                    *port,
                    Name::from_ascii(target).unwrap(),
                ))
            })
            .collect();
        self.set(name, RecordType::SRV, rdatas).await;
    }
}

fn dns_a(server: &DnsServer, host: &str, port: u16) -> Dns {
    Dns::a_aaaa(host, port)
        .nameserver(server.addr)
        .interval(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// The next item, bounded by [`WAIT`].
async fn next(dns: &mut Dns) -> Result<Update, BoxError> {
    tokio::time::timeout(WAIT, dns.next())
        .await
        .expect("no discovery item within the wait")
        .expect("the DNS stream never ends")
}

/// Change as (uri, Some(weight)) for an insert, (uri, None) for a remove.
fn plain(change: Update) -> (String, Option<u32>) {
    match change {
        Change::Insert(uri, endpoint) => (uri.to_string(), Some(endpoint.weight)),
        Change::Remove(uri) => (uri.to_string(), None),
    }
}

async fn next_change(dns: &mut Dns) -> (String, Option<u32>) {
    plain(next(dns).await.expect("a change, not an error"))
}

async fn changes(dns: &mut Dns, n: usize) -> Vec<(String, Option<u32>)> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next_change(dns).await);
    }
    out
}

fn ins(uri: &str, weight: u32) -> (String, Option<u32>) {
    (uri.to_string(), Some(weight))
}

fn rm(uri: &str) -> (String, Option<u32>) {
    (uri.to_string(), None)
}

/// After the wanted changes, no further change over two more resolutions (1 s apart). A
/// resolution error in that time (say a query timing out on a loaded machine) is no change.
async fn quiet(dns: &mut Dns) {
    let more = tokio::time::timeout(Duration::from_millis(2500), async {
        loop {
            match dns.next().await {
                Some(Err(err)) => assert!(err.downcast_ref::<ResolveError>().is_some(), "{err}"),
                other => return other,
            }
        }
    })
    .await;
    assert!(more.is_err(), "unexpected change: {more:?}");
}

fn assert_discover(_: &impl Discover) {}

#[tokio::test]
async fn a_and_aaaa_records_are_inserted() {
    let server = DnsServer::start().await;
    server
        .set_ips("svc.test.towline.", &["127.0.0.2", "127.0.0.1", "::1"])
        .await;
    let mut dns = dns_a(&server, "svc.test.towline.", 50051);
    assert_discover(&dns);
    assert_eq!(
        changes(&mut dns, 3).await,
        [
            ins("http://127.0.0.1:50051/", 1),
            ins("http://127.0.0.2:50051/", 1),
            ins("http://[::1]:50051/", 1),
        ]
    );
    quiet(&mut dns).await;
}

#[tokio::test]
async fn a_change_between_resolutions_is_exactly_one_insert_and_one_remove() {
    let server = DnsServer::start().await;
    server
        .set_ips("svc.test.towline.", &["127.0.0.1", "127.0.0.2"])
        .await;
    let mut dns = Dns::a_aaaa("svc.test.towline.", 8080)
        .scheme("https")
        .nameserver(server.addr)
        .interval(Duration::from_secs(1))
        .build()
        .unwrap();
    assert_eq!(
        changes(&mut dns, 2).await,
        [
            ins("https://127.0.0.1:8080/", 1),
            ins("https://127.0.0.2:8080/", 1)
        ]
    );
    server
        .set_ips("svc.test.towline.", &["127.0.0.2", "127.0.0.3"])
        .await;
    assert_eq!(
        changes(&mut dns, 2).await,
        [
            ins("https://127.0.0.3:8080/", 1),
            rm("https://127.0.0.1:8080/")
        ]
    );
    quiet(&mut dns).await;
}

#[tokio::test]
async fn srv_records_give_ports_and_weights() {
    let server = DnsServer::start().await;
    server
        .set_ips("a.test.towline.", &["127.0.0.10", "::10"])
        .await;
    server.set_ips("b.test.towline.", &["127.0.0.11"]).await;
    server
        .set_srv(
            "_grpc._tcp.svc.test.towline.",
            &[
                (10, 50051, "a.test.towline."),
                (0, 50052, "b.test.towline."),
            ],
        )
        .await;
    let mut dns = Dns::srv("_grpc._tcp.svc.test.towline.")
        .nameserver(server.addr)
        .interval(Duration::from_secs(1))
        .build()
        .unwrap();
    assert_eq!(
        changes(&mut dns, 3).await,
        [
            ins("http://127.0.0.10:50051/", 10),
            ins("http://127.0.0.11:50052/", 1), // SRV weight 0 → 1
            ins("http://[::10]:50051/", 10),
        ]
    );
    // A weight change is a re-insert of just the addresses it affects.
    server
        .set_srv(
            "_grpc._tcp.svc.test.towline.",
            &[
                (25, 50051, "a.test.towline."),
                (0, 50052, "b.test.towline."),
            ],
        )
        .await;
    assert_eq!(
        changes(&mut dns, 2).await,
        [
            ins("http://127.0.0.10:50051/", 25),
            ins("http://[::10]:50051/", 25),
        ]
    );
    // A target moving to another port is a new endpoint and a removed one.
    server
        .set_srv(
            "_grpc._tcp.svc.test.towline.",
            &[
                (25, 50051, "a.test.towline."),
                (3, 50053, "b.test.towline."),
            ],
        )
        .await;
    assert_eq!(
        changes(&mut dns, 2).await,
        [
            ins("http://127.0.0.11:50053/", 3),
            rm("http://127.0.0.11:50052/"),
        ]
    );
    // Two records reaching the same ip:port add their weights; a "." target adds nothing.
    server.set_ips("a2.test.towline.", &["127.0.0.10"]).await;
    server
        .set_srv(
            "_grpc._tcp.svc.test.towline.",
            &[
                (25, 50051, "a.test.towline."),
                (3, 50053, "b.test.towline."),
                (5, 50051, "a2.test.towline."),
                (100, 50054, "."),
            ],
        )
        .await;
    assert_eq!(
        next_change(&mut dns).await,
        ins("http://127.0.0.10:50051/", 30)
    );
    quiet(&mut dns).await;
}

#[tokio::test]
async fn a_stopped_server_keeps_the_last_set_and_discovery_recovers() {
    let mut server = DnsServer::start().await;
    server.set_ips("svc.test.towline.", &["127.0.0.1"]).await;
    // A short resolution timeout so the outage shows quickly (UDP to a closed port is silence).
    let mut dns = Dns::a_aaaa("svc.test.towline.", 50051)
        .nameserver(server.addr)
        .interval(Duration::from_secs(1))
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    assert_eq!(
        next_change(&mut dns).await,
        ins("http://127.0.0.1:50051/", 1)
    );

    server.stop().await;
    // The address moves while the server is down; discovery cannot know yet.
    server.set_ips("svc.test.towline.", &["127.0.0.5"]).await;
    for _ in 0..2 {
        let err = next(&mut dns)
            .await
            .expect_err("resolution must fail while the server is down");
        let err = err.downcast::<ResolveError>().expect("a ResolveError");
        assert!(!err.is_no_records(), "{err}");
        assert!(err.to_string().contains("svc.test.towline"), "{err}");
    }

    server.restart().await;
    // Errors may still arrive until the first resolution after the restart; then exactly the
    // move, and never a remove before it (nothing was removed during the outage).
    let first = loop {
        match next(&mut dns).await {
            Err(err) => assert!(err.downcast_ref::<ResolveError>().is_some(), "{err}"),
            Ok(change) => break plain(change),
        }
    };
    assert_eq!(first, ins("http://127.0.0.5:50051/", 1));
    assert_eq!(next_change(&mut dns).await, rm("http://127.0.0.1:50051/"));
    quiet(&mut dns).await;
}

#[tokio::test]
async fn an_empty_answer_keeps_the_last_set_by_default() {
    let server = DnsServer::start().await;
    server.set_ips("svc.test.towline.", &["127.0.0.1"]).await;
    let mut dns = dns_a(&server, "svc.test.towline.", 50051);
    assert_eq!(
        next_change(&mut dns).await,
        ins("http://127.0.0.1:50051/", 1)
    );
    server.set_ips("svc.test.towline.", &[]).await;
    let err = next(&mut dns)
        .await
        .expect_err("an empty answer is an error by default");
    let err = err.downcast::<ResolveError>().unwrap();
    assert!(err.is_no_records(), "{err}");
    // The name never existed: NXDOMAIN, same treatment.
    let mut missing = dns_a(&server, "nothing.test.towline.", 50051);
    let err = next(&mut missing)
        .await
        .expect_err("NXDOMAIN is an error by default");
    assert!(err.downcast::<ResolveError>().unwrap().is_no_records());
    // And the records coming back is no change at all for the first stream: nothing was removed.
    server.set_ips("svc.test.towline.", &["127.0.0.1"]).await;
    quiet(&mut dns).await;
}

#[tokio::test]
async fn an_empty_answer_removes_all_when_configured() {
    let server = DnsServer::start().await;
    server
        .set_ips("svc.test.towline.", &["127.0.0.1", "127.0.0.2"])
        .await;
    let mut dns = Dns::a_aaaa("svc.test.towline.", 50051)
        .nameserver(server.addr)
        .interval(Duration::from_secs(1))
        .on_empty_answer(EmptyAnswer::RemoveAll)
        .build()
        .unwrap();
    assert_eq!(changes(&mut dns, 2).await.len(), 2);
    server.set_ips("svc.test.towline.", &[]).await;
    assert_eq!(
        changes(&mut dns, 2).await,
        [rm("http://127.0.0.1:50051/"), rm("http://127.0.0.2:50051/")]
    );
    quiet(&mut dns).await;
}

#[test]
fn bad_config_fails_at_build_naming_the_field() {
    let ns: SocketAddr = "127.0.0.1:53".parse().unwrap();
    // The one error type of every towline builder, so `?` joins it with the others.
    let field = |built: Result<Dns, towline::ConfigError>| built.unwrap_err().field().to_owned();
    let err = Dns::a_aaaa("svc.test.towline.", 80)
        .interval(Duration::ZERO)
        .nameserver(ns)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "dns.interval");
    assert_eq!(err.to_string(), "dns.interval: must be greater than zero");
    assert_eq!(field(Dns::srv("").nameserver(ns).build()), "dns.name");
    assert_eq!(
        field(Dns::a_aaaa("", 80).nameserver(ns).build()),
        "dns.host"
    );
    assert_eq!(
        field(Dns::a_aaaa("a..b", 80).nameserver(ns).build()),
        "dns.host"
    );
    assert_eq!(
        field(Dns::a_aaaa("svc.test.towline.", 0).nameserver(ns).build()),
        "dns.port"
    );
    let zero_timeout = Dns::srv("x.test.towline.").timeout(Duration::ZERO);
    assert_eq!(field(zero_timeout.nameserver(ns).build()), "dns.timeout");
    let bad_scheme = Dns::srv("x.test.towline.").scheme("not a scheme");
    assert_eq!(field(bad_scheme.nameserver(ns).build()), "dns.scheme");
}

#[tokio::test]
async fn a_supplied_resolver_is_used_here_over_tcp_only() {
    use towline::discover::dns::hickory_resolver::TokioResolver;
    use towline::discover::dns::hickory_resolver::config::{
        ConnectionConfig, NameServerConfig, ResolverConfig,
    };
    use towline::discover::dns::hickory_resolver::net::runtime::TokioRuntimeProvider;

    let server = DnsServer::start().await;
    server.set_ips("svc.test.towline.", &["127.0.0.9"]).await;
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = server.addr.port();
    let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
        server.addr.ip(),
        true,
        vec![tcp],
    )]);
    let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .build()
        .unwrap();
    let mut dns = Dns::a_aaaa("svc.test.towline.", 7000)
        .resolver(resolver.clone())
        .build()
        .unwrap();
    assert_eq!(
        next_change(&mut dns).await,
        ins("http://127.0.0.9:7000/", 1)
    );

    let both = Dns::a_aaaa("svc.test.towline.", 7000)
        .nameserver(server.addr)
        .resolver(resolver)
        .build()
        .unwrap_err();
    assert_eq!(both.field(), "dns.resolver");
}

#[tokio::test]
async fn dropping_the_stream_stops_its_work() {
    let server = DnsServer::start().await;
    server.set_ips("svc.test.towline.", &["127.0.0.1"]).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let mut dns = dns_a(&server, "svc.test.towline.", 50051);
    assert_eq!(
        next_change(&mut dns).await,
        ins("http://127.0.0.1:50051/", 1)
    );
    drop(dns);
    // No signal exists for "a task ended" across crates: poll the count, bounded.
    let settled = tokio::time::timeout(WAIT, async {
        while metrics.num_alive_tasks() > before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "{} tasks alive after the drop, {before} before the stream existed",
        metrics.num_alive_tasks()
    );
}

/// DNS discovery feeding the balancer: SRV records name real backends (by port), and a record
/// removed from DNS takes its backend out of rotation.
#[tokio::test]
async fn srv_discovery_drives_the_balancer() {
    use towline::balance::{BalanceConfig, BalanceLayer, EndpointState, WeightedRoundRobin};
    use towline::connect::Connect;
    use towline::testkit::Backend;
    use towline::testkit::pb::{EchoRequest, echo_client::EchoClient};

    let backends = Backend::start_many(2).await.unwrap();
    let server = DnsServer::start().await;
    server.set_ips("local.test.towline.", &["127.0.0.1"]).await;
    let (p0, p1) = (backends[0].addr().port(), backends[1].addr().port());
    server
        .set_srv(
            "_grpc._tcp.echo.test.towline.",
            &[
                (3, p0, "local.test.towline."),
                (1, p1, "local.test.towline."),
            ],
        )
        .await;
    let dns = Dns::srv("_grpc._tcp.echo.test.towline.")
        .nameserver(server.addr)
        .interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let config = BalanceConfig::builder()
        .strategy(WeightedRoundRobin::new())
        .build()
        .unwrap();
    let balance = tower::ServiceBuilder::new()
        .layer(BalanceLayer::new(dns, config))
        .service(Connect::new());
    let ready = |n: usize| {
        move |s: &[towline::balance::EndpointSnapshot]| {
            s.len() == n && s.iter().all(|e| e.state == EndpointState::Ready)
        }
    };
    tokio::time::timeout(WAIT, balance.wait_until(ready(2)))
        .await
        .unwrap();

    // SRV weights 3:1 reach the weighted strategy.
    let mut client = EchoClient::new(balance.clone());
    let mut served = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..400 {
        let backend = client
            .unary(EchoRequest::default())
            .await
            .unwrap()
            .into_inner()
            .backend;
        *served.entry(backend).or_default() += 1;
    }
    assert_eq!(served["backend-0"], 300, "{served:?}");
    assert_eq!(served["backend-1"], 100, "{served:?}");

    // backend-1 leaves DNS: the next resolution removes it from the balancer.
    server
        .set_srv(
            "_grpc._tcp.echo.test.towline.",
            &[(3, p0, "local.test.towline.")],
        )
        .await;
    tokio::time::timeout(WAIT, balance.wait_until(ready(1)))
        .await
        .unwrap();
    let before = backends[1].calls();
    for _ in 0..20 {
        client.unary(EchoRequest::default()).await.unwrap();
    }
    assert_eq!(backends[1].calls(), before);
}
