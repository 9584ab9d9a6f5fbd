//! `ADD_MEANS` (0x0012): register a settlement means.

use settlegate_types::{ClientRequestId, MeansKind, UserKey};

use crate::ops::Operation;
use crate::values::Codec;
use crate::wire::{BodyError, Reader, Writer};

/// A settlement means to register, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeansInput {
    /// A payment card.
    CreditCard {
        /// The card number (12–19 digits, Luhn-checked).
        pan: String,
    },
    /// A stored-value e-money purse.
    EMoney {
        /// The e-money type.
        emoney_type: String,
    },
    /// A QR-code payment scheme account.
    QrCode {
        /// The scheme.
        scheme: String,
        /// The account's settlement number.
        settlement_number: String,
    },
    /// A bank account.
    BankAccount {
        /// The bank's code.
        bank_code: String,
        /// The account's number.
        account_number: String,
    },
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
}

impl Codec for MeansInput {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u8(self.kind() as u8);
        match self {
            MeansInput::CreditCard { pan } => w.str8(pan),
            MeansInput::EMoney { emoney_type } => w.str8(emoney_type),
            MeansInput::QrCode { scheme, settlement_number } => {
                w.str8(scheme).str8(settlement_number)
            }
            MeansInput::BankAccount { bank_code, account_number } => {
                w.str8(bank_code).str8(account_number)
            }
        };
    }
    fn decode(r: &mut Reader<'_>) -> Result<MeansInput, BodyError> {
        let kind =
            MeansKind::from_u8(r.u8("means_kind")?).ok_or(BodyError::Invalid("means_kind"))?;
        let mut text = |what| r.str8(what).map(str::to_owned);
        Ok(match kind {
            MeansKind::CreditCard => MeansInput::CreditCard { pan: text("pan")? },
            MeansKind::EMoney => MeansInput::EMoney { emoney_type: text("emoney_type")? },
            MeansKind::QrCode => MeansInput::QrCode {
                scheme: text("scheme")?,
                settlement_number: text("settlement_number")?,
            },
            MeansKind::BankAccount => MeansInput::BankAccount {
                bank_code: text("bank_code")?,
                account_number: text("account_number")?,
            },
        })
    }
}

/// Register a settlement means for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddMeans {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The user.
    pub user: UserKey,
    /// Whether it becomes the default means.
    pub make_default: bool,
    /// The means.
    pub means: MeansInput,
}

/// The means registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeansAdded {
    /// Its means ID.
    pub means_id: u32,
    /// A card's last four digits.
    pub last4: Option<String>,
}

impl Codec for MeansAdded {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u32(self.means_id).str8(self.last4.as_deref().unwrap_or(""));
    }
    fn decode(r: &mut Reader<'_>) -> Result<MeansAdded, BodyError> {
        let means_id = r.u32("means_id")?;
        let last4 = r.str8("last4")?;
        Ok(MeansAdded { means_id, last4: (!last4.is_empty()).then(|| last4.to_owned()) })
    }
}

impl Operation for AddMeans {
    const OPCODE: u16 = 0x0012;
    const NAME: &'static str = "add_means";
    type Reply = MeansAdded;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id).user(&self.user).flag(self.make_default);
        self.means.encode(w);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<AddMeans, BodyError> {
        Ok(AddMeans {
            client_request_id: r.u128("client_request_id")?,
            user: r.user()?,
            make_default: r.flag("make_default")?,
            means: MeansInput::decode(r)?,
        })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::User(&self.user)
    }
}
