//! The snapshot reader and restore on arbitrary files: nothing may panic. Byte 0 chooses the
//! input's shape: odd, the rest is the whole file; even, the rest is a payload wrapped in a
//! header of format version 1 to 7 (byte 1) with the right length and checksum, so that the
//! archive's validation and the restore are reached.
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_engine::fuzzing::{read_snapshot, snapshot_file};

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else { return };
    if shape % 2 == 1 {
        let _ = read_snapshot(rest);
    } else if let Some((&version, payload)) = rest.split_first() {
        let version = 1 + u16::from(version % 7);
        let file = snapshot_file(version, 3, payload);
        if let Ok(generation) = read_snapshot(&file) {
            assert_eq!(generation, 3);
        }
    }
});
