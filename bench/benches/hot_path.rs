//! Criterion micro benchmarks of the per-delivery hot path: encoding a 500-reading batch,
//! decoding it, and the whole worker stage (decode + validate + Arrow record batch).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_binding::codec;
use sluice_binding::model::{BatchBuilder, now_ns};
use sluice_binding::validate::Limits;

fn batch(readings: usize) -> sluice_binding::Batch {
    let now = now_ns();
    let mut b = BatchBuilder::new("bench", "bench", 0);
    for i in 0..readings {
        b.push(
            &format!("dev-{:05}", i % 100),
            &format!("metric-{}", i % 2),
            now - i as i64,
            i as f64,
        );
    }
    b.finish(now)
}

fn hot_path(c: &mut Criterion) {
    let batch = batch(500);
    let body = codec::encode(&batch).expect("encode");
    let mut g = c.benchmark_group("batch_500_readings");
    g.throughput(Throughput::Elements(500));
    g.bench_function("encode", |b| {
        b.iter(|| codec::encode(&batch).expect("encode"))
    });
    g.bench_function("decode", |b| {
        b.iter(|| codec::decode(&body).expect("decode").len())
    });
    let limits = Limits::default();
    g.bench_function("stage (decode+validate+arrow)", |b| {
        b.iter(|| {
            sluice_processors::stage::stage(&body, false, now_ns(), &limits)
                .expect("stage")
                .0
                .rows
                .num_rows()
        })
    });
    g.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
