//! Fuzz target `segment_header`: see `shoal_fuzz::check_segment_header` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shoal_fuzz::check_segment_header(data);
});
