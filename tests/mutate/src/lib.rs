//! A small mutation fuzzer that runs inside `cargo test`, for a bounded number of inputs.
//!
//! Each target starts from a corpus of valid inputs (and the committed regressions), and feeds
//! the code under test inputs made by stacking a few random mutations on a corpus entry: bit
//! flips, byte overwrites with boundary values (0, 0x7f, 0x80, 0xff), little-endian integers
//! overwritten with extremes (0, 1, -1, 2^31, 2^63, ...), truncations, duplicated and deleted
//! runs, and splices of two entries. It is not coverage-guided (`cargo fuzz` is, and needs a
//! nightly compiler); what it gives is a deterministic run of 100,000 hostile inputs per target
//! on every CI run, on the stable toolchain.
//!
//! A panic fails the test with the seed, the iteration and the input (hex), so a failure can
//! be replayed (`TESSERA_FUZZ_SEED`) and its input committed as a regression. A stack overflow
//! aborts without a message: `TESSERA_FUZZ_LAST=FILE` keeps the input being tried in `FILE`.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Inputs per target in the test command.
pub const DEFAULT_INPUTS: usize = 100_000;

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    /// An integer that parsers get wrong: small, boundary or huge.
    pub fn interesting(&mut self) -> u64 {
        const VALUES: [u64; 14] = [0, 1, 2, 7, 8, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 63, u64::MAX];
        if self.chance(4) {
            self.next_u64()
        } else {
            VALUES[self.below(VALUES.len())]
        }
    }
}

/// One random mutation of `data` in place; `other` is another corpus entry for splices.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    let len = data.len();
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = [0, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'\\'][rng.below(8)];
        }
        2 if len >= 8 => {
            // A little-endian integer field overwritten with an extreme.
            let width = [2usize, 4, 8][rng.below(3)];
            let at = rng.below(len - width + 1);
            let value = rng.interesting().to_le_bytes();
            data[at..at + width].copy_from_slice(&value[..width]);
        }
        3 if len > 0 => data.truncate(rng.below(len)),
        4 if len > 0 => {
            let (at, run) = (rng.below(len), 1 + rng.below(64.min(len)));
            let end = (at + run).min(len);
            let copy = data[at..end].to_vec();
            let times = 1 + rng.below(4);
            for _ in 0..times {
                data.splice(at..at, copy.iter().copied());
            }
        }
        5 if len > 0 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(64)).min(len);
            data.drain(at..end);
        }
        6 if !other.is_empty() => {
            let cut = rng.below(len + 1);
            let from = rng.below(other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        7 => {
            let at = rng.below(len + 1);
            let bytes: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next_u64() as u8).collect();
            data.splice(at..at, bytes);
        }
        _ => {
            // An ASCII digit run lengthened: numbers in text formats that overflow.
            if let Some(i) = data.iter().position(|b| b.is_ascii_digit()).filter(|_| len < 1 << 20) {
                data.splice(i..i, std::iter::repeat_n(b'9', 1 + rng.below(30)));
            }
        }
    }
}

/// How a target is fuzzed.
#[derive(Debug, Clone)]
pub struct Campaign {
    /// Named in failures.
    pub name: &'static str,
    pub inputs: usize,
    pub seed: u64,
    /// Most mutations stacked on one input.
    pub max_mutations: usize,
}

impl Campaign {
    /// [`DEFAULT_INPUTS`] inputs (or `TESSERA_FUZZ_INPUTS`) from seed 1 (or
    /// `TESSERA_FUZZ_SEED`).
    pub fn new(name: &'static str) -> Self {
        let inputs = std::env::var("TESSERA_FUZZ_INPUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_INPUTS);
        let seed = std::env::var("TESSERA_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        Self { name, inputs, seed, max_mutations: 4 }
    }

    pub fn inputs(mut self, n: usize) -> Self {
        self.inputs = n;
        self
    }

    /// Feeds every corpus entry, then mutated ones, to `target`; fails on the first panic,
    /// naming the input. Returns how many inputs `target` accepted (returned `true` for), so a
    /// caller can check the run reached past the first checks.
    pub fn run(&self, corpus: &[Vec<u8>], mut target: impl FnMut(&[u8]) -> bool) -> usize {
        assert!(!corpus.is_empty(), "{}: an empty corpus fuzzes nothing", self.name);
        let mut rng = Rng::new(self.seed);
        let mut accepted = 0;
        // A stack overflow aborts the process before any panic message: with
        // `TESSERA_FUZZ_LAST=FILE` each input is written there first, so the last one survives.
        let last = std::env::var_os("TESSERA_FUZZ_LAST");
        for i in 0..self.inputs + corpus.len() {
            let input = if i < corpus.len() {
                corpus[i].clone()
            } else {
                let mut input = corpus[rng.below(corpus.len())].clone();
                let other = &corpus[rng.below(corpus.len())];
                for _ in 0..1 + rng.below(self.max_mutations) {
                    mutate(&mut rng, &mut input, other);
                }
                input
            };
            if let Some(path) = &last {
                let _ = std::fs::write(path, &input);
            }
            match catch_unwind(AssertUnwindSafe(|| target(&input))) {
                Ok(ok) => accepted += usize::from(ok),
                Err(_) => panic!(
                    "{}: input {i} (seed {}) panicked; replay with TESSERA_FUZZ_SEED={}; input ({} bytes): {}",
                    self.name,
                    self.seed,
                    self.seed,
                    input.len(),
                    hex(&input[..input.len().min(4096)])
                ),
            }
        }
        accepted
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_makes_the_same_inputs_and_a_panic_is_reported() {
        let corpus = vec![b"{\"a\": 12}".to_vec()];
        let mut seen = Vec::new();
        Campaign::new("record").inputs(50).run(&corpus, |input| {
            seen.push(input.to_vec());
            true
        });
        let mut again = Vec::new();
        Campaign::new("record").inputs(50).run(&corpus, |input| {
            again.push(input.to_vec());
            true
        });
        assert_eq!(seen, again);
        assert!(seen.iter().filter(|s| s.as_slice() != corpus[0].as_slice()).count() > 40, "inputs are mutated");
        let caught = catch_unwind(|| Campaign::new("boom").inputs(10).run(&corpus, |input| input.len() < 1000 && panic!("boom")));
        let message = caught.expect_err("the panic is reported");
        let message = message.downcast_ref::<String>().expect("a message");
        assert!(message.contains("boom: input 0") && message.contains("TESSERA_FUZZ_SEED"), "{message}");
    }
}
