//! Settlement providers (G2): designation codes, adapters, and each provider's list of
//! store terminals with their terminal-unique services.
//!
//! The provider set comes from config and is fixed for the engine's life; terminal lists
//! change at run time through commands applied by the provider's shard, and are read from
//! any thread (read-mostly, in a `DashMap`).

use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use settlegate_adapters::Guarded;

use crate::age::ResolvedPolicy;
use crate::limits::{
    SERVICE_DESCRIPTION_LEN_MAX, TERMINALS_PER_PROVIDER_MAX, TERMINALS_PER_REQUEST_MAX,
};
use crate::types::{terminal_id_valid, Discount, ReasonCode, TerminalService};
use crate::SharedMap;

/// A terminal a provider serves, with its terminal-unique service if it has one.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct TerminalEntry {
    /// Store-terminal ID.
    pub terminal_id: String,
    /// The service (discount) offered at this terminal.
    #[serde(default)]
    #[rkyv(with = rkyv::with::Map<crate::shard::archive::Via<crate::shard::archive::ServiceLeaf>>)]
    pub service: Option<TerminalService>,
}

impl TerminalEntry {
    /// What is wrong with this entry as a config file holds it, naming the key and its value;
    /// `at` names the entry (`engine.providers[code 1].terminals[0]`).
    pub fn check(&self, at: &str) -> Result<(), String> {
        if !terminal_id_valid(&self.terminal_id) {
            return Err(format!(
                "{at}.terminal_id = {:?}: 1 to 16 printable ASCII characters",
                self.terminal_id
            ));
        }
        let Some(service) = &self.service else { return Ok(()) };
        match service.discount {
            Discount::Percent { bps } if !(1..=10_000).contains(&bps) => {
                return Err(format!("{at}.service.discount.bps = {bps}: must be 1..=10000 (basis points; 10000 is 100%)"));
            }
            Discount::Fixed { amount_minor: 0, .. } => {
                return Err(format!("{at}.service.discount.amount_minor = 0: must be positive"));
            }
            _ => {}
        }
        if service.valid_from_ms >= service.valid_until_ms {
            return Err(format!(
                "{at}.service: valid_from_ms = {} must be before valid_until_ms = {}",
                service.valid_from_ms, service.valid_until_ms
            ));
        }
        if service.description.len() > SERVICE_DESCRIPTION_LEN_MAX {
            return Err(format!(
                "{at}.service.description: {} bytes, at most {SERVICE_DESCRIPTION_LEN_MAX}",
                service.description.len()
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ReasonCode> {
        if !terminal_id_valid(&self.terminal_id) {
            return Err(ReasonCode::InvalidTerminal);
        }
        if let Some(service) = &self.service {
            let ok = service.discount.valid()
                && service.valid_from_ms < service.valid_until_ms
                && service.description.len() <= SERVICE_DESCRIPTION_LEN_MAX;
            if !ok {
                return Err(ReasonCode::InvalidService);
            }
        }
        Ok(())
    }
}

/// The answer to a store terminal asking whether it is on a provider's list (S38–S39).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalConfirmation {
    /// The terminal is not on the provider's list.
    NotListed,
    /// The terminal is listed; `service` is its unique service if one is active now.
    Listed {
        /// The active service, if any.
        service: Option<TerminalService>,
    },
}

/// One provider.
pub struct Provider {
    /// Designation code.
    pub code: u32,
    /// Display name.
    pub name: String,
    pub(crate) adapter: Guarded,
    terminals: SharedMap<String, Option<TerminalService>>,
    /// Store age policies set per terminal (A2); a terminal without one follows its provider's.
    age_policies: SharedMap<String, ResolvedPolicy>,
}

impl Provider {
    pub(crate) fn new(code: u32, name: String, adapter: Guarded) -> Provider {
        Provider {
            code,
            name,
            adapter,
            terminals: SharedMap::default(),
            age_policies: SharedMap::default(),
        }
    }

    /// Validates every entry first, so a request is applied whole or not at all.
    pub(crate) fn register_terminals(&self, entries: Vec<TerminalEntry>) -> Result<(), ReasonCode> {
        if entries.len() > TERMINALS_PER_REQUEST_MAX {
            return Err(ReasonCode::TooManyTerminals);
        }
        entries.iter().try_for_each(TerminalEntry::validate)?;
        let new_count =
            entries.iter().filter(|e| !self.terminals.contains_key(&e.terminal_id)).count();
        if self.terminals.len() + new_count > TERMINALS_PER_PROVIDER_MAX {
            return Err(ReasonCode::TooManyTerminals);
        }
        for entry in entries {
            self.terminals.insert(entry.terminal_id, entry.service);
        }
        Ok(())
    }

    pub(crate) fn remove_terminals(&self, terminal_ids: &[String]) {
        for id in terminal_ids {
            self.terminals.remove(id);
            self.age_policies.remove(id);
        }
    }

    /// Every listed terminal, for a snapshot (sorted by ID).
    pub(crate) fn export_terminals(&self) -> Vec<TerminalEntry> {
        let mut entries: Vec<TerminalEntry> = self
            .terminals
            .iter()
            .map(|e| TerminalEntry { terminal_id: e.key().clone(), service: e.value().clone() })
            .collect();
        entries.sort_by(|a, b| a.terminal_id.cmp(&b.terminal_id));
        entries
    }

    /// Restores terminals from a snapshot (already validated when first registered).
    pub(crate) fn restore_terminals(&self, entries: Vec<TerminalEntry>) {
        for entry in entries {
            self.terminals.insert(entry.terminal_id, entry.service);
        }
    }

    /// The discount of the terminal's service if it is listed and the service is active at
    /// `now_ms` (a payment's path: nothing cloned).
    pub fn active_discount(&self, terminal_id: &str, now_ms: i64) -> Option<Discount> {
        let entry = self.terminals.get(terminal_id)?;
        entry.as_ref().filter(|s| s.active_at(now_ms)).map(|s| s.discount)
    }

    /// The terminal's service if it is listed and the service is active at `now_ms`.
    pub fn active_service(&self, terminal_id: &str, now_ms: i64) -> Option<TerminalService> {
        let entry = self.terminals.get(terminal_id)?;
        entry.as_ref().filter(|s| s.active_at(now_ms)).cloned()
    }

    /// The S38–S39 confirmation for `terminal_id` at `now_ms`.
    pub fn confirm(&self, terminal_id: &str, now_ms: i64) -> TerminalConfirmation {
        match self.terminals.get(terminal_id) {
            None => TerminalConfirmation::NotListed,
            Some(entry) => TerminalConfirmation::Listed {
                service: entry.as_ref().filter(|s| s.active_at(now_ms)).cloned(),
            },
        }
    }

    /// Sets (or with `None` clears) a listed terminal's own age policy.
    pub(crate) fn set_age_policy(
        &self,
        terminal_id: &str,
        policy: Option<ResolvedPolicy>,
    ) -> Result<(), ReasonCode> {
        if !self.terminals.contains_key(terminal_id) {
            return Err(ReasonCode::InvalidTerminal);
        }
        match policy {
            Some(policy) => self.age_policies.insert(terminal_id.to_owned(), policy),
            None => self.age_policies.remove(terminal_id).map(|(_, p)| p),
        };
        Ok(())
    }

    /// A terminal's own age policy, if it set one.
    pub fn age_policy(&self, terminal_id: &str) -> Option<ResolvedPolicy> {
        self.age_policies.get(terminal_id).map(|p| p.clone())
    }

    /// Every terminal's own age policy, for a snapshot (sorted by terminal ID).
    pub(crate) fn export_age_policies(&self) -> Vec<(String, ResolvedPolicy)> {
        let mut policies: Vec<(String, ResolvedPolicy)> =
            self.age_policies.iter().map(|e| (e.key().clone(), e.value().clone())).collect();
        policies.sort_by(|a, b| a.0.cmp(&b.0));
        policies
    }

    /// Terminals listed.
    pub fn terminal_count(&self) -> usize {
        self.terminals.len()
    }
}

/// All providers by designation code.
#[derive(Default)]
pub struct Registry {
    providers: FxHashMap<u32, Arc<Provider>>,
}

impl Registry {
    pub(crate) fn new(providers: Vec<Provider>) -> Registry {
        Registry { providers: providers.into_iter().map(|p| (p.code, Arc::new(p))).collect() }
    }

    /// The provider with this designation code.
    pub fn provider(&self, code: u32) -> Option<&Arc<Provider>> {
        self.providers.get(&code)
    }

    /// Every provider, in no particular order.
    pub(crate) fn providers(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.providers.values()
    }

    /// Designation codes, sorted.
    pub fn codes(&self) -> Vec<u32> {
        let mut codes: Vec<u32> = self.providers.keys().copied().collect();
        codes.sort_unstable();
        codes
    }
}
