//! Shoal's system tests live in `tests/*.rs`, one file per behaviour; their support is the
//! `shoal-testkit` crate.

#![forbid(unsafe_code)]
