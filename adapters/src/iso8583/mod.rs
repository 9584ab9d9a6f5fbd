//! An ISO 8583 (1987) provider adapter: authorizations forwarded to a host over one TCP
//! connection (optionally TLS), binary bitmap, 2-byte length header.
//!
//! Layers, each in its own file:
//!
//! - [`codec`]: bytes to [`codec::Message`] and back, no I/O; the field table.
//! - `mapping`: settlegate requests to 0100/0200, 0400/0401 (or 0420/0421) and 0800 messages,
//!   lifecycle operations to 0220/0200/0400/0420 messages naming their original (field 90),
//!   and response codes back to outcomes ([`RESPONSE_CODES`], [`LIFECYCLE_RESPONSE_CODES`]).
//! - `dialect`: the configured dialect (the field table, field 41 mapping, RRN format,
//!   response-code overrides, reversal MTI), checked and compiled; the 1987 layout by default,
//!   pinned byte for byte by the `golden` test.
//! - `tls`: [`TlsConfig`], TLS to the host with rustls.
//! - `breaker`: the circuit breaker's pure state machine.
//! - `conn`: the connection task: connect with backoff, sign-on, echo, the in-flight map,
//!   timeouts and reversals.
//! - `io`: the reader and writer tasks of each connection.
//! - `config`: [`Iso8583Config`] and its validation.
//!
//! The connection runs on the adapter's own thread (a current-thread Tokio runtime), so the
//! adapter works whether or not it is built inside a runtime, and every timer that decides an
//! outcome lives there. [`Iso8583Adapter::authorize`] only checks the request, reveals the PAN
//! through the [`Detokenizer`] and queues it: when the breaker is open or the host is not
//! signed on it answers at once, without I/O.
//!
//! Outcomes, and what is sent:
//!
//! - Card means with a token the vault knows: an 0100 (or 0200) with the PAN in field 2. The
//!   reply is matched by STAN (field 11) and RRN (field 37) and mapped by [`RESPONSE_CODES`].
//! - Other means, no token, a token the vault does not know, or a PAN that is not 12 to 19
//!   digits: declined [`DeclineReason::InvalidAccount`] without contacting the host.
//! - An amount over twelve digits: declined [`DeclineReason::LimitExceeded`], locally.
//! - A currency outside [`mapping::CURRENCY_NUMERIC`], or a terminal ID longer than 8
//!   characters that neither `terminal_ids` maps nor `long_terminal_ids = "derive"` derives:
//!   [`AdapterError::Config`] (the provider is configured for terminals or currencies this
//!   host cannot carry).
//! - No reply within `response_timeout_ms`, or the connection lost with the request in flight:
//!   [`AdapterError::Timeout`], and an 0400 (or 0420) reversal is sent (repeated as 0401 up to
//!   `reversal_attempts_max` times; held until the next sign-on while disconnected). A late
//!   reply finds no entry and is dropped. An approval that arrives after the caller gave up
//!   (the engine's deadline dropped the future) is reversed too.
//!
//! - A lifecycle operation ([`ProviderAdapter::lifecycle`]): a capture as 0220 (or 0200 with
//!   `capture_mti = "0200"`), a void as 0400/0420 with field 39 `17`, a refund as 0200 with
//!   processing code [`REFUND_PROCESSING_CODE`], a reversal as for a timeout; each under its
//!   own STAN with the original's RRN and field 90. Answered once (no repeats): a timeout is
//!   [`AdapterError::Timeout`], for the caller to ask again.
//!
//! The PAN is never logged, never part of an error, and masked in [`codec::Message`]'s
//! `Debug`; the buffers that held it are zeroized once written.
//!
//! [`DeclineReason::InvalidAccount`]: crate::DeclineReason::InvalidAccount
//! [`DeclineReason::LimitExceeded`]: crate::DeclineReason::LimitExceeded

mod breaker;
pub mod codec;
mod config;
mod conn;
mod dialect;
#[cfg(test)]
mod golden;
mod io;
mod mapping;
mod tls;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

pub use config::{
    Iso8583Config, MessageClass, DURATION_MS_LIMIT, IN_FLIGHT_LIMIT, REVERSAL_QUEUE_LIMIT, STAN_MAX,
};
pub use dialect::{
    derived_terminal_id, CaptureMti, FieldConfig, FieldSource, LongTerminalIds, Padding,
    ResponseOutcome, ReversalMti, RrnFormat, ADAPTER_OWNED_FIELDS, LOCAL_OFFSET_MINUTES,
    TERMINAL_ID_FULL_LEN_MAX,
};
pub use mapping::{
    currency_numeric, response_mapping, ReplyMapping, AMOUNT_MINOR_MAX, CURRENCY_NUMERIC,
    LIFECYCLE_RESPONSE_CODES, REFUND_PROCESSING_CODE, RESPONSE_CODES, TERMINAL_ID_LEN,
    VOID_REASON_CODE,
};
pub use tls::TlsConfig;

use crate::{
    AdapterError, AuthorizationRequest, DeclineReason, Detokenizer, LifecycleReply,
    LifecycleRequest, MeansKind, Operation, ProviderAdapter, ProviderReply, RefusalReason,
};

/// The link's state as requests see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStatus {
    /// Not (yet) signed on; the breaker is closed. Requests fail fast as unavailable.
    Connecting,
    /// Signed on, breaker closed: requests go to the host.
    Ready,
    /// The breaker is open: requests fail fast until echoes succeed again.
    BreakerOpen,
}

impl LinkStatus {
    fn from_u8(value: u8) -> LinkStatus {
        match value {
            1 => LinkStatus::Ready,
            2 => LinkStatus::BreakerOpen,
            _ => LinkStatus::Connecting,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            LinkStatus::Connecting => 0,
            LinkStatus::Ready => 1,
            LinkStatus::BreakerOpen => 2,
        }
    }
}

/// Counters since the adapter started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Iso8583Stats {
    /// Authorizations approved by the host.
    pub approved: u64,
    /// Authorizations declined by the host.
    pub declined: u64,
    /// Authorizations timed out (no reply in time, or the connection lost).
    pub timeouts: u64,
    /// Reversals (0400 and 0401) written.
    pub reversals_sent: u64,
    /// Reversals the host acknowledged (0410).
    pub reversals_acked: u64,
    /// Reversals given up after `reversal_attempts_max` attempts, or dropped from a full queue.
    pub reversals_failed: u64,
    /// Well-formed replies that matched nothing in flight (late, or unknown STAN/RRN).
    pub unmatched_replies: u64,
    /// Messages that could not be decoded or interpreted, dropped.
    pub malformed_replies: u64,
    /// Sign-ons acknowledged.
    pub sign_ons: u64,
    /// Echo tests acknowledged.
    pub echoes_ok: u64,
    /// Times the breaker opened.
    pub breaker_opened: u64,
    /// Times the breaker closed again.
    pub breaker_closed: u64,
    /// Lifecycle operations (captures, voids, refunds, reversals asked for) the host accepted.
    pub operations_accepted: u64,
    /// Lifecycle operations the host refused.
    pub operations_refused: u64,
}

/// The counters, shared with the connection task.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    approved: AtomicU64,
    declined: AtomicU64,
    timeouts: AtomicU64,
    reversals_sent: AtomicU64,
    reversals_acked: AtomicU64,
    reversals_failed: AtomicU64,
    unmatched_replies: AtomicU64,
    malformed_replies: AtomicU64,
    sign_ons: AtomicU64,
    echoes_ok: AtomicU64,
    breaker_opened: AtomicU64,
    breaker_closed: AtomicU64,
    operations_accepted: AtomicU64,
    operations_refused: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Iso8583Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Iso8583Stats {
            approved: get(&self.approved),
            declined: get(&self.declined),
            timeouts: get(&self.timeouts),
            reversals_sent: get(&self.reversals_sent),
            reversals_acked: get(&self.reversals_acked),
            reversals_failed: get(&self.reversals_failed),
            unmatched_replies: get(&self.unmatched_replies),
            malformed_replies: get(&self.malformed_replies),
            sign_ons: get(&self.sign_ons),
            echoes_ok: get(&self.echoes_ok),
            breaker_opened: get(&self.breaker_opened),
            breaker_closed: get(&self.breaker_closed),
            operations_accepted: get(&self.operations_accepted),
            operations_refused: get(&self.operations_refused),
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// State shared between the adapter handle and its connection task.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    status: AtomicU8,
    counters: Counters,
    /// Reversals owed to the host now: written and unacknowledged, or queued for a link.
    reversals_pending: AtomicU64,
}

/// Work handed to the connection task. Not `Debug`: it holds the PAN.
pub(crate) enum Submission {
    /// An authorization.
    Authorize {
        request: AuthorizationRequest,
        pan: Zeroizing<String>,
        reply: oneshot::Sender<Result<ProviderReply, AdapterError>>,
    },
    /// A capture, void, refund or reversal of `original` (rebuilt from the request's reference).
    Lifecycle {
        request: LifecycleRequest,
        original: mapping::Original,
        pan: Option<Zeroizing<String>>,
        reply: oneshot::Sender<Result<LifecycleReply, AdapterError>>,
    },
}

impl Submission {
    /// Answers it with `error`, unsent.
    pub(crate) fn fail(self, error: AdapterError) {
        match self {
            Submission::Authorize { reply, .. } => drop(reply.send(Err(error))),
            Submission::Lifecycle { reply, .. } => drop(reply.send(Err(error))),
        }
    }
}

/// The ISO 8583 adapter. Cheap to share; dropping the last handle stops its connection.
pub struct Iso8583Adapter {
    name: String,
    host_addr: String,
    submissions: mpsc::Sender<Submission>,
    shared: Arc<Shared>,
    detokenizer: Arc<dyn Detokenizer>,
    dialect: Arc<dialect::Dialect>,
}

impl Iso8583Adapter {
    /// Validates `config` and starts the connection (on its own thread) to the host.
    /// Returns at once: sign-on happens in the background ([`Iso8583Adapter::status`]).
    pub fn start(
        config: Iso8583Config,
        detokenizer: Arc<dyn Detokenizer>,
    ) -> Result<Iso8583Adapter, AdapterError> {
        config.validate()?;
        let dialect = Arc::new(config.dialect()?);
        let tls = config.tls.as_ref().map(|tls| tls.connector(&config.host_addr)).transpose()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| AdapterError::Config(format!("iso8583: runtime: {e}")))?;
        let (submissions, receiver) = mpsc::channel(config.in_flight_max as usize);
        let shared = Arc::new(Shared::default());
        let name = format!("iso8583({})", config.host_addr);
        let host_addr = config.host_addr.clone();
        let session = conn::Session::new(
            config,
            Arc::clone(&dialect),
            tls,
            Arc::clone(&detokenizer),
            Arc::clone(&shared),
        );
        std::thread::Builder::new()
            .name("iso8583-link".into())
            .spawn(move || runtime.block_on(session.run(receiver)))
            .map_err(|e| AdapterError::Config(format!("iso8583: thread: {e}")))?;
        Ok(Iso8583Adapter { name, host_addr, submissions, shared, detokenizer, dialect })
    }

    /// The link's state now.
    pub fn status(&self) -> LinkStatus {
        LinkStatus::from_u8(self.shared.status.load(Ordering::Acquire))
    }

    /// Counters since start.
    pub fn stats(&self) -> Iso8583Stats {
        self.shared.counters.snapshot()
    }

    /// Reversals owed to the host now: written and not yet acknowledged (nor given up), or
    /// queued until the link is back (`provider_reversals_pending` on `/metrics`).
    pub fn reversals_pending(&self) -> u64 {
        self.shared.reversals_pending.load(Ordering::Relaxed)
    }

    /// The outcome of a request that is answered without the host, if any.
    fn precheck(
        &self,
        request: &AuthorizationRequest,
    ) -> Option<Result<ProviderReply, AdapterError>> {
        let declined = |reason| Some(Ok(ProviderReply::Declined { reason }));
        if request.means != MeansKind::CreditCard || request.card_token.is_none() {
            return declined(DeclineReason::InvalidAccount);
        }
        if request.amount_minor > AMOUNT_MINOR_MAX {
            return declined(DeclineReason::LimitExceeded);
        }
        if currency_numeric(request.currency).is_none() {
            return Some(Err(AdapterError::Config(format!(
                "iso8583: currency {} has no ISO 4217 numeric code in the adapter's table",
                request.currency
            ))));
        }
        if let Err(error) = self.dialect.terminal(&request.terminal_id) {
            return Some(Err(AdapterError::Config(error)));
        }
        link_unavailable(self.status(), &self.host_addr).map(Err)
    }

    /// Queues `submission` for the connection task and waits for its answer.
    fn submit<T: Send + 'static>(
        &self,
        submission: Submission,
        answer: oneshot::Receiver<Result<T, AdapterError>>,
    ) -> BoxFuture<'static, Result<T, AdapterError>> {
        if let Err(error) = self.submissions.try_send(submission) {
            let message = match error {
                mpsc::error::TrySendError::Full(_) => "iso8583: submission queue full",
                mpsc::error::TrySendError::Closed(_) => "iso8583: adapter stopped",
            };
            return futures::future::ready(Err(AdapterError::Unavailable(message.into()))).boxed();
        }
        async move {
            answer.await.unwrap_or_else(|_| {
                Err(AdapterError::Unavailable("iso8583: adapter stopped".into()))
            })
        }
        .boxed()
    }

    /// A lifecycle request checked and rebuilt into the original it names, or its answer
    /// without the host.
    fn lifecycle_precheck(
        &self,
        request: &LifecycleRequest,
    ) -> Result<mapping::Original, Result<LifecycleReply, AdapterError>> {
        let refused = |reason| Err(Ok(LifecycleReply::Refused { reason }));
        let authorization = &request.authorization;
        // Captures, voids and refunds name an approval; a reversal may name an unanswered one.
        if authorization.auth_code.is_none() && request.operation != Operation::Reversal {
            return refused(RefusalReason::UnknownAuthorization);
        }
        if let Operation::Capture { amount_minor } | Operation::Refund { amount_minor } =
            request.operation
        {
            if amount_minor > AMOUNT_MINOR_MAX {
                return refused(RefusalReason::AmountInvalid);
            }
        }
        let original = match mapping::Original::of_reference(&self.dialect, authorization) {
            Ok(original) => original,
            Err(mapping::OriginalError::NoNetwork) => {
                return refused(RefusalReason::UnknownAuthorization);
            }
            Err(mapping::OriginalError::Config(error)) => {
                return Err(Err(AdapterError::Config(error)))
            }
        };
        match link_unavailable(self.status(), &self.host_addr) {
            Some(error) => Err(Err(error)),
            None => Ok(original),
        }
    }
}

/// The fail-fast error for a link in `status`, or `None` when it is ready.
pub(crate) fn link_unavailable(status: LinkStatus, host_addr: &str) -> Option<AdapterError> {
    match status {
        LinkStatus::Ready => None,
        LinkStatus::BreakerOpen => Some(AdapterError::Unavailable(format!(
            "iso8583 host {host_addr}: circuit breaker open after repeated failures; failing \
             fast until echo tests succeed"
        ))),
        LinkStatus::Connecting => Some(AdapterError::Unavailable(format!(
            "iso8583 host {host_addr}: not signed on (connecting)"
        ))),
    }
}

/// Whether a revealed PAN can go in field 2: 12 to 19 digits.
pub(crate) fn pan_valid(pan: &str) -> bool {
    (12..=19).contains(&pan.len()) && pan.bytes().all(|b| b.is_ascii_digit())
}

impl ProviderAdapter for Iso8583Adapter {
    fn name(&self) -> &str {
        &self.name
    }

    /// A single-message host (`message_class = "financial"`, `0200`) settles what it approves:
    /// its sales may be refunded. A dual-message host (`0100`) holds an authorization until a
    /// capture, which the engine does not send for a payment: nothing to refund there.
    fn refunds_sales(&self) -> bool {
        self.dialect.class == config::MessageClass::Financial
    }

    fn health(&self) -> Option<crate::ProviderHealth> {
        let (status, stats) = (self.status(), self.stats());
        Some(crate::ProviderHealth {
            link_up: status == LinkStatus::Ready,
            breaker_open: status == LinkStatus::BreakerOpen,
            timeouts: stats.timeouts,
            reversals_pending: self.reversals_pending(),
        })
    }

    fn authorize(
        &self,
        request: AuthorizationRequest,
    ) -> BoxFuture<'static, Result<ProviderReply, AdapterError>> {
        if let Some(outcome) = self.precheck(&request) {
            return futures::future::ready(outcome).boxed();
        }
        let pan = request.card_token.as_ref().and_then(|token| self.detokenizer.reveal(token));
        let Some(pan) = pan.filter(|pan| pan_valid(pan)) else {
            let reason = DeclineReason::InvalidAccount;
            return futures::future::ready(Ok(ProviderReply::Declined { reason })).boxed();
        };
        let (reply, answer) = oneshot::channel();
        self.submit(Submission::Authorize { request, pan, reply }, answer)
    }

    fn lifecycle(
        &self,
        request: LifecycleRequest,
    ) -> BoxFuture<'static, Result<LifecycleReply, AdapterError>> {
        let original = match self.lifecycle_precheck(&request) {
            Ok(original) => original,
            Err(outcome) => return futures::future::ready(outcome).boxed(),
        };
        // The PAN goes in field 2 when the vault still has it (as for a reversal).
        let pan = original.token.as_ref().and_then(|token| self.detokenizer.reveal(token));
        let pan = pan.filter(|pan| pan_valid(pan));
        let (reply, answer) = oneshot::channel();
        self.submit(Submission::Lifecycle { request, original, pan, reply }, answer)
    }
}
