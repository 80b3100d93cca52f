#![no_main]
//! See `cmd_ipc_core::fuzzing::frame_decode` for the invariants checked.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cmd_ipc_core::fuzzing::frame_decode(data));
