//! Criterion: the PROXY protocol parser and encoder (`sluice::proto::proxy`), which run once per
//! connection on accept-PROXY ports and on every connection to a send-PROXY upstream.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::config::SendProxy;
use sluice::proto::proxy::{Parsed, encode, parse};

fn addrs(v6: bool) -> (SocketAddr, SocketAddr) {
    if v6 {
        (
            "[2001:db8::1]:51234".parse().unwrap(),
            "[2001:db8::2]:443".parse().unwrap(),
        )
    } else {
        (
            "192.0.2.10:51234".parse().unwrap(),
            "198.51.100.7:443".parse().unwrap(),
        )
    }
}

fn header(version: SendProxy, v6: bool) -> Vec<u8> {
    let (s, d) = addrs(v6);
    let mut out = Vec::new();
    encode(version, Some(s), Some(d), &mut out);
    // What follows the header on the wire: the start of a TLS ClientHello.
    out.extend_from_slice(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
    out
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("proxy");
    for (name, version, v6) in [
        ("v1-ipv4", SendProxy::V1, false),
        ("v1-ipv6", SendProxy::V1, true),
        ("v2-ipv4", SendProxy::V2, false),
        ("v2-ipv6", SendProxy::V2, true),
    ] {
        let input = header(version, v6);
        assert!(matches!(parse(&input), Ok(Parsed::Complete { .. })));
        g.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| parse(black_box(&input)))
        });
        let (s, d) = addrs(v6);
        let mut out = Vec::with_capacity(128);
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                out.clear();
                encode(version, black_box(Some(s)), black_box(Some(d)), &mut out);
                out.len()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
