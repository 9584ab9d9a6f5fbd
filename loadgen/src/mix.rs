//! The workload mix: `--mix authorize=70,list_means=20,ping=10` parsed into weights, and the
//! seeded chooser that draws each request's operation from them.
//!
//! The draw is deterministic: the same seed, connection and weights give the same sequence of
//! operations on every run, so two runs differ only in what the server did.

use std::fmt;

use crate::ops::Operation;

/// Largest weight of one operation (keeps the total far from overflow).
pub const WEIGHT_MAX: u32 = 1_000_000;

/// Operations with their weights, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    entries: Vec<(Operation, u32)>,
}

impl Mix {
    /// Parses `name=weight,...`; a name without `=weight` weighs 1.
    pub fn parse(text: &str) -> Result<Mix, String> {
        let mut entries: Vec<(Operation, u32)> = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(format!("empty entry in mix `{text}`"));
            }
            let (name, weight) = match part.split_once('=') {
                Some((name, weight)) => (name.trim(), weight.trim()),
                None => (part, "1"),
            };
            let operation = operation_named(name)?;
            let weight: u32 =
                weight.parse().ok().filter(|w| (1..=WEIGHT_MAX).contains(w)).ok_or_else(|| {
                    format!("weight of `{name}` must be 1..={WEIGHT_MAX}, not `{weight}`")
                })?;
            if entries.iter().any(|(known, _)| *known == operation) {
                return Err(format!("`{name}` appears twice in the mix"));
            }
            entries.push((operation, weight));
        }
        Ok(Mix { entries })
    }

    /// The operations, in the order given.
    pub fn operations(&self) -> Vec<Operation> {
        self.entries.iter().map(|(operation, _)| *operation).collect()
    }

    /// The weights, index for index with [`Mix::operations`].
    pub fn weights(&self) -> Vec<u32> {
        self.entries.iter().map(|(_, weight)| *weight).collect()
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (operation, weight)) in self.entries.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            write!(f, "{comma}{}={weight}", operation.name())?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Mix {
    type Err = String;
    fn from_str(text: &str) -> Result<Mix, String> {
        Mix::parse(text)
    }
}

/// The operation called `name`, or an error naming the supported ones.
fn operation_named(name: &str) -> Result<Operation, String> {
    if let Some(operation) = Operation::ALL.iter().find(|op| op.name() == name) {
        return Ok(*operation);
    }
    let supported: Vec<&str> = Operation::ALL.iter().map(|op| op.name()).collect();
    let supported = supported.join(", ");
    Err(format!("unknown operation `{name}`; supported: {supported}"))
}

/// SplitMix64: a tiny, fast, seedable generator; enough for choosing operations and users.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0); the modulo bias is below 2^-40 for the sizes used here.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.next_u64() % n
    }
}

/// Draws operation indices in proportion to their weights.
#[derive(Debug, Clone)]
pub struct Chooser {
    /// Running sums of the weights: index `i` is drawn for values in `[sum(..i), sum(..=i))`.
    cumulative: Vec<u64>,
    rng: SplitMix64,
}

impl Chooser {
    /// A chooser for `weights`, seeded from the run's seed and the drawing connection.
    pub fn new(weights: &[u32], seed: u64, stream: u64) -> Chooser {
        assert!(!weights.is_empty() && weights.iter().all(|&w| w > 0), "weights must be positive");
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        // Distinct streams per connection: mix the stream number in before the first draw.
        let rng = SplitMix64::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        Chooser { cumulative, rng }
    }

    /// The next operation's index.
    pub fn next_index(&mut self) -> usize {
        if self.cumulative.len() == 1 {
            return 0;
        }
        let total = *self.cumulative.last().expect("not empty");
        let draw = self.rng.below(total);
        self.cumulative.partition_point(|&sum| sum <= draw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_weights_in_order() {
        let mix = Mix::parse("authorize=70, list_means=20,ping=10").unwrap();
        assert_eq!(mix.operations(), [Operation::Authorize, Operation::ListMeans, Operation::Ping]);
        assert_eq!(mix.weights(), [70, 20, 10]);
        assert_eq!(mix.to_string(), "authorize=70,list_means=20,ping=10");
        assert_eq!(Mix::parse("authorize").unwrap().weights(), [1]);
    }

    #[test]
    fn mix_errors_name_the_supported_operations() {
        let mix = Mix::parse("authorize=70,usable=10,age=10,code=10").unwrap();
        assert_eq!(mix.weights(), [70, 10, 10, 10]);
        let unknown = Mix::parse("authorise=1").unwrap_err();
        assert!(unknown.starts_with("unknown operation `authorise`"), "{unknown}");
        assert!(unknown.contains("confirm_terminal"), "{unknown}");
        for bad in ["", "authorize=", "authorize=0", "authorize=-1", "authorize=x", "ping=2000000"]
        {
            assert!(Mix::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(Mix::parse("ping=1,ping=2").unwrap_err().contains("twice"));
        assert!(Mix::parse("ping=1,").unwrap_err().contains("empty entry"));
    }

    #[test]
    fn chooser_follows_weights_and_seed() {
        let weights = [70, 20, 10];
        let mut chooser = Chooser::new(&weights, 7, 0);
        let mut counts = [0u32; 3];
        for _ in 0..100_000 {
            counts[chooser.next_index()] += 1;
        }
        for (count, weight) in counts.iter().zip(weights) {
            let share = f64::from(*count) / 100_000.0;
            assert!((share - f64::from(weight) / 100.0).abs() < 0.01, "{counts:?}");
        }
        let draws = |seed, stream| {
            let mut chooser = Chooser::new(&weights, seed, stream);
            (0..64).map(|_| chooser.next_index()).collect::<Vec<_>>()
        };
        assert_eq!(draws(7, 3), draws(7, 3), "same seed and stream, same sequence");
        assert_ne!(draws(7, 3), draws(8, 3), "another seed, another sequence");
        assert_ne!(draws(7, 3), draws(7, 4), "connections draw distinct streams");
        assert!(Chooser::new(&[5], 1, 1).next_index() == 0);
    }
}
