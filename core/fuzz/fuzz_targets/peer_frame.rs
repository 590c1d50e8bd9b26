//! Fuzz target: `gallocy_core::fuzzing::peer_frame` (see core/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gallocy_core::fuzzing::peer_frame(data);
});
