//! Identifiers: users, devices and client requests.

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::limits::USER_ID_LEN_MAX;
use crate::ReasonCode;

/// A FeliCa-style card IDm: the 8-byte identity of the secure element in the user's terminal.
/// It names the device whose key signs the inherent ID.
pub type Idm = [u8; 8];

/// A client-chosen request ID that makes a mutating request idempotent (16 random bytes).
pub type ClientRequestId = u128;

/// How a user is identified (seed 000: mail address or an inherent number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum UserIdType {
    /// A mail address.
    Mail = 1,
    /// An inherent number (digits only).
    InherentNumber = 2,
}

impl UserIdType {
    /// Decodes the wire byte.
    pub fn from_u8(byte: u8) -> Option<UserIdType> {
        match byte {
            1 => Some(UserIdType::Mail),
            2 => Some(UserIdType::InherentNumber),
            _ => None,
        }
    }
}

/// Whether `id` is shaped as a mail address: one `@` with text on both sides, no whitespace or
/// control character.
fn mail_shape_ok(id: &str) -> bool {
    let Some(at) = id.find('@') else { return false };
    let (local, domain) = (&id[..at], &id[at + 1..]);
    let clean = if id.is_ascii() {
        // The ASCII whitespace and control characters are exactly these bytes.
        id.bytes().all(|b| b > b' ' && b != 0x7f)
    } else {
        !id.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    !local.is_empty() && !domain.is_empty() && !domain.contains('@') && clean
}

/// A user's identity: ID type and ID. Validated on construction.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserKey {
    id_type: UserIdType,
    /// Inline up to 24 bytes (most mail addresses and every inherent number): a map of users
    /// compares keys without following a pointer to the heap.
    id: CompactString,
}

impl UserKey {
    /// Validates `id` for `id_type`: 1..=64 bytes; a mail address has one `@` with text on
    /// both sides and no whitespace; an inherent number is ASCII digits.
    pub fn new<S>(id_type: UserIdType, id: S) -> Result<UserKey, ReasonCode>
    where
        S: AsRef<str>,
    {
        // Checked before it is copied: a key is built from every request's record.
        let text = id.as_ref();
        let len_ok = !text.is_empty() && text.len() <= USER_ID_LEN_MAX;
        let shape_ok = match id_type {
            UserIdType::Mail => mail_shape_ok(text),
            UserIdType::InherentNumber => text.bytes().all(|b| b.is_ascii_digit()),
        };
        if len_ok && shape_ok {
            Ok(UserKey { id_type, id: CompactString::new(text) })
        } else {
            Err(ReasonCode::InvalidUserId)
        }
    }

    /// The ID type.
    pub fn id_type(&self) -> UserIdType {
        self.id_type
    }

    /// The ID text.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}:{}", self.id_type, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition `mail_shape_ok` implements, written the plain way.
    fn mail_shape_reference(id: &str) -> bool {
        let mut parts = id.splitn(2, '@');
        let local = parts.next().unwrap_or("");
        let domain = parts.next().unwrap_or("");
        !local.is_empty()
            && !domain.is_empty()
            && !domain.contains('@')
            && !id.chars().any(|c| c.is_whitespace() || c.is_control())
    }

    proptest! {
        /// The ASCII fast path and the general one agree with the definition, on text built
        /// mostly of the characters that decide it (`@`, ASCII and Unicode whitespace and
        /// controls, DEL, non-ASCII letters).
        #[test]
        fn mail_shape_matches_its_definition(
            id in proptest::collection::vec(
                prop_oneof![
                    Just('@'), Just(' '), Just('\t'), Just('\u{7f}'), Just('\u{85}'),
                    Just('\u{a0}'), Just('\u{2003}'), Just('é'), Just('\0'), any::<char>(),
                    proptest::char::range('!', '~'),
                ],
                0..12,
            ).prop_map(|chars| chars.into_iter().collect::<String>())
        ) {
            prop_assert_eq!(mail_shape_ok(&id), mail_shape_reference(&id), "{:?}", id);
        }
    }

    #[test]
    fn user_keys_are_checked_before_they_are_kept() {
        assert!(UserKey::new(UserIdType::Mail, "a@b.c").is_ok());
        assert!(UserKey::new(UserIdType::Mail, String::from("a@b")).is_ok());
        for bad in ["", "ab", "@b", "a@", "a@b@c", "a @b", "a@b\u{a0}", "a@b\u{7f}"] {
            assert_eq!(
                UserKey::new(UserIdType::Mail, bad),
                Err(ReasonCode::InvalidUserId),
                "{bad:?}"
            );
        }
        assert!(UserKey::new(UserIdType::Mail, "a".repeat(USER_ID_LEN_MAX + 1) + "@b").is_err());
        assert!(UserKey::new(UserIdType::InherentNumber, "0123").is_ok());
        assert!(UserKey::new(UserIdType::InherentNumber, "12a").is_err());
    }
}
