//! Criterion: what histogram recording costs a worker — one connection's whole lifecycle
//! (accept, connect start/end, first upstream byte, close: five records and the clock reads),
//! and one publication (V2 serialization of a listener's five histograms into the shared slot).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::histo::{Histos, Region};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("histo");
    let mut h = Histos::new(1, None, 0);
    g.bench_function("record/one-connection", |b| {
        b.iter(|| {
            let mut t = h.accepted();
            h.connecting(&mut t);
            h.connected(black_box(0), &mut t);
            h.upstream_bytes(0, &mut t);
            h.closed(0, &t, black_box([64, 64]));
        })
    });
    let mut off = Histos::disabled();
    g.bench_function("record/one-connection-disabled", |b| {
        b.iter(|| {
            let mut t = off.accepted();
            off.connecting(&mut t);
            off.connected(black_box(0), &mut t);
            off.upstream_bytes(0, &mut t);
            off.closed(0, &t, black_box([64, 64]));
        })
    });
    let region = Region::new(1, 1).unwrap();
    let fd = region.fd().try_clone_to_owned().unwrap();
    let mut p = Histos::new(1, Some(Region::from_fd(fd, 1, 1).unwrap()), 0);
    for _ in 0..10_000 {
        let mut t = p.accepted();
        p.connected(0, &mut t);
        p.upstream_bytes(0, &mut t);
        p.closed(0, &t, [64, 64]);
    }
    g.bench_function("publish/one-listener", |b| {
        b.iter(|| {
            // Something recorded since the last publication, as on a busy worker.
            let mut t = p.accepted();
            p.connected(0, &mut t);
            p.publish();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
