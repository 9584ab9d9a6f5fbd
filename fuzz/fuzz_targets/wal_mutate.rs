//! Valid write-ahead logs with one mutation: bytes overwritten, a bit flipped, or the file cut
//! short. A mutated log is never read whole (its header and each record are checksummed); it
//! is read with a torn tail only when the damage is in its last record (or the file was cut),
//! or refused as corrupt naming an offset at or before the damage; never read silently
//! shorter.
//!
//! Input: byte 0 the record count (1 to 12), byte 1 the mutation (overwrite, flip, cut), bytes
//! 2..6 its position, byte 6 the overwrite's length (1 to 16), then the overwriting bytes, then
//! the material of the records' texts (printable ASCII, so that no text can hold a record).
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_engine::fuzzing::{read_log, sample_log, Refusal};

const HEADER: u64 = 32;

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    let count = 1 + data[0] as usize % 12;
    let mode = data[1] % 3;
    let position = u32::from_le_bytes(data[2..6].try_into().unwrap()) as usize;
    let span = 1 + data[6] as usize % 16;
    let (patch, rest) = data[7..].split_at(span.min(data.len() - 7));
    let material: String = rest.iter().map(|b| char::from(0x20 + b % 95)).collect();
    let per = material.len() / count;
    let texts: Vec<String> =
        (0..count).map(|i| material.get(i * per..(i + 1) * per).unwrap_or("").to_owned()).collect();
    let log = sample_log(1, &texts);
    let b = &log.boundaries;
    let len = log.bytes.len();
    // Unmutated, it reads whole.
    let whole = read_log(&log.bytes).expect("a valid log reads");
    assert_eq!((whole.records, whole.valid_len, whole.torn_bytes), (count, len as u64, 0));

    let mut bytes = log.bytes.clone();
    let at = position % len;
    match mode {
        0 | 1 => {
            if mode == 0 {
                for (i, byte) in patch.iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(at + i) {
                        *slot = *byte;
                    }
                }
            } else {
                bytes[at] ^= 1 << (span % 8);
            }
            let changed: Vec<usize> = (0..len).filter(|&i| bytes[i] != log.bytes[i]).collect();
            if changed.is_empty() {
                return;
            }
            // The first damaged byte past the file header, if any.
            let damage = changed.iter().map(|&i| i as u64).find(|&i| i >= HEADER);
            let header_changed = changed[0] < HEADER as usize;
            let last_record = b[count - 1];
            match read_log(&bytes) {
                Ok(read) if read.records == count => {
                    // No byte may change without a record lost or a refusal: the header is
                    // checksummed, and so is each record.
                    panic!("read whole despite changes at {changed:?}: {read:?}");
                }
                Ok(read) => {
                    let damage = damage.expect("records lost with none damaged");
                    assert!(
                        read.records == count - 1 && damage >= last_record,
                        "silently shorter: {read:?}, damage at {damage}, last record at {last_record}"
                    );
                    assert_eq!(read.valid_len, last_record);
                }
                Err(Refusal::Corrupt { offset }) => {
                    let damage = damage.expect("corrupt with no record damaged");
                    assert!(
                        offset >= HEADER && offset <= damage,
                        "corrupt at {offset}, damage at {damage}"
                    );
                }
                Err(Refusal::Header) => assert!(header_changed),
            }
        }
        _ => {
            bytes.truncate(at);
            let read = read_log(&bytes).expect("a log cut short is a torn log, not a corrupt one");
            if (at as u64) < HEADER {
                assert_eq!((read.records, read.generation), (0, None));
            } else {
                let kept = b.iter().skip(1).filter(|&&end| end <= at as u64).count();
                assert_eq!(read.records, kept);
                assert_eq!(read.valid_len, b[kept]);
                assert_eq!(read.torn_bytes, at as u64 - b[kept]);
            }
        }
    }
});
