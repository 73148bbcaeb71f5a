//! Criterion: `sluice::wire::ControlMsg` encode and decode, the line the supervisor sends every
//! worker each time an upstream name resolves differently.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::wire::ControlMsg;

fn bench(c: &mut Criterion) {
    // The WhatsApp Helm chart's six upstreams: two names on three ports each.
    let addrs: Vec<SocketAddr> = [
        "157.240.1.53:5222",
        "157.240.1.53:80",
        "157.240.1.53:443",
        "[2a03:2880:f000::1]:5222",
        "[2a03:2880:f000::1]:80",
        "[2a03:2880:f000::1]:443",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    let msg = ControlMsg::Addrs {
        listener: 3,
        entry: 0,
        addrs,
    };
    let line = msg.encode();
    assert_eq!(ControlMsg::decode(&line), Some(msg.clone()));
    let mut g = c.benchmark_group("control");
    g.bench_function("encode/addrs-6", |b| b.iter(|| black_box(&msg).encode()));
    g.bench_function("decode/addrs-6", |b| {
        b.iter(|| ControlMsg::decode(black_box(&line)))
    });
    g.bench_function("decode/drain", |b| {
        b.iter(|| ControlMsg::decode(black_box("\"drain\"\n")))
    });
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
