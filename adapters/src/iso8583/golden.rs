//! The original 1987 layout, frozen: with no dialect key set, every message is byte for byte
//! what the adapter sent before the dialect existed. The hex dumps below were taken from the
//! adapter as it was before `dialect.rs` (commit fdf8cac) and must never be regenerated from the
//! current code: a difference here is a change of the default wire format.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::codec::encode;
use super::config::{Iso8583Config, MessageClass};
use super::dialect::Dialect;
use super::mapping::{
    digits, network_message, pad, request_message, reversal_message, transmission_time, Network,
    Original,
};

const AUTH_REQUEST: &str = concat!(
    "0066303130307220000008c08000313634313131313131313131313131313131303030303030303030303030",
    "303132333435303232393133303530393030303132333030303030303030303034325445524d303120205345",
    "54544c45474154453031202020333932",
);
const FIN_REQUEST: &str = concat!(
    "0066303230307220000008c08000313634313131313131313131313131313131303030303030303030303030",
    "303132333435303232393133303530393030303132333030303030303030303034325445524d303120205345",
    "54544c45474154453031202020333932",
);
const AUTH_REVERSAL_PAN: &str = concat!(
    "009830343030f220000008c08000000000400000000031363431313131313131313131313131313130303030",
    "3030303030303030303132333435303232393133303531323030303132343030303030303030303034325445",
    "524d30312020534554544c454741544530312020203339323031303030303031323330323239313330353039",
    "30303030303030303030303030303030303030303030",
);
const AUTH_REVERSAL_NO_PAN: &str = concat!(
    "008630343030b220000008c08000000000400000000030303030303030303030303030313233343530323239",
    "3133303531323030303132343030303030303030303034325445524d30312020534554544c45474154453031",
    "2020203339323031303030303031323330323239313330353039303030303030303030303030303030303030",
    "30303030",
);
const AUTH_REPEAT_PAN: &str = concat!(
    "009830343031f220000008c08000000000400000000031363431313131313131313131313131313130303030",
    "3030303030303030303132333435303232393133303531323030303132343030303030303030303034325445",
    "524d30312020534554544c454741544530312020203339323031303030303031323330323239313330353039",
    "30303030303030303030303030303030303030303030",
);
const AUTH_REPEAT_NO_PAN: &str = concat!(
    "008630343031b220000008c08000000000400000000030303030303030303030303030313233343530323239",
    "3133303531323030303132343030303030303030303034325445524d30312020534554544c45474154453031",
    "2020203339323031303030303031323330323239313330353039303030303030303030303030303030303030",
    "30303030",
);
const FIN_REVERSAL_PAN: &str = concat!(
    "009830343030f220000008c08000000000400000000031363431313131313131313131313131313130303030",
    "3030303030303030303132333435303232393133303531323030303132343030303030303030303034325445",
    "524d30312020534554544c454741544530312020203339323032303030303031323330323239313330353039",
    "30303030303030303030303030303030303030303030",
);
const FIN_REVERSAL_NO_PAN: &str = concat!(
    "008630343030b220000008c08000000000400000000030303030303030303030303030313233343530323239",
    "3133303531323030303132343030303030303030303034325445524d30312020534554544c45474154453031",
    "2020203339323032303030303031323330323239313330353039303030303030303030303030303030303030",
    "30303030",
);
const FIN_REPEAT_PAN: &str = concat!(
    "009830343031f220000008c08000000000400000000031363431313131313131313131313131313130303030",
    "3030303030303030303132333435303232393133303531323030303132343030303030303030303034325445",
    "524d30312020534554544c454741544530312020203339323032303030303031323330323239313330353039",
    "30303030303030303030303030303030303030303030",
);
const FIN_REPEAT_NO_PAN: &str = concat!(
    "008630343031b220000008c08000000000400000000030303030303030303030303030313233343530323239",
    "3133303531323030303132343030303030303030303034325445524d30312020534554544c45474154453031",
    "2020203339323032303030303031323330323239313330353039303030303030303030303030303030303030",
    "30303030",
);
const SIGN_ON: &str =
    "0027303830308220000000000000040000000000000030323239313330353039303030303037303031";
const ECHO: &str =
    "0027303830308220000000000000040000000000000030323239313330353039303030303037333031";

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

fn frame(message: &super::codec::Message) -> String {
    let mut out = Vec::new();
    encode(message, &mut out).expect("encodes");
    hex(&out)
}

/// The config with no dialect key: only what every adapter config needs.
fn plain(class: MessageClass) -> Iso8583Config {
    Iso8583Config {
        host_addr: "127.0.0.1:8583".into(),
        merchant_id: "SETTLEGATE01".into(),
        message_class: class,
        ..Iso8583Config::default()
    }
}

/// The authorization the dumps were taken of: STAN 123, RRN 42, 12,345 yen at `TERM01`.
fn original(dialect: &Dialect, class: MessageClass, now: SystemTime) -> Original {
    Original {
        mti: class.request_mti(),
        stan: 123,
        rrn: *b"000000000042",
        transmitted: transmission_time(now),
        local: dialect.local_time(now),
        amount: digits(12_345),
        currency: *b"392",
        terminal: dialect.terminal("TERM01").expect("fits field 41"),
        terminal_full: "TERM01".into(),
        token: None,
    }
}

#[test]
fn with_no_dialect_keys_every_message_is_the_original_byte_for_byte() {
    // 2024-02-29T13:05:09Z
    let now = UNIX_EPOCH + Duration::from_secs(1_709_211_909);
    let later = now + Duration::from_secs(3);
    let pan = "4111111111111111";
    let cases = [
        (
            MessageClass::Authorization,
            [
                AUTH_REQUEST,
                AUTH_REVERSAL_PAN,
                AUTH_REVERSAL_NO_PAN,
                AUTH_REPEAT_PAN,
                AUTH_REPEAT_NO_PAN,
            ],
        ),
        (
            MessageClass::Financial,
            [FIN_REQUEST, FIN_REVERSAL_PAN, FIN_REVERSAL_NO_PAN, FIN_REPEAT_PAN, FIN_REPEAT_NO_PAN],
        ),
    ];
    for (class, [request, reversal, reversal_no_pan, repeat, repeat_no_pan]) in cases {
        let dialect = plain(class).dialect().expect("the default dialect");
        let dialect = &dialect;
        let original = original(dialect, class, now);
        assert_eq!(original.terminal, pad::<8>(b"TERM01"));
        let built = |repeat, pan| reversal_message(dialect, &original, 124, repeat, pan, later);
        assert_eq!(frame(&request_message(dialect, &original, pan).unwrap()), request, "{class:?}");
        assert_eq!(frame(&built(false, Some(pan)).unwrap()), reversal, "{class:?}");
        assert_eq!(frame(&built(false, None).unwrap()), reversal_no_pan, "{class:?}");
        assert_eq!(frame(&built(true, Some(pan)).unwrap()), repeat, "{class:?}");
        assert_eq!(frame(&built(true, None).unwrap()), repeat_no_pan, "{class:?}");
    }
    assert_eq!(frame(&network_message(Network::SignOn, 7, now).unwrap()), SIGN_ON);
    assert_eq!(frame(&network_message(Network::Echo, 7, now).unwrap()), ECHO);
}

/// `reversal_mti = "0420"` changes the MTI of reversals (0420, repeats 0421) and nothing else.
#[test]
fn reversal_advice_differs_from_the_original_only_in_its_mti() {
    let now = UNIX_EPOCH + Duration::from_secs(1_709_211_909);
    let later = now + Duration::from_secs(3);
    let config = Iso8583Config {
        reversal_mti: super::dialect::ReversalMti::Advice,
        ..plain(MessageClass::Authorization)
    };
    let dialect = config.dialect().unwrap();
    let original = original(&dialect, MessageClass::Authorization, now);
    let pan = Some("4111111111111111");
    let advice = frame(&reversal_message(&dialect, &original, 124, false, pan, later).unwrap());
    let repeat = frame(&reversal_message(&dialect, &original, 124, true, pan, later).unwrap());
    // MTI bytes follow the 2-byte length header: hex characters 4..12.
    let expected =
        |original: &str, mti: &str| format!("{}{}{}", &original[..4], mti, &original[12..]);
    assert_eq!(advice, expected(AUTH_REVERSAL_PAN, "30343230"));
    assert_eq!(repeat, expected(AUTH_REPEAT_PAN, "30343231"));
}
