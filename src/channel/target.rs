//! gRPC target names (grpc/doc/naming.md), parsed into what a [`Channel`](super::Channel)
//! discovers, and the discovery keys (`http::Uri`s) its endpoints are known by.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::Uri;

use crate::ConfigError;

/// The port of a `dns:`, `ipv4:` or `ipv6:` target that names none (grpc/doc/naming.md).
pub const DEFAULT_PORT: u16 = 443;

/// The port of a DNS server named in a `dns://authority/...` target without one.
pub const DEFAULT_DNS_SERVER_PORT: u16 = 53;

/// A gRPC target name, as grpc-go's `grpc.NewClient` and grpc-core's channels take it
/// (grpc/doc/naming.md):
///
/// | target | meaning |
/// |---|---|
/// | `dns:///host:port`, `dns:host:port`, `host:port` | the A/AAAA records of `host`, re-resolved |
/// | `dns://10.0.0.53:53/host:port` | the same, asking that DNS server (an IP, port 53 by default) |
/// | `ipv4:10.0.0.1:50051,10.0.0.2:50051` | these addresses |
/// | `ipv6:[::1]:50051,[::2]:50051` | these addresses (`ipv6:::1` without a port) |
/// | `unix:relative/path`, `unix:/abs/path`, `unix:///abs/path` | a Unix domain socket |
/// | `unix-abstract:name` | a socket in Linux's abstract namespace |
///
/// A missing port is 443, as gRPC says. Unix paths and abstract names are percent-decoded
/// (`unix-abstract:grpc%00abstract` has a NUL in its name). Anything else is a
/// [`ConfigError`] on the field `target` that says what is wrong.
///
/// ```
/// use towline::channel::Target;
///
/// let target = Target::parse("ipv4:10.0.0.1:50051,10.0.0.2")?;
/// assert_eq!(target.to_string(), "ipv4:10.0.0.1:50051,10.0.0.2:443");
///
/// let err = Target::parse("http://greeter:50051").unwrap_err();
/// assert_eq!(err.field(), "target");
/// # Ok::<(), towline::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// `dns:[//server/]host[:port]`: the A and AAAA records of `host`, every address on `port`.
    Dns {
        /// The DNS server to ask (`dns://server/…`); `None`: the system's configuration.
        server: Option<SocketAddr>,
        /// The name to resolve (an IP literal is used as it is, with no lookup).
        host: String,
        /// The port of every address.
        port: u16,
    },
    /// `ipv4:` or `ipv6:`: a fixed list of addresses.
    Addresses(Vec<SocketAddr>),
    /// `unix:path`: a Unix domain socket at this path (relative to the working directory
    /// unless absolute).
    Unix(String),
    /// `unix-abstract:name`: a socket in the Linux abstract namespace (the name without the
    /// leading NUL the kernel uses).
    UnixAbstract(String),
}

const SCHEMES: &str = "dns, ipv4, ipv6, unix, unix-abstract";

impl Target {
    /// Parses a gRPC target name; see the [type docs](Target) for the forms.
    pub fn parse(target: &str) -> Result<Target, ConfigError> {
        let fail = |problem: String| ConfigError::new("target", format!("{target:?}: {problem}"));
        if target.trim().is_empty() {
            return Err(ConfigError::new("target", "must not be empty"));
        }
        if target.trim() != target {
            return Err(fail("has leading or trailing whitespace".into()));
        }
        let (scheme, rest) = match target.split_once(':') {
            Some((scheme, rest)) if is_scheme(scheme) => (scheme.to_ascii_lowercase(), rest),
            // `[::1]:50051`, `greeter:50051`, `greeter`: the default scheme, dns.
            _ => ("dns".to_owned(), target),
        };
        match scheme.as_str() {
            "dns" => parse_dns(rest).map_err(fail),
            "ipv4" => parse_addresses(rest, Family::V4).map_err(fail),
            "ipv6" => parse_addresses(rest, Family::V6).map_err(fail),
            "unix" => parse_unix(rest).map_err(fail),
            "unix-abstract" => parse_abstract(rest).map_err(fail),
            "http" | "https" => Err(fail(format!(
                "`{scheme}://` is a URL, not a gRPC target: write `dns:///host:port` or \
                 `ipv4:address:port`{}",
                if scheme == "https" {
                    ", and set TLS with `.tls(..)` (feature `tls`)"
                } else {
                    ""
                }
            ))),
            // `greeter:50051` parses as scheme `greeter`: gRPC reads a target whose scheme it
            // does not know as a dns name, so `host:port` keeps working. With `//` it was
            // meant as a scheme.
            _ if !rest.starts_with("//") => parse_dns(target).map_err(fail),
            _ => Err(fail(format!(
                "unknown scheme `{scheme}` (towline knows {SCHEMES})"
            ))),
        }
    }

    /// The discovery keys of a fixed target: one per address (`http://10.0.0.1:50051`, or
    /// `https://…` when `tls`), or the Unix socket's key (see [`unix_key`]). `None` for a
    /// `dns:` name, which is resolved; an IP literal in a `dns:` target is used as it is.
    pub fn fixed_endpoints(&self, tls: bool) -> Option<Vec<Uri>> {
        let scheme = if tls { "https" } else { "http" };
        let address = |addr: &SocketAddr| {
            Uri::try_from(format!("{scheme}://{addr}")).expect("a socket address is an authority")
        };
        match self {
            Target::Dns { host, port, .. } => {
                let ip = parse_ip_host(host)?;
                Some(vec![address(&SocketAddr::new(ip, *port))])
            }
            Target::Addresses(addrs) => Some(addrs.iter().map(address).collect()),
            Target::Unix(path) => Some(vec![unix_key(path)]),
            Target::UnixAbstract(name) => Some(vec![abstract_key(name)]),
        }
    }

    /// Whether it names a Unix domain socket (either kind).
    pub fn is_unix(&self) -> bool {
        matches!(self, Target::Unix(_) | Target::UnixAbstract(_))
    }
}

impl fmt::Display for Target {
    /// The canonical form: `dns:///host:port`, `dns://server/host:port`, `ipv4:a:p,b:p`,
    /// `ipv6:[a]:p`, `unix:path`, `unix-abstract:name` (names percent-encoded as needed).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Dns { server, host, port } => {
                let server = server.map(|s| s.to_string()).unwrap_or_default();
                let host = match host.parse::<Ipv6Addr>() {
                    Ok(_) => format!("[{host}]"),
                    Err(_) => host.clone(),
                };
                write!(f, "dns://{server}/{host}:{port}")
            }
            Target::Addresses(addrs) => {
                let family = if addrs.first().is_some_and(SocketAddr::is_ipv6) {
                    "ipv6"
                } else {
                    "ipv4"
                };
                let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                write!(f, "{family}:{}", list.join(","))
            }
            Target::Unix(path) => write!(f, "unix:{}", percent_encode(path)),
            Target::UnixAbstract(name) => write!(f, "unix-abstract:{}", percent_encode(name)),
        }
    }
}

/// RFC 3986 `scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// `[//server/]host[:port]`.
fn parse_dns(rest: &str) -> Result<Target, String> {
    let (server, name) = match rest.strip_prefix("//") {
        Some(after) => {
            let (authority, name) = after
                .split_once('/')
                .ok_or("`dns://` needs a `/` before the host: `dns:///host:port`")?;
            let server = if authority.is_empty() {
                None
            } else {
                Some(parse_dns_server(authority)?)
            };
            (server, name)
        }
        None => (None, rest),
    };
    let (host, port) = split_host_port(name)?;
    if host.is_empty() {
        return Err("no host to resolve".into());
    }
    if let Some(bad) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':')))
    {
        return Err(format!(
            "host {host:?} has a character a DNS name cannot have: {bad:?}"
        ));
    }
    if !cfg!(feature = "dns") && parse_ip_host(&host).is_none() {
        return Err(format!(
            "resolving {host:?} needs towline's `dns` feature (on by default), or name the \
             addresses: `ipv4:10.0.0.1:50051,…`"
        ));
    }
    Ok(Target::Dns {
        server,
        host,
        port: port.unwrap_or(DEFAULT_PORT),
    })
}

/// The authority of `dns://authority/…`: an IP address, with an optional port.
fn parse_dns_server(authority: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(ip) = parse_ip_host(authority) {
        return Ok(SocketAddr::new(ip, DEFAULT_DNS_SERVER_PORT));
    }
    Err(format!(
        "the DNS server {authority:?} must be an IP address with an optional port \
         (`dns://10.0.0.53:53/host:port`)"
    ))
}

/// An IP literal, IPv6 with or without brackets.
fn parse_ip_host(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`, or a bare IPv6 literal (no port). The host comes
/// back without brackets.
fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    if let Some(after) = s.strip_prefix('[') {
        let (host, rest) = after
            .split_once(']')
            .ok_or_else(|| format!("{s:?} opens `[` but never closes it"))?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!("[{host}] is not an IPv6 address"));
        }
        let port = match rest {
            "" => None,
            _ => Some(parse_port(rest.strip_prefix(':').ok_or_else(|| {
                format!("expected `:port` after [{host}], found {rest:?}")
            })?)?),
        };
        return Ok((host.to_owned(), port));
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Ok((s.to_owned(), None));
    }
    match s.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => Err(format!(
            "{s:?} has more than one `:`; write an IPv6 address with a port as `[addr]:port`"
        )),
        Some((host, port)) => Ok((host.to_owned(), Some(parse_port(port)?))),
        None => Ok((s.to_owned(), None)),
    }
}

fn parse_port(port: &str) -> Result<u16, String> {
    if port.is_empty() {
        return Err("missing port after `:`".into());
    }
    match port.parse::<u16>() {
        Ok(0) => Err("port 0 is not a port to connect to".into()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// `address[:port][,address[:port]…]`.
fn parse_addresses(list: &str, family: Family) -> Result<Target, String> {
    let name = match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    if list.is_empty() {
        return Err(format!("`{name}:` lists no address"));
    }
    let mut addrs = Vec::new();
    for entry in list.split(',') {
        if entry.is_empty() {
            return Err(format!("an empty entry in the `{name}:` list"));
        }
        let (host, port) = split_host_port(entry)?;
        let ip = match family {
            Family::V4 => host.parse::<Ipv4Addr>().map(IpAddr::V4).ok(),
            Family::V6 => host.parse::<Ipv6Addr>().map(IpAddr::V6).ok(),
        }
        .ok_or_else(|| format!("{entry:?} is not an {name} address"))?;
        addrs.push(SocketAddr::new(ip, port.unwrap_or(DEFAULT_PORT)));
    }
    Ok(Target::Addresses(addrs))
}

/// `path` or `//absolute_path`.
fn parse_unix(rest: &str) -> Result<Target, String> {
    if !cfg!(unix) {
        return Err("Unix domain sockets need a Unix system".into());
    }
    let path = match rest.strip_prefix("//") {
        Some(path) if path.starts_with('/') => path,
        Some(_) => {
            return Err(
                "`unix://` must be followed by an absolute path (`unix:///run/app.sock`); \
                 a relative path is `unix:relative/path`"
                    .into(),
            );
        }
        None => rest,
    };
    let path = percent_decode(path)?;
    if path.is_empty() {
        return Err("no socket path".into());
    }
    if path.contains('\0') {
        return Err("a socket path cannot hold a NUL byte (use `unix-abstract:`)".into());
    }
    Ok(Target::Unix(path))
}

fn parse_abstract(name: &str) -> Result<Target, String> {
    if !cfg!(any(target_os = "linux", target_os = "android")) {
        return Err("abstract Unix sockets exist only on Linux".into());
    }
    Ok(Target::UnixAbstract(percent_decode(name)?))
}

/// The discovery key of a Unix socket at `path`: `unix://localhost/abs/path` for an absolute
/// path, `unix://localhost/./rel/path` for a relative one, percent-encoded where a URI path
/// needs it. An `http::Uri` needs an authority after a scheme, so the key has `localhost`,
/// the authority gRPC sends to Unix sockets; [`Connect`](crate::connect::Connect) turns the
/// key back into the socket. Keys are how the balancer, pool and metrics name the endpoint.
///
/// ```
/// use towline::channel::unix_key;
/// assert_eq!(unix_key("/run/app.sock"), "unix://localhost/run/app.sock");
/// assert_eq!(unix_key("app.sock"), "unix://localhost/./app.sock");
/// ```
pub fn unix_key(path: &str) -> Uri {
    let path = match path.strip_prefix("./") {
        Some(relative) => format!("/./{relative}"),
        None if path.starts_with('/') => path.to_owned(),
        None => format!("/./{path}"),
    };
    key("unix", &path)
}

/// The discovery key of the abstract socket `name` (without its leading NUL):
/// `unix-abstract://localhost/<name, percent-encoded>`.
///
/// ```
/// use towline::channel::abstract_key;
/// assert_eq!(abstract_key("my\0app"), "unix-abstract://localhost/my%00app");
/// ```
pub fn abstract_key(name: &str) -> Uri {
    key("unix-abstract", &format!("/{name}"))
}

fn key(scheme: &str, path: &str) -> Uri {
    Uri::try_from(format!("{scheme}://localhost{}", percent_encode(path)))
        .expect("a percent-encoded path is a valid URI path")
}

/// The socket a [`unix_key`] or [`abstract_key`] names, as tonic's `Endpoint` takes it (an
/// abstract name with its leading NUL), or `None` for any other URI.
pub(crate) fn unix_socket(key: &Uri) -> Option<Result<String, String>> {
    let path = key.path();
    let decoded = |p: &str| percent_decode(p);
    match key.scheme_str()? {
        "unix" => Some(decoded(path).map(|p| match p.strip_prefix("/./") {
            Some(relative) => relative.to_owned(),
            None => p,
        })),
        "unix-abstract" => {
            Some(decoded(path.strip_prefix('/').unwrap_or(path)).map(|n| format!("\0{n}")))
        }
        _ => None,
    }
}

/// Everything but RFC 3986 `pchar` (and `/`) as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/!$&'()*+,;=:@".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding at {:?}", &s[i..]))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-decodes to bytes that are not UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(target: &str) -> Target {
        Target::parse(target).unwrap_or_else(|e| panic!("{target}: {e}"))
    }

    fn err(target: &str) -> String {
        let err = Target::parse(target).expect_err(target);
        assert_eq!(err.field(), "target");
        err.problem().to_owned()
    }

    fn dns(server: Option<&str>, host: &str, port: u16) -> Target {
        Target::Dns {
            server: server.map(|s| s.parse().unwrap()),
            host: host.into(),
            port,
        }
    }

    fn addrs(list: &[&str]) -> Target {
        Target::Addresses(list.iter().map(|a| a.parse().unwrap()).collect())
    }

    #[test]
    fn dns_forms() {
        assert_eq!(ok("dns:///greeter:50051"), dns(None, "greeter", 50051));
        assert_eq!(ok("dns:greeter:50051"), dns(None, "greeter", 50051));
        assert_eq!(
            ok("dns:///greeter.internal"),
            dns(None, "greeter.internal", 443)
        );
        assert_eq!(
            ok("dns://10.0.0.53:5353/greeter:50051"),
            dns(Some("10.0.0.53:5353"), "greeter", 50051)
        );
        assert_eq!(
            ok("dns://10.0.0.53/greeter"),
            dns(Some("10.0.0.53:53"), "greeter", 443)
        );
        assert_eq!(
            ok("dns://[::1]/greeter:1"),
            dns(Some("[::1]:53"), "greeter", 1)
        );
        assert_eq!(ok("DNS:///greeter:1"), dns(None, "greeter", 1));
        assert_eq!(ok("dns:///[::1]:50051"), dns(None, "::1", 50051));
    }

    #[test]
    fn bare_names_are_dns() {
        assert_eq!(ok("greeter:50051"), dns(None, "greeter", 50051));
        assert_eq!(ok("greeter"), dns(None, "greeter", 443));
        assert_eq!(ok("127.0.0.1:50051"), dns(None, "127.0.0.1", 50051));
        assert_eq!(ok("[::1]:50051"), dns(None, "::1", 50051));
        assert_eq!(ok("::1"), dns(None, "::1", 443));
        assert_eq!(ok("my_svc.local:8080"), dns(None, "my_svc.local", 8080));
    }

    #[test]
    fn address_lists() {
        assert_eq!(
            ok("ipv4:10.0.0.1:50051,10.0.0.2:50052"),
            addrs(&["10.0.0.1:50051", "10.0.0.2:50052"])
        );
        assert_eq!(ok("ipv4:10.0.0.1"), addrs(&["10.0.0.1:443"]));
        assert_eq!(
            ok("ipv6:[::1]:50051,[::2]:50052"),
            addrs(&["[::1]:50051", "[::2]:50052"])
        );
        assert_eq!(ok("ipv6:::1"), addrs(&["[::1]:443"]));
        assert_eq!(ok("ipv6:[fe80::1]"), addrs(&["[fe80::1]:443"]));
    }

    #[test]
    fn unix_sockets() {
        assert_eq!(
            ok("unix:relative/app.sock"),
            Target::Unix("relative/app.sock".into())
        );
        assert_eq!(
            ok("unix:/run/app.sock"),
            Target::Unix("/run/app.sock".into())
        );
        assert_eq!(
            ok("unix:///run/app.sock"),
            Target::Unix("/run/app.sock".into())
        );
        assert_eq!(
            ok("unix:/run/my%20app.sock"),
            Target::Unix("/run/my app.sock".into())
        );
        assert_eq!(
            ok("unix-abstract:towline"),
            Target::UnixAbstract("towline".into())
        );
        assert_eq!(
            ok("unix-abstract:grpc%00abstract"),
            Target::UnixAbstract("grpc\0abstract".into())
        );
        assert_eq!(ok("unix-abstract:"), Target::UnixAbstract(String::new()));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("", "must not be empty"),
            ("  ", "must not be empty"),
            (" greeter:1", "whitespace"),
            ("http://greeter:50051", "not a gRPC target"),
            ("https://greeter:50051", ".tls(..)"),
            ("consul://svc/greeter", "unknown scheme `consul`"),
            ("dns:///", "no host"),
            ("dns:///:50051", "no host"),
            ("dns://greeter:50051", "needs a `/`"),
            ("dns://ns.example/greeter", "must be an IP address"),
            ("dns:///greeter:", "missing port"),
            ("dns:///greeter:http", "not a number"),
            ("greeter:70000", "not a number from 1 to 65535"),
            ("greeter:0", "port 0"),
            ("dns:///gr eeter:1", "cannot have"),
            ("dns:///[::1", "never closes"),
            ("dns:///[::1]x", "expected `:port`"),
            ("dns:///[nope]:1", "not an IPv6 address"),
            ("a:b:c", "more than one `:`"),
            ("ipv4:", "lists no address"),
            ("ipv4:10.0.0.1:1,", "empty entry"),
            ("ipv4:greeter:50051", "not an ipv4 address"),
            ("ipv4:[::1]:1", "not an ipv4 address"),
            ("ipv4:10.0.0.1:99999", "not a number"),
            ("ipv6:10.0.0.1:1", "not an ipv6 address"),
            ("ipv6:::1:50051", "`[addr]:port`"),
            ("unix:", "no socket path"),
            ("unix://", "absolute path"),
            ("unix://run/app.sock", "absolute path"),
            ("unix:/run/a%00b", "NUL"),
            ("unix:/run/%zz", "percent-encoding"),
            ("unix:/run/%ff", "not UTF-8"),
        ];
        for (target, expected) in cases {
            let problem = err(target);
            assert!(
                problem.contains(expected),
                "{target:?}: {problem:?} does not say {expected:?}"
            );
        }
        assert_eq!(
            Target::parse("greeter:0").unwrap_err().to_string(),
            "target: \"greeter:0\": port 0 is not a port to connect to"
        );
    }

    #[test]
    fn without_the_dns_feature_only_ip_literals_resolve() {
        let named = Target::parse("dns:///greeter:1");
        let literal = Target::parse("dns:///127.0.0.1:1");
        assert!(literal.is_ok());
        if cfg!(feature = "dns") {
            assert!(named.is_ok());
        } else {
            assert!(named.unwrap_err().problem().contains("`dns` feature"));
        }
    }

    #[test]
    fn display_is_canonical_and_parses_back() {
        for (target, canonical) in [
            ("greeter:50051", "dns:///greeter:50051"),
            ("dns://10.0.0.53/greeter", "dns://10.0.0.53:53/greeter:443"),
            ("[::1]:5", "dns:///[::1]:5"),
            ("ipv4:10.0.0.1,10.0.0.2:7", "ipv4:10.0.0.1:443,10.0.0.2:7"),
            ("ipv6:::1", "ipv6:[::1]:443"),
            ("unix:///run/a b.sock", "unix:/run/a%20b.sock"),
            ("unix-abstract:x%00y", "unix-abstract:x%00y"),
        ] {
            let parsed = ok(target);
            assert_eq!(parsed.to_string(), canonical);
            assert_eq!(ok(canonical), parsed);
        }
    }

    #[test]
    fn fixed_endpoints_and_keys() {
        assert_eq!(ok("greeter:1").fixed_endpoints(false), None);
        assert_eq!(
            ok("dns:///127.0.0.1:7").fixed_endpoints(true).unwrap(),
            vec![Uri::from_static("https://127.0.0.1:7")]
        );
        assert_eq!(
            ok("ipv6:[::1]:5,::2").fixed_endpoints(false).unwrap(),
            vec![
                Uri::from_static("http://[::1]:5"),
                Uri::from_static("http://[::2]:443")
            ]
        );
        for (path, key) in [
            ("/run/app.sock", "unix://localhost/run/app.sock"),
            ("rel/app.sock", "unix://localhost/./rel/app.sock"),
            ("./app.sock", "unix://localhost/./app.sock"),
            ("/tmp/a b%.sock", "unix://localhost/tmp/a%20b%25.sock"),
        ] {
            let uri = unix_key(path);
            assert_eq!(uri, key);
            let back = unix_socket(&uri).unwrap().unwrap();
            assert_eq!(back, path.strip_prefix("./").unwrap_or(path));
        }
        let uri = abstract_key("a/b\0c");
        assert_eq!(uri, "unix-abstract://localhost/a/b%00c");
        assert_eq!(unix_socket(&uri).unwrap().unwrap(), "\0a/b\0c");
        assert_eq!(unix_socket(&Uri::from_static("http://localhost/x")), None);
    }
}
