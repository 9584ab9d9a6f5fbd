//! The card vault: account numbers in, tokens and last-four digits out.
//!
//! A card number (PAN) or bank account number is sealed with XChaCha20-Poly1305 under the
//! vault key (from the engine's config: the server binary also takes `SETTLEGATE_VAULT_KEY`), with the token as associated data so a
//! sealed number cannot be moved under another token. Everything outside this module sees only
//! the token and the last four digits; [`Vault::reveal`] exists for adapters that must put the
//! number on the wire to a provider.

use std::fmt;
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::types::{CardToken, ReasonCode};
use crate::SharedMap;

/// An account number (or other secret) sealed under the vault key.
#[derive(
    Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct SealedNumber {
    pub(crate) nonce: [u8; 24],
    pub(crate) ciphertext: Vec<u8>,
}

impl fmt::Debug for SealedNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedNumber(<ciphertext>)")
    }
}

/// What tokenizing a number yields: the token, the last four digits and the sealed number.
#[derive(Debug, Clone)]
pub struct Tokenized {
    /// The token that stands for the number everywhere else.
    pub token: CardToken,
    /// The last four digits, for display.
    pub last4: [u8; 4],
    /// The sealed number, kept in the vault and (with durability) in the log.
    pub sealed: SealedNumber,
}

/// What kind of number is tokenized, which decides its validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberKind {
    /// A card PAN: 12–19 digits with a valid Luhn check digit.
    Pan,
    /// A bank account number: 4–34 ASCII alphanumerics (IBAN length).
    Account,
}

/// The vault.
pub struct Vault {
    cipher: XChaCha20Poly1305,
    /// Shared with the means that hold each number, which a snapshot reads from.
    sealed: SharedMap<CardToken, Arc<SealedNumber>>,
}

impl Vault {
    /// A vault under a 256-bit key.
    pub fn new(key: &[u8; 32]) -> Vault {
        Vault { cipher: XChaCha20Poly1305::new(key.into()), sealed: SharedMap::default() }
    }

    /// Validates and seals `number`. Does not store it: the owning shard stores it by
    /// applying the command that carries the result (so that a log can replay it).
    pub fn tokenize(&self, kind: NumberKind, number: &str) -> Result<Tokenized, ReasonCode> {
        let valid = match kind {
            NumberKind::Pan => pan_valid(number),
            NumberKind::Account => {
                (4..=34).contains(&number.len())
                    && number.bytes().all(|b| b.is_ascii_alphanumeric())
            }
        };
        if !valid {
            return Err(match kind {
                NumberKind::Pan => ReasonCode::InvalidCardNumber,
                NumberKind::Account => ReasonCode::InvalidMeans,
            });
        }
        let mut token = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut token);
        let token = CardToken(token);
        let sealed = self.seal(number.as_bytes(), &token.0);
        let tail = &number.as_bytes()[number.len() - 4..];
        Ok(Tokenized { token, last4: tail.try_into().expect("4 bytes"), sealed })
    }

    /// Seals any secret (a device key on its way to disk, say) bound to `aad`.
    pub fn seal(&self, secret: &[u8], aad: &[u8]) -> SealedNumber {
        let mut nonce = [0u8; 24];
        // A CSPRNG in user space (ChaCha, seeded and reseeded from the OS): random 192-bit
        // nonces need only be unique, and a system call per seal would cost more than the seal.
        rand::thread_rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: secret, aad })
            .expect("XChaCha20-Poly1305 encryption does not fail for short inputs");
        SealedNumber { nonce, ciphertext }
    }

    /// Opens what [`Vault::seal`] sealed with the same `aad`; `None` under another key or
    /// associated data, or if the ciphertext was altered.
    pub fn open(&self, sealed: &SealedNumber, aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        self.cipher
            .decrypt(XNonce::from_slice(&sealed.nonce), Payload { msg: &sealed.ciphertext, aad })
            .ok()
            .map(Zeroizing::new)
    }

    /// Stores a sealed number under its token.
    pub(crate) fn store(&self, token: CardToken, sealed: Arc<SealedNumber>) {
        self.sealed.insert(token, sealed);
    }

    /// Opens the number behind `token`, for an adapter that must send it to its provider.
    /// The result is zeroed on drop; never log it.
    pub fn reveal(&self, token: &CardToken) -> Option<Zeroizing<String>> {
        let sealed = self.sealed.get(token)?;
        let plain = self.open(&sealed, &token.0)?;
        String::from_utf8(plain.to_vec()).ok().map(Zeroizing::new)
    }

    /// Number of sealed numbers held.
    pub fn len(&self) -> usize {
        self.sealed.len()
    }

    /// Whether the vault holds nothing.
    pub fn is_empty(&self) -> bool {
        self.sealed.is_empty()
    }
}

/// Card adapters (ISO 8583) reveal the PAN through this trait, and only inside the adapter.
impl settlegate_adapters::Detokenizer for Vault {
    fn reveal(&self, token: &CardToken) -> Option<Zeroizing<String>> {
        Vault::reveal(self, token)
    }
}

/// A PAN is 12–19 ASCII digits whose Luhn checksum is zero.
fn pan_valid(pan: &str) -> bool {
    let bytes = pan.as_bytes();
    if !(12..=19).contains(&bytes.len()) || !bytes.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = bytes
        .iter()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let digit = (b - b'0') as u32;
            if i % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                digit
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn() {
        assert!(pan_valid("4111111111111111"));
        assert!(pan_valid("5555555555554444"));
        assert!(!pan_valid("4111111111111112"));
        assert!(!pan_valid("41111111111"));
        assert!(!pan_valid("4111-1111-1111-1111"));
    }

    #[test]
    fn seal_and_reveal() {
        let vault = Vault::new(&[7; 32]);
        let tokenized = vault.tokenize(NumberKind::Pan, "4111111111111111").unwrap();
        assert_eq!(&tokenized.last4, b"1111");
        let debug = format!("{tokenized:?}");
        assert!(!debug.contains("4111111111111111"), "{debug}");
        vault.store(tokenized.token, Arc::new(tokenized.sealed.clone()));
        assert_eq!(vault.reveal(&tokenized.token).unwrap().as_str(), "4111111111111111");
        // The ciphertext is bound to its token.
        let other = CardToken([0; 16]);
        vault.store(other, Arc::new(tokenized.sealed));
        assert!(vault.reveal(&other).is_none());
    }

    #[test]
    fn wrong_key_cannot_open() {
        let vault = Vault::new(&[7; 32]);
        let tokenized = vault.tokenize(NumberKind::Pan, "4111111111111111").unwrap();
        let thief = Vault::new(&[8; 32]);
        thief.store(tokenized.token, Arc::new(tokenized.sealed));
        assert!(thief.reveal(&tokenized.token).is_none());
    }
}
