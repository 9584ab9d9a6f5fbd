//! Who a connection is, and what it may do (`docs/PROTOCOL.md` section 3).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::IdentityConfig;

/// Permission bits, as sent in the `AUTH` reply.
pub mod permission {
    /// `AUTHORIZE` and `CONFIRM_TERMINAL` for the identity's terminals.
    pub const AUTHORIZE: u32 = 0x1;
    /// Account operations.
    pub const ACCOUNTS: u32 = 0x2;
    /// Terminal-list changes for the identity's providers.
    pub const PROVIDERS: u32 = 0x4;
    /// Store registration and removal (W1).
    pub const STORES: u32 = 0x8;
    /// The reconciliation report (`REPORT`) of the identity's providers.
    pub const REPORT: u32 = 0x10;
}

/// An authenticated identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Its name.
    pub name: String,
    /// Permission bits.
    pub permissions: u32,
    terminals: Vec<String>,
    providers: Vec<u32>,
}

impl Identity {
    /// The identity of a connection before authentication: no permissions, no scopes. Only
    /// `PING` and `SERVER_INFO` run under it.
    pub fn anonymous() -> Identity {
        Identity {
            name: "anonymous".into(),
            permissions: 0,
            terminals: Vec::new(),
            providers: Vec::new(),
        }
    }

    /// Whether it holds `bit`.
    pub fn may(&self, bit: u32) -> bool {
        self.permissions & bit == bit
    }

    /// Whether it may act for `terminal_id`.
    pub fn may_act_for_terminal(&self, terminal_id: &str) -> bool {
        self.terminals.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => terminal_id.starts_with(prefix),
            None => pattern == terminal_id,
        })
    }

    /// Whether `provider_code` is in its `providers` list: the providers whose terminal lists
    /// it may change (with `providers`) and whose report it may read (with `report`).
    pub fn may_manage_provider(&self, provider_code: u32) -> bool {
        self.providers.contains(&provider_code)
    }
}

struct Entry {
    identity: Identity,
    api_key_sha256: Option<[u8; 32]>,
    cert_sha256: Option<[u8; 32]>,
}

/// The configured identities.
pub struct Identities {
    entries: Vec<Entry>,
}

fn digest(hex_text: &Option<String>) -> Option<[u8; 32]> {
    hex_text.as_ref().and_then(|h| hex::decode(h).ok()).and_then(|b| b.try_into().ok())
}

impl Identities {
    /// From config (validated already).
    pub fn new(configs: &[IdentityConfig]) -> Identities {
        let entries = configs
            .iter()
            .map(|c| {
                let permissions = c
                    .permissions
                    .iter()
                    .map(|p| match p.as_str() {
                        "authorize" => permission::AUTHORIZE,
                        "accounts" => permission::ACCOUNTS,
                        "stores" => permission::STORES,
                        "report" => permission::REPORT,
                        _ => permission::PROVIDERS,
                    })
                    .fold(0, |bits, bit| bits | bit);
                Entry {
                    identity: Identity {
                        name: c.name.clone(),
                        permissions,
                        terminals: c.terminals.clone(),
                        providers: c.providers.clone(),
                    },
                    api_key_sha256: digest(&c.api_key_sha256),
                    cert_sha256: digest(&c.cert_sha256),
                }
            })
            .collect();
        Identities { entries }
    }

    /// The identity of an API key. Every entry is compared, in constant time, so timing says
    /// nothing about which key (or how much of it) matched.
    pub fn by_api_key(&self, key: &str) -> Option<Identity> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.find(|e| e.api_key_sha256, &presented)
    }

    /// The identity of a TLS client certificate (its DER).
    pub fn by_certificate(&self, der: &[u8]) -> Option<Identity> {
        let presented: [u8; 32] = Sha256::digest(der).into();
        self.find(|e| e.cert_sha256, &presented)
    }

    fn find(
        &self,
        field: impl Fn(&Entry) -> Option<[u8; 32]>,
        presented: &[u8; 32],
    ) -> Option<Identity> {
        let mut found = None;
        for entry in &self.entries {
            if let Some(stored) = field(entry) {
                if bool::from(stored.ct_eq(presented)) && found.is_none() {
                    found = Some(entry.identity.clone());
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identities() -> Identities {
        Identities::new(&[IdentityConfig {
            name: "vendor".into(),
            api_key_sha256: Some(hex::encode(Sha256::digest(b"secret-key"))),
            cert_sha256: None,
            permissions: vec!["authorize".into()],
            terminals: vec!["SHOP-A-*".into(), "EXACT-1".into()],
            providers: vec![],
        }])
    }

    #[test]
    fn api_keys_and_scopes() {
        let ids = identities();
        assert!(ids.by_api_key("wrong").is_none());
        let vendor = ids.by_api_key("secret-key").unwrap();
        assert!(vendor.may(permission::AUTHORIZE));
        assert!(!vendor.may(permission::ACCOUNTS));
        assert!(vendor.may_act_for_terminal("SHOP-A-0001"));
        assert!(vendor.may_act_for_terminal("EXACT-1"));
        assert!(!vendor.may_act_for_terminal("EXACT-12"));
        assert!(!vendor.may_act_for_terminal("SHOP-B-0001"));
        assert!(!vendor.may_manage_provider(1));
    }
}
