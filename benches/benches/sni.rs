//! Criterion: `sluice::proto::sni::peek_sni` on a real rustls ClientHello, whole and split over
//! small records (the Signal relay reads the SNI of every connection before choosing upstream).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use sluice::proto::sni::{SniResult, peek_sni};

/// The first flight of a rustls client connecting to `name`.
fn client_hello(name: &str) -> Vec<u8> {
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut client = ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    client.write_tls(&mut out).unwrap();
    out
}

/// The same handshake message re-framed into records of at most `size` bytes.
fn reframe(records: &[u8], size: usize) -> Vec<u8> {
    let mut message = Vec::new();
    let mut rest = records;
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        message.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    let mut out = Vec::new();
    for piece in message.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&u16::try_from(piece.len()).unwrap().to_be_bytes());
        out.extend_from_slice(piece);
    }
    out
}

fn bench(c: &mut Criterion) {
    let hello = client_hello("chat.signal.org");
    let found = SniResult::Found("chat.signal.org".into());
    assert_eq!(peek_sni(&hello), Ok(found.clone()));
    let split = reframe(&hello, 64);
    assert_eq!(peek_sni(&split), Ok(found));
    let mut g = c.benchmark_group("sni");
    g.bench_function("peek/one-record", |b| {
        b.iter(|| peek_sni(black_box(&hello)))
    });
    g.bench_function("peek/64-byte-records", |b| {
        b.iter(|| peek_sni(black_box(&split)))
    });
    let half = &hello[..hello.len() / 2];
    g.bench_function("peek/incomplete", |b| b.iter(|| peek_sni(black_box(half))));
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
