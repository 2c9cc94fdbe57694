//! Wall-clock time as the wire states it (round deadlines, lease renewals): milliseconds since
//! the Unix epoch. Durations between local events use monotonic `Instant`s instead.

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
