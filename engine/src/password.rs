//! Password hashing with Argon2id: salted, slow, and run off the shards and executors.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher as _, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordVerifier, Version};
use serde::{Deserialize, Serialize};

use crate::limits::{PASSWORD_LEN_MAX, PASSWORD_LEN_MIN};
use crate::types::ReasonCode;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasswordConfig {
    /// Memory cost in KiB (default 19456, OWASP's recommendation).
    pub memory_kib: u32,
    /// Passes over memory (default 2).
    pub iterations: u32,
    /// Lanes (default 1).
    pub parallelism: u32,
}

impl Default for PasswordConfig {
    fn default() -> Self {
        PasswordConfig { memory_kib: 19_456, iterations: 2, parallelism: 1 }
    }
}

/// Hashes and verifies passwords. Stores only PHC strings (`$argon2id$v=19$...`).
#[derive(Clone)]
pub struct PasswordHasher {
    argon: Argon2<'static>,
}

impl PasswordHasher {
    /// Builds a hasher; fails on parameters Argon2 refuses.
    pub fn new(config: PasswordConfig) -> Result<PasswordHasher, String> {
        let params = Params::new(config.memory_kib, config.iterations, config.parallelism, None)
            .map_err(|e| format!("argon2 parameters: {e}"))?;
        Ok(PasswordHasher { argon: Argon2::new(Algorithm::Argon2id, Version::V0x13, params) })
    }

    /// Checks the password policy (length only: 8..=128 bytes).
    pub fn policy_check(password: &str) -> Result<(), ReasonCode> {
        if (PASSWORD_LEN_MIN..=PASSWORD_LEN_MAX).contains(&password.len()) {
            Ok(())
        } else {
            Err(ReasonCode::PasswordPolicy)
        }
    }

    /// Hashes with a fresh random salt. CPU-heavy: call from a blocking thread.
    pub fn hash(&self, password: &str) -> String {
        let salt = SaltString::generate(&mut OsRng);
        self.argon
            .hash_password(password.as_bytes(), &salt)
            .expect("argon2 hashing with valid params does not fail")
            .to_string()
    }

    /// Verifies against a stored PHC string (constant-time comparison inside argon2).
    /// CPU-heavy: call from a blocking thread.
    pub fn verify(&self, password: &str, phc: &str) -> bool {
        if password.len() > PASSWORD_LEN_MAX {
            return false;
        }
        match PasswordHash::new(phc) {
            Ok(parsed) => self.argon.verify_password(password.as_bytes(), &parsed).is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let hasher =
            PasswordHasher::new(PasswordConfig { memory_kib: 64, iterations: 1, parallelism: 1 })
                .unwrap();
        let phc = hasher.hash("correct horse");
        assert!(phc.starts_with("$argon2id$"));
        assert!(!phc.contains("correct horse"));
        assert!(hasher.verify("correct horse", &phc));
        assert!(!hasher.verify("wrong horse", &phc));
        // Salted: the same password hashes differently.
        assert_ne!(phc, hasher.hash("correct horse"));
    }
}
