//! Fuzz target `control_messages`: see `shoal_fuzz::check_control_messages` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shoal_fuzz::check_control_messages(data);
});
