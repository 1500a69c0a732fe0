//! [`Head`]: the request head a retrying call keeps, to send it again.

use http::request::Parts;
use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use tonic::body::Body;

/// A copy of a request's head, taken before the first attempt consumes the original.
///
/// What it costs a call, in allocations (the first attempt sends the original head):
/// - the header list: one `Vec` of name/value pairs. A `HeaderMap` clone would be two (its
///   entries and its index table); the map is rebuilt only for an attempt that is sent.
/// - the extensions, when the request has any (tonic's client always adds `GrpcMethod`):
///   `http::Extensions` can only be copied by its `Clone`, which allocates its map, the map's
///   table and one box per value. The layers below read them (the balancer's `WaitForReady`
///   and hash keys, a token bucket's `CallEnd`, the caller's own), so a retry must carry them.
///
/// Names, values and the URI are reference-counted: cloning them allocates nothing.
pub(crate) struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: Vec<(HeaderName, HeaderValue)>,
    extensions: Extensions,
}

impl Head {
    pub(crate) fn keep(parts: &Parts) -> Self {
        let mut headers = Vec::with_capacity(parts.headers.len());
        headers.extend(
            parts
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers,
            extensions: parts.extensions.clone(),
        }
    }

    pub(crate) fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// A new request with this head, its headers changed by `edit`.
    pub(crate) fn request(&self, body: Body, edit: impl FnOnce(&mut HeaderMap)) -> Request<Body> {
        let mut headers = HeaderMap::with_capacity(self.headers.len() + 2);
        for (name, value) in &self.headers {
            headers.append(name, value.clone());
        }
        edit(&mut headers);
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = headers;
        *req.extensions_mut() = self.extensions.clone();
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_head_gives_back_the_same_request_head() {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri("http://example.com/pkg.Echo/Unary")
            .version(Version::HTTP_2)
            .header("x-multi", "one")
            .header("x-multi", "two")
            .header("te", "trailers")
            .body(())
            .unwrap();
        req.extensions_mut().insert(7u32);
        let (parts, ()) = req.into_parts();
        let head = Head::keep(&parts);
        let again = head.request(Body::empty(), |h| {
            h.insert("x-added", HeaderValue::from_static("yes"));
        });
        assert_eq!(again.method(), Method::POST);
        assert_eq!(again.uri(), &parts.uri);
        assert_eq!(again.version(), Version::HTTP_2);
        let multi: Vec<_> = again.headers().get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"], "every value, in order");
        assert_eq!(again.headers()["te"], "trailers");
        assert_eq!(again.headers()["x-added"], "yes");
        assert_eq!(again.extensions().get::<u32>(), Some(&7));
    }
}
