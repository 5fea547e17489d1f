//! Signed task envelopes as a node reads them from a Flight ticket: any
//! bytes are refused or verified, never a panic; and any task that parses
//! survives signing and verification unchanged (what the coordinator signs
//! is what the node runs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    confer_fuzz::task_envelope(data);
});
