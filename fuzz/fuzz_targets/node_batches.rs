//! The Arrow batches a coordinator decodes from nodes: raw Arrow IPC, or a
//! real release with bytes altered, checked against the query's plan as
//! the coordinator checks every node's answer. Refused or accepted, never a
//! panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    confer_fuzz::node_batches(data);
});
