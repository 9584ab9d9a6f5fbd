//! Idempotency records: a retry with the same client request ID gets the first outcome.
//!
//! Bounded by a retention time and a record count per shard; the oldest records go first.
//! Authorizations stay safe past eviction too: the replay window and the timestamp window
//! refuse an old inherent ID presented again.

use std::collections::VecDeque;
use std::sync::Arc;

use super::state::Reply;
use crate::cow::{CowMap, Frozen, CHUNK_BITS_LARGE};
use crate::keys::{open_device_key, DeviceKey};
use crate::types::{ClientRequestId, ReasonCode};
use crate::vault::{SealedNumber, Vault};

/// A record's key: the owner's routing hash and the client's request ID.
pub(crate) type IdemKey = (u64, ClientRequestId);

#[derive(Debug, Clone)]
pub(crate) enum IdemState {
    /// The request is with its provider.
    Pending {
        /// Who pays (to record the outcome if recovery must resolve it).
        user: crate::types::UserKey,
        /// With which means.
        means_id: u32,
    },
    /// The request finished with this reply.
    Done(Reply),
    /// A key issue's reply as a snapshot holds it: the key stays sealed (to the record's key)
    /// until a retry asks for it, so recovery does not decrypt every enrollment's key.
    SealedKey {
        /// The issued key's version.
        key_version: u16,
        /// The key, sealed.
        sealed: SealedNumber,
    },
}

impl IdemState {
    /// How a finished request's `reply` is kept: an issued device key sealed to the record's
    /// key (a retry opens it; a snapshot copies the sealed bytes), any other reply as it is.
    pub(crate) fn done(vault: &Vault, key: IdemKey, reply: &Reply) -> IdemState {
        match reply {
            Reply::KeyIssued { key_version, key: device_key } => IdemState::SealedKey {
                key_version: *key_version,
                sealed: seal_issued_key(vault, key, device_key),
            },
            done => IdemState::Done(done.clone()),
        }
    }

    /// The answer to a retry of the request this record is for.
    pub(crate) fn reply(&self, vault: &Vault, key: IdemKey) -> Reply {
        match self {
            IdemState::Pending { .. } => Reply::InFlight,
            IdemState::Done(reply) => reply.clone(),
            IdemState::SealedKey { key_version, sealed } => {
                match open_device_key(vault, sealed, &idem_aad(key)) {
                    Some(key) => Reply::KeyIssued { key_version: *key_version, key },
                    None => {
                        tracing::error!("the sealed key of an enrollment record does not open");
                        Reply::Refused(ReasonCode::IdempotencyConflict)
                    }
                }
            }
        }
    }
}

/// Seals an issued device key for the idempotency record `key` (bound to it).
pub(crate) fn seal_issued_key(vault: &Vault, key: IdemKey, device_key: &DeviceKey) -> SealedNumber {
    vault.seal(device_key.expose(), &idem_aad(key))
}

/// Associated data sealing a key kept in an idempotency record (no IDm at hand there).
fn idem_aad((owner_hash, client_request_id): IdemKey) -> Vec<u8> {
    let mut aad = b"idem".to_vec();
    aad.extend_from_slice(&owner_hash.to_be_bytes());
    aad.extend_from_slice(&client_request_id.to_be_bytes());
    aad
}

/// One record. Cheap to clone: a snapshot's frozen copy shares the state.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Until when the record is kept.
    pub(crate) expires_ms: i64,
    /// The request's digest: the same ID with another digest is a conflict.
    pub(crate) digest: u64,
    /// A record's state is replaced, never changed in place.
    pub(crate) state: Arc<IdemState>,
}

/// What a lookup found.
pub(crate) enum Seen {
    /// No record: process the request.
    New,
    /// Same request seen before.
    Same(Arc<IdemState>),
    /// The ID was used with a different request.
    Conflict,
}

pub(crate) struct Idempotency {
    entries: CowMap<IdemKey, Entry>,
    expiry: VecDeque<(i64, IdemKey)>,
    ttl_ms: i64,
    records_max: usize,
}

impl Idempotency {
    pub(crate) fn new(ttl_ms: i64, records_max: usize) -> Idempotency {
        assert!(records_max > 0);
        // The table grows a chunk at a time (a thousand records moved, not a million), so it
        // starts empty; a restore sizes it for the snapshot's records. The expiry queue is one
        // ring, whose growth would move every key at once: it is sized for the cap from the
        // start (untouched capacity costs address space, not memory).
        Idempotency {
            entries: CowMap::new(CHUNK_BITS_LARGE),
            expiry: VecDeque::with_capacity(records_max),
            ttl_ms,
            records_max,
        }
    }

    pub(crate) fn lookup(&self, key: &IdemKey, digest: u64) -> Seen {
        match self.entries.get(key) {
            None => Seen::New,
            Some(entry) if entry.digest == digest => Seen::Same(Arc::clone(&entry.state)),
            Some(_) => Seen::Conflict,
        }
    }

    pub(crate) fn insert(&mut self, key: IdemKey, digest: u64, state: IdemState, now_ms: i64) {
        self.evict(now_ms);
        let expires_ms = now_ms.saturating_add(self.ttl_ms);
        let previous =
            self.entries.insert(key, Entry { expires_ms, digest, state: Arc::new(state) });
        assert!(previous.is_none(), "idempotency key inserted twice");
        self.expiry.push_back((expires_ms, key));
    }

    /// Finishes a pending record. A record evicted meanwhile is not recreated.
    pub(crate) fn complete(&mut self, key: &IdemKey, reply: Reply) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.state = Arc::new(IdemState::Done(reply));
        }
    }

    fn evict(&mut self, now_ms: i64) {
        while let Some(&(expires_ms, key)) = self.expiry.front() {
            if expires_ms > now_ms && self.entries.len() < self.records_max {
                break;
            }
            self.expiry.pop_front();
            self.entries.remove(&key);
        }
    }

    /// Every record, frozen for a snapshot (in no order: the writer sorts them by expiry).
    pub(crate) fn freeze(&mut self) -> Frozen<IdemKey, Entry> {
        self.entries.freeze()
    }

    /// Restores a snapshot's records (expires at, key, digest, state), in expiry order.
    pub(crate) fn restore(&mut self, records: Vec<(i64, IdemKey, u64, IdemState)>) {
        self.expiry.extend(records.iter().map(|(expires_ms, key, _, _)| (*expires_ms, *key)));
        self.entries.insert_in_bulk(
            records
                .into_iter()
                .map(|(expires_ms, key, digest, state)| {
                    (key, Entry { expires_ms, digest, state: Arc::new(state) })
                })
                .collect(),
        );
    }

    /// Records still waiting for their provider's outcome.
    pub(crate) fn pending(&self) -> Vec<(IdemKey, crate::types::UserKey, u32)> {
        let mut pending: Vec<_> = self
            .entries
            .iter()
            .filter_map(|(key, entry)| match &*entry.state {
                IdemState::Pending { user, means_id } => Some((*key, user.clone(), *means_id)),
                IdemState::Done(_) | IdemState::SealedKey { .. } => None,
            })
            .collect();
        pending.sort_by_key(|(key, _, _)| *key);
        pending
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}
