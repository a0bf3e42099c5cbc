//! Choosing the next token from a row of logits: [`sampler`] (greedy, seeded random, beam
//! search's scores) and the [`logits`] processors it applies in transformers' order. The crate
//! root re-exports both modules, so their public paths are `tessera_model::sampler` and
//! `tessera_model::logits`.

pub mod logits;
pub mod sampler;
