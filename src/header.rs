//! Reading one header of a call's head on the hot path.

use http::{HeaderMap, HeaderName, HeaderValue};

/// A map with at most this many names is searched name by name rather than by hash.
pub(crate) const SCAN_LIMIT: usize = 8;

/// The first value of `name` in `headers`, as [`HeaderMap::get`] gives it.
///
/// A gRPC call's head or trailers carry a handful of names (tonic's request: `te`,
/// `content-type`, perhaps `grpc-timeout`), and comparing each with `name` costs less than
/// hashing `name` for a lookup. This runs on every call's path, in every layer that reads
/// `grpc-status` or `grpc-timeout`; a larger map is looked up by hash as usual.
#[inline]
pub(crate) fn first<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if headers.keys_len() > SCAN_LIMIT {
        return headers.get(name);
    }
    // `iter` gives every value of a name, its first one first: the first match is what `get`
    // would find.
    headers
        .iter()
        .find_map(|(each, value)| (each == name).then_some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_maps_are_read_alike() {
        let name = HeaderName::from_static("grpc-timeout");
        for names in [
            0,
            SCAN_LIMIT - 1,
            SCAN_LIMIT,
            SCAN_LIMIT + 1,
            3 * SCAN_LIMIT,
        ] {
            let mut headers = HeaderMap::new();
            for i in 0..names {
                headers.insert(
                    HeaderName::try_from(format!("x-filler-{i}")).unwrap(),
                    HeaderValue::from_static("0"),
                );
            }
            assert_eq!(first(&headers, &name), None, "{names} names, none wanted");
            headers.append(&name, HeaderValue::from_static("1S"));
            headers.append(&name, HeaderValue::from_static("2S"));
            assert_eq!(
                first(&headers, &name),
                headers.get(&name),
                "{names} names: the first value, as `HeaderMap::get` gives it"
            );
            assert_eq!(first(&headers, &name).unwrap(), "1S");
        }
    }
}
