//! Secure-aggregation sessions where one message, either way, is altered:
//! the nodes and the coordinator refuse it or carry on, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    confer_fuzz::secagg_messages(data);
});
