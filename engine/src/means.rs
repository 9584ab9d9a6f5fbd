//! Settlement means as a client registers them (G1), validated and tokenized before any
//! shard sees them.

use std::fmt;

use crate::limits::MEANS_TEXT_LEN_MAX;
use crate::shard::state::NewMeans;
use crate::types::{MeansKind, ReasonCode};
use crate::vault::{NumberKind, Vault};

/// A means with its assistance information, as submitted. `Debug` masks every number.
#[derive(Clone, PartialEq, Eq)]
pub enum MeansInput {
    /// A credit card; the PAN goes to the vault.
    CreditCard {
        /// Card number, 12–19 digits, Luhn-valid.
        pan: String,
    },
    /// An e-money purse.
    EMoney {
        /// The e-money type (brand).
        emoney_type: String,
    },
    /// A QR-code scheme account.
    QrCode {
        /// Scheme name.
        scheme: String,
        /// The QR settlement number.
        settlement_number: String,
    },
    /// A bank account; the account number goes to the vault.
    BankAccount {
        /// Bank code.
        bank_code: String,
        /// Account number, 4–34 alphanumerics.
        account_number: String,
    },
}

impl fmt::Debug for MeansInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MeansInput::CreditCard { .. } => f.write_str("CreditCard { pan: <redacted> }"),
            MeansInput::EMoney { emoney_type } => write!(f, "EMoney {{ {emoney_type:?} }}"),
            MeansInput::QrCode { scheme, .. } => write!(f, "QrCode {{ {scheme:?}, <number> }}"),
            MeansInput::BankAccount { bank_code, .. } => {
                write!(f, "BankAccount {{ {bank_code:?}, <redacted> }}")
            }
        }
    }
}

fn text_ok(text: &str) -> bool {
    !text.is_empty() && text.len() <= MEANS_TEXT_LEN_MAX && !text.chars().any(char::is_control)
}

impl MeansInput {
    /// The kind of means.
    pub fn kind(&self) -> MeansKind {
        match self {
            MeansInput::CreditCard { .. } => MeansKind::CreditCard,
            MeansInput::EMoney { .. } => MeansKind::EMoney,
            MeansInput::QrCode { .. } => MeansKind::QrCode,
            MeansInput::BankAccount { .. } => MeansKind::BankAccount,
        }
    }

    /// Validates, seals any number in the vault, and makes the display label.
    pub(crate) fn prepare(&self, vault: &Vault) -> Result<NewMeans, ReasonCode> {
        let kind = self.kind();
        let (label, sealed) = match self {
            MeansInput::CreditCard { pan } => {
                let t = vault.tokenize(NumberKind::Pan, pan)?;
                let label =
                    format!("{} ****{}", card_brand(pan), String::from_utf8_lossy(&t.last4));
                (label, Some((t.token, t.last4, t.sealed)))
            }
            MeansInput::EMoney { emoney_type } => {
                if !text_ok(emoney_type) {
                    return Err(ReasonCode::InvalidMeans);
                }
                (emoney_type.clone(), None)
            }
            MeansInput::QrCode { scheme, settlement_number } => {
                if !text_ok(scheme) || !text_ok(settlement_number) {
                    return Err(ReasonCode::InvalidMeans);
                }
                (format!("{scheme} {settlement_number}"), None)
            }
            MeansInput::BankAccount { bank_code, account_number } => {
                if !text_ok(bank_code) {
                    return Err(ReasonCode::InvalidMeans);
                }
                let t = vault.tokenize(NumberKind::Account, account_number)?;
                let label = format!("{bank_code} ****{}", String::from_utf8_lossy(&t.last4));
                (label, Some((t.token, t.last4, t.sealed)))
            }
        };
        Ok(NewMeans { kind, label, sealed })
    }

    /// The non-secret parts, for the idempotency digest.
    pub(crate) fn public_parts(&self) -> (MeansKind, &str, &str) {
        match self {
            MeansInput::CreditCard { pan } => (self.kind(), "", tail(pan)),
            MeansInput::EMoney { emoney_type } => (self.kind(), emoney_type, ""),
            MeansInput::QrCode { scheme, settlement_number } => {
                (self.kind(), scheme, settlement_number)
            }
            MeansInput::BankAccount { bank_code, account_number } => {
                (self.kind(), bank_code, tail(account_number))
            }
        }
    }
}

/// The card scheme of a PAN by its issuer identification number, for labels and for a store's
/// accepted methods (`brand = "visa"`); `card` when unknown.
pub fn card_brand(pan: &str) -> &'static str {
    let prefix = |n: usize| pan.get(..n).and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
    match (prefix(1), prefix(2), prefix(3), prefix(4)) {
        (4, _, _, _) => "visa",
        (_, 51..=55, _, _) | (_, _, _, 2221..=2720) => "mastercard",
        (_, 34 | 37, _, _) => "amex",
        (_, _, _, 3528..=3589) => "jcb",
        (_, 36 | 38 | 39, _, _) | (_, _, 300..=305, _) => "diners",
        (_, 65, _, _) | (_, _, 644..=649, _) | (_, _, _, 6011) => "discover",
        (_, 62, _, _) => "unionpay",
        _ => "card",
    }
}

fn tail(number: &str) -> &str {
    let start = number.len().saturating_sub(4);
    number.get(start..).unwrap_or("")
}
