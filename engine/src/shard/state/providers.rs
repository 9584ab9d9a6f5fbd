//! G2 providers' terminal lists, in the provider's shard.

use super::*;

impl ShardState {
    pub(super) fn register_terminals(
        &mut self,
        provider_code: u32,
        terminals: Vec<TerminalEntry>,
    ) -> Result<(), ReasonCode> {
        let Some(provider) = self.shared.registry.provider(provider_code) else {
            return Err(ReasonCode::UnknownProvider);
        };
        self.owned_providers.insert(provider_code);
        provider.register_terminals(terminals)
    }
}
