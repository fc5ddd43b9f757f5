//! The derived-event decoder the router applies to `sluice.events`: any message is a
//! refusal with a reason or an event, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_binding::event::DerivedEvent;

fuzz_target!(|data: &[u8]| {
    let _ = DerivedEvent::decode(data);
});
