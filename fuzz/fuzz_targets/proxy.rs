//! PROXY protocol v1/v2 (`sluice::proto::proxy::parse`): the first bytes of every connection on
//! an `accept_proxy` listener, sent by whoever connects.
//!
//! Beyond "no panic", checks what the worker relies on: a complete header's length lies within
//! the input and within `MAX_HEADER_LEN`; every strict prefix of a complete header is
//! `Incomplete` (a header cut by TCP anywhere is never refused); and a parsed address pair
//! survives encoding as v1 and v2 and parsing again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::SendProxy;
use sluice::proto::proxy::{MAX_HEADER_LEN, Parsed, encode, needed_hint, parse};
use std::net::SocketAddr;

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

fuzz_target!(|data: &[u8]| {
    let result = parse(data);
    let hint = needed_hint(data);
    match result {
        Ok(Parsed::Incomplete) => assert!(hint > 0, "incomplete but nothing more needed"),
        Ok(Parsed::Complete { .. }) | Err(_) => assert_eq!(hint, 0),
    }
    let Ok(Parsed::Complete { len, header }) = result else {
        return;
    };
    assert!(len <= data.len() && len <= MAX_HEADER_LEN, "len {len}");
    // The same header alone, or followed by anything else, parses the same.
    assert_eq!(parse(&data[..len]), result);
    for cut in 0..len {
        assert_eq!(
            parse(&data[..cut]),
            Ok(Parsed::Incomplete),
            "a prefix of {cut} bytes of a {len}-byte header"
        );
    }
    // Round trip through the encoder (v4-mapped addresses are sent as IPv4).
    if let (Some(s), Some(d)) = (header.source, header.destination) {
        let (s, d) = (unmap(s), unmap(d));
        if s.is_ipv4() == d.is_ipv4() && !header.local {
            for version in [SendProxy::V1, SendProxy::V2] {
                let mut out = Vec::new();
                encode(version, Some(s), Some(d), &mut out);
                match parse(&out) {
                    Ok(Parsed::Complete { len, header: again }) => {
                        assert_eq!(len, out.len());
                        assert_eq!(again.source.map(unmap), Some(s));
                        assert_eq!(again.destination.map(unmap), Some(d));
                    }
                    other => panic!("{version:?} encoding of {s} {d} parses as {other:?}"),
                }
            }
        }
    }
});
