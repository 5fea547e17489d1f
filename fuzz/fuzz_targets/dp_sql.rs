//! The DP SQL front end as the coordinator and a node run it on text from
//! anyone: parse, then compile (coordinator and node) or check a query over
//! public tables. Any input may be refused; none may panic, overflow the
//! stack or hang.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data) {
        confer_fuzz::dp_sql(sql);
    }
});
