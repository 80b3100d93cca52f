#![no_main]
//! See `cmd_ipc_native::fuzzing::ring_state` for the invariants checked.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cmd_ipc_native::fuzzing::ring_state(data));
