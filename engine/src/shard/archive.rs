//! How the shard's state types archive (rkyv) where a field's type is not the engine's to
//! derive on: the simple types of `types.rs` and the adapters (`UserKey`, `Currency`,
//! `MeansKind`, `AuthCode`, `CardToken`, `ReasonCode`, `AuthOutcome`, `TerminalService`),
//! jiff's `Date`, and `CouponEffect` (public, with named fields in its variants, for which the
//! derive would make a public resolver with undocumented fields). A state type marks such a field `#[rkyv(with = Via<L>)]`: it is archived as
//! the leaf `L` (bytes, a number, or for the two with several fields a small documented
//! mirror), and checked again when read back (a `UserKey` is validated, a currency must be
//! three upper-case letters, ...), so an archive that passes its checksum yet holds an invalid
//! value is refused, never trusted.
//!
//! Once those types live in a crate of their own they can derive rkyv there, and their leaves
//! here go.

use std::marker::PhantomData;

use rkyv::rancor::{Fallible, Source};
use rkyv::with::{ArchiveWith, DeserializeWith, SerializeWith};
use rkyv::{Archive, Deserialize, Place, Serialize};

use std::sync::Arc;

use crate::codes::CouponEffect;
use crate::types::{
    Approval, AuthCode, AuthOutcome, CardToken, Currency, Discount, MeansKind, ReasonCode,
    TerminalService, UserIdType, UserKey,
};
use crate::vault::{ArchivedSealedNumber, SealedNumber};

/// A value read back from an archive that is not a valid value of its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid archived {0}")]
pub(crate) struct LeafError(pub(crate) &'static str);

/// How a foreign type `T` is archived: as `Self`, converted both ways.
pub(crate) trait Leaf<T>: Archive + Sized {
    /// The leaf of `value`.
    fn leaf(value: &T) -> Self;
    /// The value an archived leaf holds, checked.
    fn value(archived: &Self::Archived) -> Result<T, LeafError>;
}

/// The rkyv wrapper that archives a field of type `T` as its leaf `L`.
pub(crate) struct Via<L>(PhantomData<L>);

impl<T, L: Leaf<T>> ArchiveWith<T> for Via<L> {
    type Archived = L::Archived;
    type Resolver = L::Resolver;

    fn resolve_with(field: &T, resolver: L::Resolver, out: Place<L::Archived>) {
        // The same leaf as `serialize_with` made (the conversion is deterministic).
        L::leaf(field).resolve(resolver, out)
    }
}

impl<T, L: Leaf<T> + Serialize<S>, S: Fallible + ?Sized> SerializeWith<T, S> for Via<L> {
    fn serialize_with(field: &T, serializer: &mut S) -> Result<L::Resolver, S::Error> {
        L::leaf(field).serialize(serializer)
    }
}

impl<T, L: Leaf<T>, D> DeserializeWith<L::Archived, T, D> for Via<L>
where
    D: Fallible + ?Sized,
    D::Error: Source,
{
    fn deserialize_with(archived: &L::Archived, _: &mut D) -> Result<T, D::Error> {
        L::value(archived).map_err(D::Error::new)
    }
}

/// The rkyv wrapper that archives a `UserKey` as the tuple `(u8, String)` archives: its ID
/// type's byte and its ID. Written from the key itself: a leaf (`Via<(u8, String)>`, as the
/// field was archived before) would make a `String` for each of `serialize` and `resolve`, four
/// allocations per payment in its two log records and two per idempotency record in a
/// snapshot. The bytes are the same.
pub(crate) struct UserKeyVia;

/// What a user key is archived as.
type UserKeyArchived = <(u8, String) as Archive>::Archived;

impl ArchiveWith<UserKey> for UserKeyVia {
    type Archived = UserKeyArchived;
    type Resolver = <(u8, String) as Archive>::Resolver;

    fn resolve_with(user: &UserKey, (_, id): Self::Resolver, out: Place<UserKeyArchived>) {
        rkyv::munge::munge!(let rkyv::tuple::ArchivedTuple2(id_type, archived_id) = out);
        (user.id_type() as u8).resolve((), id_type);
        rkyv::string::ArchivedString::resolve_from_str(user.id(), id, archived_id);
    }
}

impl<S> SerializeWith<UserKey, S> for UserKeyVia
where
    S: Fallible + ?Sized,
    S::Error: Source,
    str: rkyv::SerializeUnsized<S>,
{
    fn serialize_with(user: &UserKey, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        Ok(((), rkyv::string::ArchivedString::serialize_from_str(user.id(), serializer)?))
    }
}

impl<D> DeserializeWith<UserKeyArchived, UserKey, D> for UserKeyVia
where
    D: Fallible + ?Sized,
    D::Error: Source,
{
    fn deserialize_with(archived: &UserKeyArchived, _: &mut D) -> Result<UserKey, D::Error> {
        let id_type = UserIdType::from_u8(archived.0).ok_or(LeafError("user id type"));
        let id_type = id_type.map_err(D::Error::new)?;
        UserKey::new(id_type, archived.1.as_str()).map_err(|_| D::Error::new(LeafError("user id")))
    }
}

/// A currency: its three letters.
impl Leaf<Currency> for [u8; 3] {
    fn leaf(currency: &Currency) -> Self {
        currency.bytes()
    }

    fn value(archived: &[u8; 3]) -> Result<Currency, LeafError> {
        Currency::from_bytes(*archived).map_err(|_| LeafError("currency"))
    }
}

/// A means kind: its byte.
impl Leaf<MeansKind> for u8 {
    fn leaf(kind: &MeansKind) -> Self {
        *kind as u8
    }

    fn value(archived: &u8) -> Result<MeansKind, LeafError> {
        MeansKind::from_u8(*archived).ok_or(LeafError("means kind"))
    }
}

/// An authorization code: its six characters.
impl Leaf<AuthCode> for [u8; 6] {
    fn leaf(code: &AuthCode) -> Self {
        code.0
    }

    fn value(archived: &[u8; 6]) -> Result<AuthCode, LeafError> {
        Ok(AuthCode(*archived))
    }
}

/// A vault token: its bytes.
impl Leaf<CardToken> for [u8; 16] {
    fn leaf(token: &CardToken) -> Self {
        token.0
    }

    fn value(archived: &[u8; 16]) -> Result<CardToken, LeafError> {
        Ok(CardToken(*archived))
    }
}

/// A reason code: its wire code.
impl Leaf<ReasonCode> for u16 {
    fn leaf(reason: &ReasonCode) -> Self {
        reason.code()
    }

    fn value(archived: &rkyv::rend::u16_le) -> Result<ReasonCode, LeafError> {
        ReasonCode::from_code(archived.to_native()).ok_or(LeafError("reason code"))
    }
}

/// A civil date: year, month, day.
impl Leaf<jiff::civil::Date> for (i16, i8, i8) {
    fn leaf(date: &jiff::civil::Date) -> Self {
        (date.year(), date.month(), date.day())
    }

    fn value(archived: &Self::Archived) -> Result<jiff::civil::Date, LeafError> {
        jiff::civil::Date::new(archived.0.to_native(), archived.1, archived.2)
            .map_err(|_| LeafError("date"))
    }
}

/// The leaf of an [`AuthOutcome`] (a mirror of it: the outcome and its approval are types of
/// `types.rs`).
#[derive(Archive, Serialize, Deserialize, Debug)]
pub(crate) enum OutcomeLeaf {
    /// [`AuthOutcome::Approved`].
    Approved {
        #[rkyv(with = Via<[u8; 6]>)]
        auth_code: AuthCode,
        provider_code: u32,
        amount_requested_minor: u64,
        discount_minor: u64,
        amount_final_minor: u64,
        #[rkyv(with = Via<[u8; 3]>)]
        currency: Currency,
    },
    /// [`AuthOutcome::Declined`].
    Declined(#[rkyv(with = Via<u16>)] ReasonCode),
}

impl Leaf<AuthOutcome> for OutcomeLeaf {
    fn leaf(outcome: &AuthOutcome) -> Self {
        match *outcome {
            AuthOutcome::Approved(a) => OutcomeLeaf::Approved {
                auth_code: a.auth_code,
                provider_code: a.provider_code,
                amount_requested_minor: a.amount_requested_minor,
                discount_minor: a.discount_minor,
                amount_final_minor: a.amount_final_minor,
                currency: a.currency,
            },
            AuthOutcome::Declined(reason) => OutcomeLeaf::Declined(reason),
        }
    }

    fn value(archived: &ArchivedOutcomeLeaf) -> Result<AuthOutcome, LeafError> {
        Ok(match archived {
            ArchivedOutcomeLeaf::Approved {
                auth_code,
                provider_code,
                amount_requested_minor,
                discount_minor,
                amount_final_minor,
                currency,
            } => AuthOutcome::Approved(Approval {
                auth_code: <[u8; 6]>::value(auth_code)?,
                provider_code: provider_code.to_native(),
                amount_requested_minor: amount_requested_minor.to_native(),
                discount_minor: discount_minor.to_native(),
                amount_final_minor: amount_final_minor.to_native(),
                currency: <[u8; 3]>::value(currency)?,
            }),
            ArchivedOutcomeLeaf::Declined(reason) => AuthOutcome::Declined(u16::value(reason)?),
        })
    }
}

/// The leaf of a [`TerminalService`] (a mirror of it and its [`Discount`], types of
/// `types.rs`).
#[derive(Archive, Serialize, Deserialize, Debug)]
pub(crate) struct ServiceLeaf {
    /// The discount: a percentage in basis points, or an amount in a currency.
    discount: DiscountLeaf,
    valid_from_ms: i64,
    valid_until_ms: i64,
    description: String,
}

/// [`Discount`]'s leaf.
#[derive(Archive, Serialize, Deserialize, Debug)]
pub(crate) enum DiscountLeaf {
    /// [`Discount::Percent`]'s basis points.
    Percent(u16),
    /// [`Discount::Fixed`]'s amount and currency.
    Fixed(u64, #[rkyv(with = Via<[u8; 3]>)] Currency),
}

impl Leaf<Discount> for DiscountLeaf {
    fn leaf(discount: &Discount) -> Self {
        match *discount {
            Discount::Percent { bps } => DiscountLeaf::Percent(bps),
            Discount::Fixed { amount_minor, currency } => {
                DiscountLeaf::Fixed(amount_minor, currency)
            }
        }
    }

    fn value(archived: &ArchivedDiscountLeaf) -> Result<Discount, LeafError> {
        Ok(match archived {
            ArchivedDiscountLeaf::Percent(bps) => Discount::Percent { bps: bps.to_native() },
            ArchivedDiscountLeaf::Fixed(amount, currency) => Discount::Fixed {
                amount_minor: amount.to_native(),
                currency: <[u8; 3]>::value(currency)?,
            },
        })
    }
}

/// A store terminal's own age policy as a command carries it: the policy as given, its time
/// zone found again by name when read back (the bundled time zone database has every name a
/// policy was accepted with).
impl Leaf<crate::age::ResolvedPolicy> for crate::age::AgePolicy {
    fn leaf(resolved: &crate::age::ResolvedPolicy) -> Self {
        resolved.policy.clone()
    }

    fn value(archived: &Self::Archived) -> Result<crate::age::ResolvedPolicy, LeafError> {
        let policy: crate::age::AgePolicy = rkyv::deserialize::<_, rkyv::rancor::Error>(archived)
            .map_err(|_| LeafError("age policy"))?;
        crate::age::ResolvedPolicy::by_zone_name(policy).ok_or(LeafError("age policy time zone"))
    }
}

impl Leaf<TerminalService> for ServiceLeaf {
    fn leaf(service: &TerminalService) -> Self {
        ServiceLeaf {
            discount: DiscountLeaf::leaf(&service.discount),
            valid_from_ms: service.valid_from_ms,
            valid_until_ms: service.valid_until_ms,
            description: service.description.clone(),
        }
    }

    fn value(archived: &ArchivedServiceLeaf) -> Result<TerminalService, LeafError> {
        Ok(TerminalService {
            discount: DiscountLeaf::value(&archived.discount)?,
            valid_from_ms: archived.valid_from_ms.to_native(),
            valid_until_ms: archived.valid_until_ms.to_native(),
            description: archived.description.as_str().to_owned(),
        })
    }
}

/// The leaf of a [`CouponEffect`] (a mirror of it; see the module's documentation).
#[derive(Archive, Serialize, Deserialize, Debug)]
pub(crate) enum CouponLeaf {
    Percent(u16),
    Fixed(u64, #[rkyv(with = Via<[u8; 3]>)] Currency),
    OrderCode,
}

impl Leaf<CouponEffect> for CouponLeaf {
    fn leaf(effect: &CouponEffect) -> Self {
        match *effect {
            CouponEffect::Percent { bps } => CouponLeaf::Percent(bps),
            CouponEffect::Fixed { amount_minor, currency } => {
                CouponLeaf::Fixed(amount_minor, currency)
            }
            CouponEffect::OrderCode => CouponLeaf::OrderCode,
        }
    }

    fn value(archived: &ArchivedCouponLeaf) -> Result<CouponEffect, LeafError> {
        Ok(match archived {
            ArchivedCouponLeaf::Percent(bps) => CouponEffect::Percent { bps: bps.to_native() },
            ArchivedCouponLeaf::Fixed(amount, currency) => CouponEffect::Fixed {
                amount_minor: amount.to_native(),
                currency: <[u8; 3]>::value(currency)?,
            },
            ArchivedCouponLeaf::OrderCode => CouponEffect::OrderCode,
        })
    }
}

/// A sealed key as a device's keys hold it (version, and the key sealed, shared with the key
/// index), archived inline: an archived shared pointer would cost a validation and a
/// deserialization table entry per device on restore.
impl Leaf<(u16, Arc<SealedNumber>)> for (u16, SealedNumber) {
    fn leaf((version, sealed): &(u16, Arc<SealedNumber>)) -> Self {
        (*version, SealedNumber::clone(sealed))
    }

    fn value(archived: &Self::Archived) -> Result<(u16, Arc<SealedNumber>), LeafError> {
        Ok((archived.0.to_native(), Arc::new(sealed_value(&archived.1))))
    }
}

/// A sealed secret shared by `Arc` (a device key in a command), archived inline.
impl Leaf<Arc<SealedNumber>> for SealedNumber {
    fn leaf(sealed: &Arc<SealedNumber>) -> Self {
        SealedNumber::clone(sealed)
    }

    fn value(archived: &Self::Archived) -> Result<Arc<SealedNumber>, LeafError> {
        Ok(Arc::new(sealed_value(archived)))
    }
}

/// A rotated-out sealed key and the instant it is refused after, archived inline.
impl Leaf<(u16, Arc<SealedNumber>, i64)> for (u16, SealedNumber, i64) {
    fn leaf((version, sealed, until): &(u16, Arc<SealedNumber>, i64)) -> Self {
        (*version, SealedNumber::clone(sealed), *until)
    }

    fn value(archived: &Self::Archived) -> Result<(u16, Arc<SealedNumber>, i64), LeafError> {
        let sealed = Arc::new(sealed_value(&archived.1));
        Ok((archived.0.to_native(), sealed, archived.2.to_native()))
    }
}

fn sealed_value(archived: &ArchivedSealedNumber) -> SealedNumber {
    SealedNumber { nonce: archived.nonce, ciphertext: archived.ciphertext.to_vec() }
}

/// A card number as a new means carries it: its token, last four digits, and the number as
/// the vault sealed it.
impl Leaf<(CardToken, [u8; 4], SealedNumber)> for ([u8; 16], [u8; 4], SealedNumber) {
    fn leaf((token, last4, sealed): &(CardToken, [u8; 4], SealedNumber)) -> Self {
        (token.0, *last4, sealed.clone())
    }

    fn value(archived: &Self::Archived) -> Result<(CardToken, [u8; 4], SealedNumber), LeafError> {
        Ok((CardToken(archived.0), archived.1, sealed_value(&archived.2)))
    }
}

/// A store terminal's own age policy under a provider, as a redemption carries it.
impl Leaf<(u32, crate::age::ResolvedPolicy)> for (u32, crate::age::AgePolicy) {
    fn leaf((code, resolved): &(u32, crate::age::ResolvedPolicy)) -> Self {
        (*code, resolved.policy.clone())
    }

    fn value(archived: &Self::Archived) -> Result<(u32, crate::age::ResolvedPolicy), LeafError> {
        let policy =
            <crate::age::AgePolicy as Leaf<crate::age::ResolvedPolicy>>::value(&archived.1)?;
        Ok((archived.0.to_native(), policy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Archive, Serialize, Deserialize)]
    struct Keyed {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        n: u32,
    }

    #[derive(Archive, Serialize)]
    struct AsTuple {
        user: (u8, String),
        n: u32,
    }

    fn tuple_bytes(id_type: u8, id: &str) -> rkyv::util::AlignedVec {
        let value = AsTuple { user: (id_type, id.to_owned()), n: 7 };
        rkyv::to_bytes::<rkyv::rancor::Error>(&value).unwrap()
    }

    #[test]
    fn a_user_key_archives_as_the_tuple_it_was_archived_as_before() {
        // An ID short enough to be archived inline, and one stored out of line.
        for id in ["a@b.c", "an-address-longer-than-any-inline-string@example.com"] {
            let user = UserKey::new(UserIdType::Mail, id).unwrap();
            let keyed = Keyed { user: user.clone(), n: 7 };
            let ours = rkyv::to_bytes::<rkyv::rancor::Error>(&keyed).unwrap();
            assert_eq!(ours.as_slice(), tuple_bytes(UserIdType::Mail as u8, id).as_slice());
            let back = rkyv::from_bytes::<Keyed, rkyv::rancor::Error>(&ours).unwrap();
            assert_eq!((back.user, back.n), (user, 7));
        }
    }

    #[test]
    fn an_archived_user_key_that_is_not_valid_is_refused() {
        let read = |bytes: &[u8]| rkyv::from_bytes::<Keyed, rkyv::rancor::Error>(bytes).is_ok();
        assert!(read(&tuple_bytes(UserIdType::Mail as u8, "a@b.c")));
        assert!(!read(&tuple_bytes(200, "a@b.c")), "an ID type that does not exist");
        assert!(!read(&tuple_bytes(UserIdType::Mail as u8, "not a mail address")));
    }
}
