//! Writes the test fixtures (or one named fixture) into a directory.
//!
//! usage: tessera-fixtures OUT_DIR [NAME ...] [--dtype f32|bf16|f16] [--files N] [--adapters N]
//! Names: the test fixtures and `smol135` (the SmolLM-135M-shaped benchmark model).
//! `--adapters N` also writes N random rank-16 LoRA adapters (all seven projections, PEFT's
//! layout) for each model, as `OUT_DIR/<name>-lora-<i>`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::DType;
use tessera_model::fixture::{by_name, test_fixtures, write_fixture, write_lora, LoraSpec, WriteOptions};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut out: Option<PathBuf> = None;
    let mut names = Vec::new();
    let mut opts = WriteOptions::default();
    let mut adapters = 0;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dtype" => {
                opts.dtype = match args.next().as_deref() {
                    Some("f32") => DType::F32,
                    Some("bf16") => DType::BF16,
                    Some("f16") => DType::F16,
                    other => bail!("--dtype takes f32, bf16 or f16, got {other:?}"),
                }
            }
            "--files" => opts.files = args.next().context("--files needs a number")?.parse()?,
            "--adapters" => adapters = args.next().context("--adapters needs a number")?.parse()?,
            _ if out.is_none() => out = Some(PathBuf::from(a)),
            _ => names.push(a),
        }
    }
    let out = out.context("usage: tessera-fixtures OUT_DIR [NAME ...] [--dtype f32|bf16|f16] [--files N] [--adapters N]")?;
    let specs = if names.is_empty() {
        test_fixtures()
    } else {
        names.iter().map(|n| by_name(n).with_context(|| format!("unknown fixture {n:?}"))).collect::<anyhow::Result<_>>()?
    };
    for spec in specs {
        let dir = write_fixture(&spec, &out, &opts)?;
        println!("{}", dir.display());
        for i in 0..adapters {
            let lora = LoraSpec { rank: 16, alpha: 32.0, targets: tessera_model::LORA_TARGETS.to_vec(), seed: 1000 + i };
            println!("{}", write_lora(&spec.config, &lora, &out.join(format!("{}-lora-{i}", spec.name)))?.display());
        }
    }
    Ok(())
}
