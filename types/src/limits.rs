//! The limits a client can see on the wire: lengths, counts and amounts a request or reply is
//! held to. The engine enforces them, and re-exports them with its own (`settlegate_engine::limits`).

/// Longest user ID, in bytes (a mail address or an inherent number).
pub const USER_ID_LEN_MAX: usize = 64;
/// Longest store-terminal ID, in bytes (ISO 8583 field 41 holds 8; we allow 16).
pub const TERMINAL_ID_LEN_MAX: usize = 16;
/// Shortest password accepted at enrollment, in bytes.
pub const PASSWORD_LEN_MIN: usize = 8;
/// Longest password accepted, in bytes (bounds the hashing work a request can cause).
pub const PASSWORD_LEN_MAX: usize = 128;
/// Settlement means a user may register.
pub const MEANS_PER_USER_MAX: usize = 16;
/// Devices a user may have provisioned.
pub const DEVICES_PER_USER_MAX: usize = 8;
/// Longest free-text field of a means (e-money type, scheme name, bank code, label).
pub const MEANS_TEXT_LEN_MAX: usize = 32;
/// Largest amount, in minor units, of one authorization (10^15: beyond any real payment).
pub const AMOUNT_MINOR_MAX: u64 = 1_000_000_000_000_000;
/// Terminals registered by one request.
pub const TERMINALS_PER_REQUEST_MAX: usize = 1024;
/// Longest description of a terminal-unique service.
pub const SERVICE_DESCRIPTION_LEN_MAX: usize = 64;
/// Longest provider display name, bytes: `SERVER_INFO` lists every provider's, and the
/// longest such list must fit one frame body.
pub const PROVIDER_NAME_LEN_MAX: usize = 48;
/// Items in one basket (A2).
pub const BASKET_ITEMS_MAX: usize = 256;
/// Longest item ID, in a basket and in a redemption's sale lines (`REDEEM_CODE`): a
/// redemption's reply lists up to [`SALE_ITEMS_MAX`] of them and must fit one frame body
/// (65,536 bytes), as a test in `settlegate-protocol` checks for every reply.
pub const ITEM_ID_LEN_MAX: usize = 32;
/// Longest item category name (`alcohol`, `tobacco`, ...).
pub const CATEGORY_LEN_MAX: usize = 16;
/// Largest quantity of one basket line.
pub const ITEM_QUANTITY_MAX: u32 = 1_000_000;
/// Longest IANA time-zone name in an age policy.
pub const TIME_ZONE_LEN_MAX: usize = 64;
/// Longest jurisdiction code in an age policy.
pub const JURISDICTION_LEN_MAX: usize = 8;
/// Longest store ID, industry, or accepted-method brand.
pub const STORE_TEXT_LEN_MAX: usize = 32;
/// Longest store name.
pub const STORE_NAME_LEN_MAX: usize = 64;
/// Longest store address.
pub const STORE_ADDRESS_LEN_MAX: usize = 128;
/// Beacon IDs, and Wi-Fi IDs, per store.
pub const STORE_IDS_PER_KIND_MAX: usize = 16;
/// Longest beacon or Wi-Fi ID.
pub const BEACON_ID_LEN_MAX: usize = 64;
/// Settlement methods a store lists as accepted.
pub const ACCEPTED_METHODS_MAX: usize = 16;
/// Largest search radius of a nearest-store query, metres.
pub const STORE_RADIUS_MAX_M: u32 = 50_000;
/// Largest stored-value balance, minor units.
pub const BALANCE_MAX_MINOR: u64 = 1_000_000_000_000;
/// Uses of one coupon at most.
pub const COUPON_USES_MAX: u32 = 1_000;
/// Users one coupon request may name: its reply, an `issued_coupon` per user (at most 164
/// bytes each), must fit one frame body (65,536 bytes), as a test in `settlegate-protocol`
/// checks for every reply.
pub const COUPON_USERS_MAX: usize = 256;
/// Shortest and longest validity of a payment code, ms.
pub const CODE_VALIDITY_MIN_MS: i64 = 10_000;
/// Longest validity of a payment code (its hold): 7 days.
pub const CODE_VALIDITY_MAX_MS: i64 = 7 * 86_400_000;
/// Longest order reference of a cash-on-delivery code.
pub const ORDER_REF_LEN_MAX: usize = 32;
/// Items in a redemption's sales information.
pub const SALE_ITEMS_MAX: usize = 256;
/// Rows of a reconciliation report one `REPORT` page may ask for: a page holds at most this
/// many, and fewer when the next would take the reply past a frame's body.
pub const REPORT_ROWS_MAX: u16 = 1_000;

/// Whether `text` is a business day as the reconciliation report writes them: `YYYY-MM-DD`,
/// a date of the (proleptic) Gregorian calendar, years 0000 to 9999.
pub fn business_day_valid(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        bytes[range].iter().try_fold(0u32, |value, &b| {
            b.is_ascii_digit().then(|| value * 10 + u32::from(b - b'0'))
        })
    };
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return false;
    }
    let (Some(year), Some(month), Some(day)) = (digits(0..4), digits(5..7), digits(8..10)) else {
        return false;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

const _: () =
    assert!(USER_ID_LEN_MAX <= u8::MAX as usize, "user ID length is one byte on the wire");
const _: () = assert!(TERMINAL_ID_LEN_MAX <= u8::MAX as usize, "terminal ID length is one byte");
const _: () = assert!(PASSWORD_LEN_MIN < PASSWORD_LEN_MAX);

#[cfg(test)]
mod tests {
    use super::business_day_valid;

    #[test]
    fn business_days() {
        for day in ["2026-11-22", "2024-02-29", "2000-02-29", "0000-01-01", "9999-12-31"] {
            assert!(business_day_valid(day), "{day}");
        }
        for day in [
            "",
            "2026-13-01",
            "2026-00-10",
            "2026-11-31",
            "2026-02-29",
            "1900-02-29",
            "2026-1-01",
            "2026/11/22",
            "2026-11-22 ",
            "+026-11-22",
            "2026-11-2x",
            "２０２６-11-22",
        ] {
            assert!(!business_day_valid(day), "{day}");
        }
    }
}
