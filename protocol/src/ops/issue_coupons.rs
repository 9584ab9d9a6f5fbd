//! `ISSUE_COUPONS` (0x0063): issue coupons or service codes to users (C5).

use settlegate_types::limits::COUPON_USERS_MAX;
use settlegate_types::{ClientRequestId, ReasonCode, UserKey};

use crate::ops::Operation;
use crate::values::{decode_result, encode_result, Codec, CouponEffect, IssuedCoupon};
use crate::wire::{BodyError, Reader, Writer};

/// Issue a coupon to each of 1 to 256 users; the reply has a result per user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueCoupons {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The provider issuing.
    pub provider_code: u32,
    /// What the coupons do.
    pub effect: CouponEffect,
    /// Uses of each.
    pub uses: u32,
    /// When they expire, ms.
    pub expires_ms: i64,
    /// The users.
    pub users: Vec<UserKey>,
}

/// Each user's coupon, or why it was refused: `u16` count, then each result.
impl Codec for Vec<Result<IssuedCoupon, ReasonCode>> {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u16(self.len() as u16);
        for result in self {
            encode_result(w, result);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, BodyError> {
        let count = r.u16("count")? as usize;
        if count > COUPON_USERS_MAX {
            return Err(BodyError::Invalid("count"));
        }
        let mut results = Vec::with_capacity(count);
        for _ in 0..count {
            results.push(decode_result(r)?);
        }
        Ok(results)
    }
}

impl Operation for IssueCoupons {
    const OPCODE: u16 = 0x0063;
    const NAME: &'static str = "issue_coupons";
    type Reply = Vec<Result<IssuedCoupon, ReasonCode>>;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id).u32(self.provider_code);
        self.effect.encode(w);
        w.u32(self.uses).i64(self.expires_ms).u16(self.users.len() as u16);
        for user in &self.users {
            w.user(user);
        }
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<IssueCoupons, BodyError> {
        let client_request_id = r.u128("client_request_id")?;
        let provider_code = r.u32("provider_code")?;
        let effect = CouponEffect::decode(r)?;
        let uses = r.u32("uses")?;
        let expires_ms = r.i64("expires_ms")?;
        let count = r.u16("user_count")? as usize;
        if count == 0 || count > COUPON_USERS_MAX {
            return Err(BodyError::Invalid("user_count (1..=256)"));
        }
        let mut users = Vec::with_capacity(count);
        for _ in 0..count {
            users.push(r.user()?);
        }
        Ok(IssueCoupons { client_request_id, provider_code, effect, uses, expires_ms, users })
    }
}
