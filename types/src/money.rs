//! Money and means: currencies, means kinds, card tokens and authorization codes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A settlement means kind (seed 000: credit card, e-money, QR code, bank account).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum MeansKind {
    /// A payment card (PAN held in the engine's vault).
    CreditCard = 1,
    /// A stored-value e-money purse.
    EMoney = 2,
    /// A QR-code payment scheme account.
    QrCode = 3,
    /// A bank account (direct debit).
    BankAccount = 4,
}

impl MeansKind {
    /// Decodes the wire byte.
    pub fn from_u8(byte: u8) -> Option<MeansKind> {
        match byte {
            1 => Some(MeansKind::CreditCard),
            2 => Some(MeansKind::EMoney),
            3 => Some(MeansKind::QrCode),
            4 => Some(MeansKind::BankAccount),
            _ => None,
        }
    }
}

/// An ISO 4217 alphabetic currency code, three upper-case ASCII letters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

/// A currency code that is not three upper-case ASCII letters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("currency must be three upper-case ASCII letters (ISO 4217), got {0:?}")]
pub struct CurrencyError(pub String);

impl Currency {
    /// Validates three bytes as an ISO 4217 alphabetic code.
    pub fn from_bytes(bytes: [u8; 3]) -> Result<Currency, CurrencyError> {
        if bytes.iter().all(u8::is_ascii_uppercase) {
            Ok(Currency(bytes))
        } else {
            Err(CurrencyError(String::from_utf8_lossy(&bytes).into_owned()))
        }
    }

    /// The three ASCII bytes.
    pub fn bytes(self) -> [u8; 3] {
        self.0
    }

    /// The code as a string slice.
    pub fn as_str(&self) -> &str {
        // Invariant: constructed only from ASCII upper-case letters.
        std::str::from_utf8(&self.0).expect("currency is ASCII")
    }
}

impl TryFrom<&str> for Currency {
    type Error = CurrencyError;
    fn try_from(text: &str) -> Result<Currency, CurrencyError> {
        let bytes: [u8; 3] =
            text.as_bytes().try_into().map_err(|_| CurrencyError(text.to_owned()))?;
        Currency::from_bytes(bytes)
    }
}

impl TryFrom<String> for Currency {
    type Error = CurrencyError;
    fn try_from(text: String) -> Result<Currency, CurrencyError> {
        Currency::try_from(text.as_str())
    }
}

impl From<Currency> for String {
    fn from(currency: Currency) -> String {
        currency.as_str().to_owned()
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A vault token standing in for a card number. Only the vault maps it back to the PAN.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CardToken(pub [u8; 16]);

impl fmt::Debug for CardToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tok_")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// A six-character authorization code (ISO 8583 field 38 style).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuthCode(pub [u8; 6]);

impl AuthCode {
    /// The code as text (always ASCII alphanumerics).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("??????")
    }
}

impl fmt::Debug for AuthCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
