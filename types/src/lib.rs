//! settlegate-types: the values every settlegate crate shares, and nothing that acts on them.
//!
//! - identifiers: [`UserKey`] and [`UserIdType`], [`Idm`], [`ClientRequestId`];
//! - money: [`Currency`], [`MeansKind`], [`CardToken`], [`AuthCode`];
//! - outcomes: [`ReasonCode`] (the wire's refusal and decline reasons), [`AuthOutcome`];
//! - [`limits`]: the limits a client can see on the wire.
//!
//! The wire codec (`settlegate-protocol`), the provider adapters and the engine all build on
//! this crate; it depends on nothing heavier than `serde`.
#![deny(missing_docs)]

pub mod histogram;
pub mod ids;
pub mod limits;
pub mod money;
pub mod outcome;

pub use ids::{ClientRequestId, Idm, UserIdType, UserKey};
pub use money::{AuthCode, CardToken, Currency, CurrencyError, MeansKind};
pub use outcome::{Approval, AuthOutcome, ReasonCode};
