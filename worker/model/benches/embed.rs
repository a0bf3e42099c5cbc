//! Embeddings per second of the BERT encoder (all-MiniLM-L6-v2) at batches of 1, 32 and 256
//! short English and Chinese texts, in the same shape as `scripts/bench/st_embed.py` (the
//! sentence-transformers side; `scripts/bench_embeddings.sh` runs both and prints the table).
//!
//! usage: cargo bench -p tessera-model --bench embed -- [MODEL_DIR]
//! MODEL_DIR (or `TESSERA_MINILM_DIR`) is what `scripts/fetch_minilm.sh` prints. The texts come
//! from `scripts/bench/embed_texts.json` (or `TESSERA_EMBED_TEXTS`), which the Python side reads
//! too. Tokenization (tokenizer.json, padding and truncation off, as in `tests/bert_parity.rs`)
//! happens before timing; only `BertModel::embed` is timed.
//!
//! Scheme, shared with the Python script: call k of a batch size embeds texts k·batch,
//! k·batch+1, … (cycled through the list); a few warm-up calls, then a fixed number of timed
//! calls; emb/s = batch ÷ median call time. Prints one `RESULT engine=tessera batch=…` line per
//! batch size.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use serde::Deserialize;
use tessera_model::BertModel;
use tokenizers::Tokenizer;

/// (batch, warm-up calls, timed calls): the same numbers as in `st_embed.py`.
const PLAN: [(usize, usize, usize); 3] = [(1, 3, 48), (32, 3, 15), (256, 2, 7)];

#[derive(Deserialize)]
struct Texts {
    texts: Vec<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn model_dir() -> anyhow::Result<PathBuf> {
    // `cargo bench` passes `--bench` to harness-less benches; skip flags.
    let arg = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let dir = match arg.or_else(|| std::env::var("TESSERA_MINILM_DIR").ok()) {
        Some(d) => PathBuf::from(d),
        None => bail!(
            "no model directory: pass it as the first argument or set TESSERA_MINILM_DIR \
             (scripts/fetch_minilm.sh fetches all-MiniLM-L6-v2 and prints its directory)"
        ),
    };
    if !dir.join("model.safetensors").is_file() || !dir.join("tokenizer.json").is_file() {
        bail!("{} has no model.safetensors and tokenizer.json: run scripts/fetch_minilm.sh", dir.display());
    }
    Ok(dir)
}

fn texts() -> anyhow::Result<Vec<String>> {
    let path = std::env::var("TESSERA_EMBED_TEXTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench/embed_texts.json"));
    let raw = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let t: Texts = serde_json::from_str(&raw).with_context(|| format!("parse {}", path.display()))?;
    if t.texts.is_empty() {
        bail!("{} lists no texts", path.display());
    }
    Ok(t.texts)
}

fn main() -> anyhow::Result<()> {
    let dir = model_dir()?;
    let texts = texts()?;
    let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(anyhow::Error::msg)?;
    let start = Instant::now();
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode(t.as_str(), true).map(|e| e.get_ids().to_vec()).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let tok_s = start.elapsed().as_secs_f64();
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();

    let start = Instant::now();
    let model = BertModel::load(&dir, &Device::Cpu).context("load the model")?;
    eprintln!(
        "loaded {} in {:.2} s, threads {}; {} texts, {}..={} tokens, tokenized in {:.2} ms",
        dir.display(),
        start.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads(),
        texts.len(),
        lens.iter().min().unwrap_or(&0),
        lens.iter().max().unwrap_or(&0),
        tok_s * 1e3
    );

    for (batch, warmup, timed) in PLAN {
        let call = |k: usize| -> anyhow::Result<f64> {
            let seqs: Vec<&[u32]> = (0..batch).map(|i| ids[(k * batch + i) % ids.len()].as_slice()).collect();
            let start = Instant::now();
            let out = model.embed(&seqs)?;
            let s = start.elapsed().as_secs_f64();
            assert_eq!((out.len(), out[0].len()), (batch, model.dim()));
            Ok(s)
        };
        for k in 0..warmup {
            call(k)?;
        }
        let times = (0..timed).map(call).collect::<anyhow::Result<Vec<f64>>>()?;
        let (lo, hi) = times.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
        let med = median(times);
        let eps = batch as f64 / med;
        println!(
            "tessera batch {batch:>3}: {eps:>9.1} emb/s (median {:.2} ms per call, min {:.2}, max {:.2}, {timed} calls)",
            med * 1e3,
            lo * 1e3,
            hi * 1e3
        );
        println!("RESULT engine=tessera batch={batch} emb_per_s={eps:.2} median_ms={:.3} calls={timed}", med * 1e3);
    }
    Ok(())
}
