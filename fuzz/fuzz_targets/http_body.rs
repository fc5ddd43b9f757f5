//! Ingest's HTTP body parsers (JSON and MessagePack, every timestamp precision): any body
//! is answered with a chunk or an error, never a panic. The first byte picks the format
//! and the precision, the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_binding::validate::Limits;
use sluice_ingest::http::body::{ParseOptions, parse};
use sluice_ingest::http::{Format, Precision};

/// 2026-12-01T00:00:00Z: a fixed clock, so a crash reproduces.
const NOW_NS: i64 = 1_796_083_200_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&head, body)) = data.split_first() else {
        return;
    };
    let format = if head & 1 == 0 {
        Format::Json
    } else {
        Format::MsgPack
    };
    let precision = match (head >> 1) & 3 {
        0 => Precision::Ns,
        1 => Precision::Us,
        2 => Precision::Ms,
        _ => Precision::S,
    };
    let opts = ParseOptions {
        format,
        precision,
        max_readings: 1000,
        limits: Limits::default(),
        now_ns: NOW_NS,
    };
    let _ = parse(body, &opts);
});
