//! Fuzz target `stage_update`: see `shoal_fuzz::check_stage_update` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shoal_fuzz::check_stage_update(data);
});
