//! The write-ahead log reader on arbitrary files: it must never panic, account for every byte
//! (whole records plus a torn tail), and name an offset inside the file when it refuses one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_engine::fuzzing::{read_log, Refusal};

fuzz_target!(|data: &[u8]| {
    match read_log(data) {
        Ok(log) => {
            assert_eq!(log.valid_len + log.torn_bytes, data.len() as u64);
            if log.generation.is_none() {
                assert_eq!(log.records, 0);
            }
        }
        Err(Refusal::Corrupt { offset }) => assert!(offset < data.len() as u64),
        Err(Refusal::Header) => {}
    }
});
