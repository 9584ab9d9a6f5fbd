//! A seeded simulated provider for the demo, the tests and load generation.
//!
//! Every outcome is a pure function of the configured seed and the request's `dispatch_id`:
//! the same seed replays the same run whatever the interleaving of concurrent requests.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use rand::{Rng, RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

use crate::{
    AdapterError, AuthCode, AuthorizationRequest, DeclineReason, ProviderAdapter, ProviderReply,
};

/// The simulator's behaviour.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatedConfig {
    /// Seed of the per-request random stream.
    pub seed: u64,
    /// Shortest simulated latency, in microseconds.
    pub latency_us_min: u64,
    /// Longest simulated latency, in microseconds (uniform between min and max).
    pub latency_us_max: u64,
    /// Fraction of requests declined with `do_not_honor`, in `[0, 1]`.
    pub decline_rate: f64,
    /// Fraction of requests that fail as unavailable, in `[0, 1]`.
    pub failure_rate: f64,
    /// Amounts above this (minor units) are declined with `insufficient_funds`.
    pub approve_limit_minor: u64,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        SimulatedConfig {
            seed: 0,
            latency_us_min: 0,
            latency_us_max: 0,
            decline_rate: 0.0,
            failure_rate: 0.0,
            approve_limit_minor: u64::MAX,
        }
    }
}

/// The simulated provider.
pub struct Simulated {
    config: SimulatedConfig,
    name: String,
}

impl Simulated {
    /// Validates `config` and builds the simulator.
    pub fn new(config: SimulatedConfig) -> Result<Simulated, AdapterError> {
        let rate_ok = |rate: f64| (0.0..=1.0).contains(&rate);
        if !rate_ok(config.decline_rate) || !rate_ok(config.failure_rate) {
            return Err(AdapterError::Config(
                "decline_rate and failure_rate must be within [0, 1]".into(),
            ));
        }
        if config.latency_us_min > config.latency_us_max {
            return Err(AdapterError::Config(
                "latency_us_min must not exceed latency_us_max".into(),
            ));
        }
        let name = format!("simulated(seed={})", config.seed);
        Ok(Simulated { config, name })
    }

    /// The outcome and latency of one request: a pure function of seed and dispatch ID.
    fn decide(
        &self,
        request: &AuthorizationRequest,
    ) -> (Duration, Result<ProviderReply, AdapterError>) {
        let config = &self.config;
        // A small generator seeded per request (SplitMix64): a simulation's draw, not a secret, and
        // cheap enough to run in the shard's step for every payment.
        let mut rng =
            Xoshiro256PlusPlus::seed_from_u64(config.seed ^ request.dispatch_id.rotate_left(17));
        let latency_us = if config.latency_us_max == 0 {
            0
        } else {
            rng.gen_range(config.latency_us_min..=config.latency_us_max)
        };
        let roll: f64 = rng.gen();
        let result = if roll < config.failure_rate {
            Err(AdapterError::Unavailable("simulated provider failure".into()))
        } else if request.amount_minor > config.approve_limit_minor {
            Ok(ProviderReply::Declined { reason: DeclineReason::InsufficientFunds })
        } else if roll < config.failure_rate + config.decline_rate {
            Ok(ProviderReply::Declined { reason: DeclineReason::DoNotHonor })
        } else {
            Ok(ProviderReply::Approved { auth_code: auth_code_random(&mut rng) })
        };
        (Duration::from_micros(latency_us), result)
    }
}

fn auth_code_random(rng: &mut Xoshiro256PlusPlus) -> AuthCode {
    const ALPHABET: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    // Six base-36 digits of one draw (36^6 is about 2^31, so the bias is about 2^-33).
    let mut draw = rng.next_u64();
    let mut code = [0u8; 6];
    for byte in &mut code {
        *byte = ALPHABET[(draw % 36) as usize];
        draw /= 36;
    }
    AuthCode(code)
}

impl ProviderAdapter for Simulated {
    fn name(&self) -> &str {
        &self.name
    }

    fn decide_now(
        &self,
        request: &AuthorizationRequest,
    ) -> Option<Result<ProviderReply, AdapterError>> {
        // Only with no latency configured: a latency is what a test or bench wants to see.
        (self.config.latency_us_max == 0).then(|| self.decide(request).1)
    }

    fn authorize(
        &self,
        request: AuthorizationRequest,
    ) -> BoxFuture<'static, Result<ProviderReply, AdapterError>> {
        let (latency, result) = self.decide(&request);
        if latency.is_zero() {
            futures::future::ready(result).boxed()
        } else {
            async move {
                tokio::time::sleep(latency).await;
                result
            }
            .boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Currency, MeansKind};

    fn request(dispatch_id: u64, amount_minor: u64) -> AuthorizationRequest {
        AuthorizationRequest {
            dispatch_id,
            provider_code: 1,
            means: MeansKind::CreditCard,
            card_token: None,
            terminal_id: "T1".into(),
            amount_minor,
            currency: Currency::try_from("JPY").unwrap(),
        }
    }

    #[test]
    fn same_seed_same_outcomes() {
        let config = SimulatedConfig {
            seed: 7,
            decline_rate: 0.3,
            failure_rate: 0.1,
            latency_us_max: 500,
            ..SimulatedConfig::default()
        };
        let a = Simulated::new(config.clone()).unwrap();
        let b = Simulated::new(config).unwrap();
        let outcomes_a: Vec<_> = (0..200).map(|i| a.decide(&request(i, 100))).collect();
        let outcomes_b: Vec<_> = (0..200).map(|i| b.decide(&request(i, 100))).collect();
        assert_eq!(outcomes_a, outcomes_b);
        let declines = outcomes_a
            .iter()
            .filter(|(_, r)| matches!(r, Ok(ProviderReply::Declined { .. })))
            .count();
        let failures = outcomes_a.iter().filter(|(_, r)| r.is_err()).count();
        // 200 draws at 30% and 10%: far outside these bounds would mean the rates are ignored.
        assert!((30..=90).contains(&declines), "declines {declines}");
        assert!((5..=40).contains(&failures), "failures {failures}");
    }

    #[test]
    fn amount_over_limit_is_declined() {
        let sim = Simulated::new(SimulatedConfig {
            approve_limit_minor: 1_000,
            ..SimulatedConfig::default()
        })
        .unwrap();
        assert!(matches!(sim.decide(&request(1, 1_000)).1, Ok(ProviderReply::Approved { .. })));
        assert_eq!(
            sim.decide(&request(1, 1_001)).1,
            Ok(ProviderReply::Declined { reason: DeclineReason::InsufficientFunds })
        );
    }

    #[test]
    fn answers_at_once_exactly_as_authorize_would_and_only_without_latency() {
        let config =
            SimulatedConfig { seed: 3, decline_rate: 0.3, failure_rate: 0.1, ..Default::default() };
        let sim = Simulated::new(config.clone()).unwrap();
        for i in 0..100 {
            let now = sim.decide_now(&request(i, 100)).expect("zero latency answers at once");
            let later = futures::executor::block_on(sim.authorize(request(i, 100)));
            assert_eq!(now, later, "dispatch {i}");
        }
        let slow = Simulated::new(SimulatedConfig { latency_us_max: 10, ..config }).unwrap();
        assert_eq!(slow.decide_now(&request(1, 100)), None);
    }

    #[test]
    fn invalid_rates_rejected() {
        let bad = SimulatedConfig { decline_rate: 1.5, ..SimulatedConfig::default() };
        assert!(Simulated::new(bad).is_err());
    }
}
