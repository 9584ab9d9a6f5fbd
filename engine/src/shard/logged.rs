//! A shard's log record. Since format version 8 it is the shard's [`Envelope`] itself,
//! archived with rkyv as it is: the command is the record, with no second copy of the domain
//! model to convert to and from. Secrets in it are sealed: a device key as a
//! [`NewDeviceKey`](crate::keys::NewDeviceKey) (its clear form is never archived), a card
//! number as the vault sealed it; passwords are Argon2id PHC strings. Logs of versions 1 to 6
//! hold the older record type of `wal/record.rs`, read and converted on first open
//! (`startup::convert_log`).

use super::archive::{OutcomeLeaf, Via};
use super::state::{Command, Envelope};
use crate::types::AuthOutcome;
use crate::vault::Vault;
use crate::wal::record::{open_key, LogEnvelope, RecordError};
use crate::wal::{self, FORMAT_VERSION};

/// The first log format whose records are [`Envelope`]s.
const ENVELOPE_FORMAT: u16 = 8;
/// A format of an interim build, never released.
const INTERIM_FORMAT: u16 = 7;

/// A record as read from a log of any version.
#[derive(Debug)]
pub(crate) enum Logged {
    /// Format version 8 on.
    Current(Envelope),
    /// Versions 1 to 6.
    Legacy(LogEnvelope),
}

impl wal::Record for Logged {
    fn decode(payload: &[u8], version: u16) -> Result<Logged, String> {
        if version == INTERIM_FORMAT {
            Err("log format 7 was an unreleased interim and is not read".to_owned())
        } else if version >= ENVELOPE_FORMAT {
            Envelope::from_bytes(payload).map(Logged::Current).map_err(|e| e.to_string())
        } else {
            LogEnvelope::from_bytes(payload).map(Logged::Legacy).map_err(|e| e.to_string())
        }
    }
}

impl Logged {
    /// The envelope, ready to apply: a legacy record converted. A device key it carries stays
    /// sealed, opened on first use ([`Command::check_key`] checks the vault key).
    pub(crate) fn into_envelope(self, vault: &Vault) -> Result<Envelope, RecordError> {
        match self {
            Logged::Current(envelope) => Ok(envelope),
            Logged::Legacy(record) => record.to_envelope(vault),
        }
    }
}

/// A log record's buffer to start with: a payment's records fit in it.
const RECORD_CAPACITY: usize = 512;

impl Envelope {
    /// The log record of this envelope, in a buffer allocated once: a payment's reservation is
    /// about 320 bytes and its completion 240 (56 when decided in the shard), and a buffer
    /// grown from empty would be reallocated on the way there.
    pub(crate) fn to_bytes(&self) -> rkyv::util::AlignedVec {
        self.encode_in(rkyv::util::AlignedVec::with_capacity(RECORD_CAPACITY))
    }

    /// The log record of this envelope, in `buffer` (emptied first): a shard encodes every
    /// record in the one buffer it keeps. A [`Command::Decided`] is written compact
    /// ([`DecidedRecord`]).
    pub(crate) fn encode_in(&self, mut buffer: rkyv::util::AlignedVec) -> rkyv::util::AlignedVec {
        buffer.clear();
        let written = match self.command {
            Command::Decided { outcome } => {
                let record = DecidedRecord { now_ms: self.now_ms, outcome };
                rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(&record, buffer)
            }
            _ => rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(self, buffer),
        };
        written.expect("commands always serialize")
    }

    /// A record's payload, validated and deserialized: a compact [`DecidedRecord`] by its
    /// length, any other as an archived envelope.
    pub(crate) fn from_bytes(payload: &[u8]) -> Result<Envelope, RecordError> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
        aligned.extend_from_slice(payload);
        if payload.len() == DECIDED_RECORD_LEN {
            let record = rkyv::from_bytes::<DecidedRecord, rkyv::rancor::Error>(&aligned)
                .map_err(|_| RecordError("archive"))?;
            return Ok(record.into_envelope());
        }
        rkyv::from_bytes::<Envelope, rkyv::rancor::Error>(&aligned)
            .map_err(|_| RecordError("archive"))
    }
}

/// The record of a [`Command::Decided`] (log format 11 on): the provider's answer given in the
/// step that reserved the payment, and that step's time; nothing else, as the reservation
/// before it in the log names the payment. A payment whose provider decides in process is then
/// logged as its reservation and these 56 bytes, not a second envelope of 208 bytes and more
/// (the writer's bytes, the disk's and a cluster's stream's fall by about a third, and the shard
/// encodes one envelope a payment, not two).
///
/// Told from an envelope by its length alone: an archived envelope is never shorter than its
/// root, [`DECIDED_RECORD_LEN`] is shorter, and an archive of either kind has a fixed length
/// for its root.
#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct DecidedRecord {
    now_ms: i64,
    #[rkyv(with = Via<OutcomeLeaf>)]
    outcome: AuthOutcome,
}

/// The length of a [`DecidedRecord`]'s archive: its root, with nothing out of line.
const DECIDED_RECORD_LEN: usize = std::mem::size_of::<ArchivedDecidedRecord>();
const _: () = assert!(DECIDED_RECORD_LEN < std::mem::size_of::<super::state::ArchivedEnvelope>());

impl DecidedRecord {
    fn into_envelope(self) -> Envelope {
        let DecidedRecord { now_ms, outcome } = self;
        let command = Command::Decided { outcome };
        Envelope { owner_hash: 0, client_request_id: None, digest: 0, now_ms, command }
    }
}

impl Envelope {
    /// A small, valid record for the fuzz targets' logs: provider `n`'s terminal `text`
    /// removed.
    pub(crate) fn sample(n: u64, text: &str) -> Envelope {
        Envelope {
            owner_hash: n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            client_request_id: Some(u128::from(n) << 64 | 7),
            digest: n ^ 0x5555,
            now_ms: 1_700_000_000_000 + n as i64,
            command: Command::RemoveTerminals {
                provider_code: n as u32,
                terminal_ids: vec![text.to_owned()],
            },
        }
    }
}

impl Command {
    /// Checks that the device key a command read back from the log carries (if any) opens
    /// under `vault`; true if it carries one. Recovery opens no key (each opens on first use),
    /// but checks the first of each log, so that data written under another vault key is
    /// refused at start.
    pub(crate) fn check_key(&self, vault: &Vault) -> Result<bool, RecordError> {
        let Some((idm, key)) = self.issued_key() else { return Ok(false) };
        if key.plain.is_none() {
            open_key(vault, &key.sealed, &idm)?;
        }
        Ok(true)
    }
}

const _: () = assert!(FORMAT_VERSION >= ENVELOPE_FORMAT);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::age::AgeRules;
    use crate::age::VerificationMethod;
    use crate::age::{AgeCheck, AgeConfig, AgePolicy, AgeRecord, AgeVerdict, Basket, BasketItem};
    use crate::codes::CouponEffect;
    use crate::inherent::InherentId;
    use crate::keys::{NewDeviceKey, Verified};
    use crate::providers::TerminalEntry;
    use crate::shard::state::{Acknowledged, CodeSpec, NewMeans, RedeemSpec, TerminalContext};
    use crate::types::{
        Approval, AuthCode, AuthOutcome, CardToken, Currency, Discount, MeansKind, ReasonCode,
        TerminalService, UserIdType, UserKey,
    };

    /// One command of every kind, with every optional part present somewhere.
    fn every_command(vault: &Vault, age: &AgeRules) -> Vec<Command> {
        let user = UserKey::new(UserIdType::Mail, "a@b.c").unwrap();
        let jpy = Currency::try_from("JPY").unwrap();
        let policy = age.config.resolve(&AgePolicy { strict: true, ..AgePolicy::default() });
        let policy = policy.unwrap();
        let record = InherentId {
            key_version: 1,
            amount_minor: 1_000,
            currency: jpy,
            means: MeansKind::CreditCard,
            means_id: 0,
            provider_code: 42,
            card_idm: [1, 2, 3, 4, 5, 6, 7, 8],
            user: user.clone(),
            terminal_id: "TERM-0001".into(),
            counter: 7,
            timestamp_ms: 1_700_000_000_000,
        };
        let verified = Verified { record, digest: [5; 32] };
        let basket = Basket {
            age_confirmation: true,
            items: vec![BasketItem {
                item_id: "beer".into(),
                category: "alcohol".into(),
                quantity: 2,
                unit_amount_minor: 500,
            }],
        };
        let terminal = TerminalContext {
            provider_known: true,
            policy: Some(policy.clone()),
            discount: Some(Discount::Fixed { amount_minor: 50, currency: jpy }),
        };
        let spec =
            CodeSpec { validity_ms: 60_000, deliver_to: Some([9; 8]), order_ref: "O".into() };
        let approved = AuthOutcome::Approved(Approval {
            auth_code: AuthCode(*b"ABC123"),
            provider_code: 42,
            amount_requested_minor: 1_000,
            discount_minor: 50,
            amount_final_minor: 950,
            currency: jpy,
        });
        let store = crate::geo::Store {
            store_id: "S-1".into(),
            name: "Shop".into(),
            industry: String::new(),
            address: String::new(),
            latitude: 35.0,
            longitude: 139.0,
            beacons: vec!["B-1".into()],
            wifi: Vec::new(),
            qr_code: None,
            accepts: Vec::new(),
        };
        let redeem = RedeemSpec {
            number: 42,
            amount_minor: 100,
            currency: jpy,
            terminal_id: "T-1".into(),
            sale_at_ms: 3,
            lines: crate::engine::SaleLines::Basket(basket.clone()),
            coupon: Some(7),
            order_ref: String::new(),
        };
        let age_record = AgeRecord {
            key_version: 1,
            card_idm: [1; 8],
            user: user.clone(),
            birth_date: jiff::civil::date(1990, 2, 3),
            method: VerificationMethod::DocumentChip,
            verified_at_ms: 1,
            valid_until_ms: 2,
            counter: 3,
            timestamp_ms: 4,
        };
        let key = || NewDeviceKey::random(vault, &[1; 8]);
        vec![
            Command::Enroll {
                user: user.clone(),
                password_phc: "$argon2id$x".into(),
                idm: [1; 8],
                key: key(),
                device_free: Some(false),
            },
            Command::ProvisionDevice {
                user: user.clone(),
                idm: [1; 8],
                key: key(),
                device_free: None,
            },
            Command::RotateDeviceKey { user: user.clone(), idm: [1; 8], key: key() },
            Command::RevokeDeviceKey { user: user.clone(), idm: [1; 8], key: key() },
            Command::AddMeans {
                user: user.clone(),
                means: NewMeans {
                    kind: MeansKind::CreditCard,
                    label: "VISA".into(),
                    sealed: Some((CardToken([3; 16]), *b"4444", vault.seal(b"4111", b"t"))),
                },
                make_default: true,
            },
            Command::SetDefaultMeans { user: user.clone(), means_id: 2 },
            Command::LoginAttempt { user: user.clone(), success: false },
            Command::AuthReserve {
                verified: verified.clone(),
                basket: Some(Box::new(basket)),
                terminal: Some(Box::new(terminal.clone())),
            },
            Command::AuthReserve { verified: verified.clone(), basket: None, terminal: None },
            Command::AuthComplete {
                key: (9, 10),
                digest: Some(77),
                user: user.clone(),
                means_id: 1,
                outcome: approved,
                verdict: Some(Box::new(AgeVerdict {
                    check: AgeCheck::Held,
                    items: vec!["beer".into()],
                    amount_minor: 1_000,
                })),
            },
            Command::RegisterAge { record: age_record, tag: [8; 32] },
            Command::SetAgePolicy {
                provider_code: 42,
                terminal_id: "T-1".into(),
                policy: Some(policy.policy.clone()),
            },
            Command::UpsertStore { store: Box::new(store), signals_free: Some(true) },
            Command::TopUp { user: user.clone(), means_id: 2, amount_minor: 5, currency: jpy },
            Command::CodeReserve {
                verified,
                spec: Box::new(spec.clone()),
                terminal: Some(Box::new(TerminalContext::default())),
            },
            Command::CodeComplete {
                key: (9, 11),
                digest: None,
                user: user.clone(),
                means_id: 1,
                outcome: AuthOutcome::Declined(ReasonCode::ProviderTimeout),
                spec: Box::new(spec),
                terminal_id: "T-1".into(),
            },
            Command::RedeemCode { spec: Box::new(redeem), policies: Some(vec![(42, policy)]) },
            Command::SweepCodes,
            Command::NotifyDelivery { user: user.clone(), devices: 3 },
            Command::IssueCoupon {
                user,
                provider_code: 42,
                effect: CouponEffect::Fixed { amount_minor: 10, currency: jpy },
                uses: 1,
                expires_ms: 9,
            },
            Command::RemoveStore { store_id: "S-1".into(), moved: true },
            Command::RegisterTerminals {
                provider_code: 42,
                terminals: vec![TerminalEntry {
                    terminal_id: "T-1".into(),
                    service: Some(TerminalService {
                        discount: Discount::Percent { bps: 250 },
                        valid_from_ms: 0,
                        valid_until_ms: 10,
                        description: "d".into(),
                    }),
                }],
            },
            Command::RemoveTerminals { provider_code: 42, terminal_ids: vec!["T-1".into()] },
            Command::Forwarded { operation_id: 7, answer: Acknowledged::Accepted },
            Command::Forwarded {
                operation_id: 8,
                answer: Acknowledged::Refused("InvalidState".into()),
            },
            Command::Abandoned { key: (9, 12), digest: 78 },
            Command::VoidCode { number: 12, terminal_id: "T-1".into() },
            Command::RefundCode { number: 12, amount_minor: 300, terminal_id: "T-1".into() },
            Command::RefundPayment {
                payment: (9, 1 << 100),
                amount_minor: 300,
                terminal_id: "T-1".into(),
            },
        ]
    }

    /// The command is the record: every kind of command is logged as it is and reads back the
    /// same (a device key's clear form is not in the record: it stays sealed, and the check of
    /// the vault key that recovery makes refuses it under another vault key).
    /// A log record's root is found from its end: the archived envelope's size must not move
    /// when a command is added, or every older record would be read at the wrong place.
    #[test]
    fn the_archived_envelope_keeps_its_size() {
        assert_eq!(std::mem::size_of::<super::super::state::ArchivedEnvelope>(), 208);
        assert_eq!(std::mem::size_of::<super::super::state::ArchivedCommand>(), 144);
    }

    #[test]
    fn every_command_reads_back_as_logged() {
        let vault = Vault::new(&[7; 32]);
        let age = AgeRules::new(AgeConfig::default()).unwrap();
        for command in every_command(&vault, &age) {
            let envelope = Envelope {
                owner_hash: 9,
                client_request_id: Some(3),
                digest: 4,
                now_ms: 5,
                command,
            };
            let bytes = envelope.to_bytes();
            let read = <Logged as wal::Record>::decode(&bytes, FORMAT_VERSION).unwrap();
            let Logged::Current(archived) = &read else { panic!("a current record") };
            if let Command::Enroll { key, .. } = &archived.command {
                assert!(key.plain.is_none(), "the key's clear form is never archived");
                let bytes_clear = envelope.command_key_bytes().unwrap();
                let found = bytes.windows(32).any(|w| w == bytes_clear);
                assert!(!found, "the record does not hold the key in the clear");
            }
            let read = read.into_envelope(&vault).unwrap();
            // The key stays sealed (opened on first use): the envelope as made, but for its
            // key's clear form.
            let mut sealed_only = envelope.clone();
            sealed_only.command.forget_clear_key();
            assert_eq!(format!("{read:?}"), format!("{sealed_only:?}"));
            assert_eq!(read.command.is_resolved(), envelope.command.is_resolved());
            let has_key = envelope.command_key_bytes().is_some();
            assert_eq!(read.command.check_key(&vault).unwrap(), has_key);
            let other = Vault::new(&[8; 32]);
            let with_other = read.command.check_key(&other);
            assert_eq!(with_other.is_err(), has_key, "{:?}", envelope.command);
        }
    }

    /// A decided outcome is logged compact (format 11): 56 bytes, its time and outcome read back,
    /// the rest of its envelope (which the reservation before it names) not kept. A record of
    /// any other length is read as an envelope, and a compact one damaged is refused.
    #[test]
    fn a_decided_outcome_is_logged_compact_and_reads_back() {
        let approval = crate::types::Approval {
            auth_code: crate::types::AuthCode(*b"A1B2C3"),
            provider_code: 7,
            amount_requested_minor: 1_000,
            discount_minor: 100,
            amount_final_minor: 900,
            currency: crate::types::Currency::try_from("JPY").unwrap(),
        };
        let declined = AuthOutcome::Declined(crate::types::ReasonCode::ProviderTimeout);
        for outcome in [AuthOutcome::Approved(approval), declined] {
            let command = Command::Decided { outcome };
            let envelope =
                Envelope { owner_hash: 9, client_request_id: None, digest: 4, now_ms: 5, command };
            let bytes = envelope.to_bytes();
            assert_eq!(bytes.len(), super::DECIDED_RECORD_LEN);
            assert_eq!(super::DECIDED_RECORD_LEN, 56);
            let read = <Logged as wal::Record>::decode(&bytes, FORMAT_VERSION).unwrap();
            let read = read.into_envelope(&Vault::new(&[7; 32])).unwrap();
            assert_eq!(read.now_ms, 5);
            assert!(matches!(read.command, Command::Decided { outcome: o } if o == outcome));
            let mut damaged = bytes.to_vec();
            damaged[8] = 0xff;
            assert!(<Logged as wal::Record>::decode(&damaged, FORMAT_VERSION).is_err());
        }
    }

    impl Command {
        /// Drops the clear form of the device key the command carries, as the log does.
        fn forget_clear_key(&mut self) {
            if let Command::Enroll { key, .. }
            | Command::ProvisionDevice { key, .. }
            | Command::RotateDeviceKey { key, .. }
            | Command::RevokeDeviceKey { key, .. } = self
            {
                key.plain = None;
            }
        }
    }

    impl Envelope {
        /// The clear bytes of the device key the command carries, if any.
        fn command_key_bytes(&self) -> Option<[u8; 32]> {
            match &self.command {
                Command::Enroll { key, .. }
                | Command::ProvisionDevice { key, .. }
                | Command::RotateDeviceKey { key, .. }
                | Command::RevokeDeviceKey { key, .. } => key.plain.as_ref().map(|k| *k.expose()),
                _ => None,
            }
        }
    }
}
