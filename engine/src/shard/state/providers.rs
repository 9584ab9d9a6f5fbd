//! G2 providers' terminal lists, in the provider's shard.

use super::*;

impl ShardState {
    pub(super) fn register_terminals(
        &mut self,
        provider_code: u32,
        terminals: Vec<TerminalEntry>,
    ) -> Reply {
        let Some(provider) = self.shared.registry.provider(provider_code) else {
            return Reply::Refused(ReasonCode::UnknownProvider);
        };
        self.owned_providers.insert(provider_code);
        match provider.register_terminals(terminals) {
            Ok(()) => Reply::Ok,
            Err(reason) => Reply::Refused(reason),
        }
    }
}
