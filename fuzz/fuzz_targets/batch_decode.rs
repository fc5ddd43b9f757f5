//! The binding's MessagePack batch decoder, then the rules every consumer applies: any
//! input is refused with an error or accepted, never a panic, and an accepted batch
//! validates without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_binding::codec::decode;
use sluice_binding::validate::{Limits, validate};

/// 2026-12-01T00:00:00Z: a fixed clock, so a crash reproduces.
const NOW_NS: i64 = 1_796_083_200_000_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = decode(data) {
        let _ = validate(&batch, NOW_NS, &Limits::default());
    }
});
