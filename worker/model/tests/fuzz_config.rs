//! Seeded mutation fuzzing of `config.json` parsing (see `tessera_mutate`): 100,000 mutated
//! configs of every fixture architecture end in a config or a typed error, never a panic, and
//! what is accepted answers the questions the loader asks of it. The same for a LoRA adapter's
//! `adapter_config.json`.

use tessera_model::fixture::{demo, test_fixtures};
use tessera_model::ModelConfig;
use tessera_mutate::Campaign;

#[test]
fn hostile_configs_parse_or_fail() {
    let corpus: Vec<Vec<u8>> =
        test_fixtures().into_iter().chain([demo()]).map(|f| serde_json::to_vec_pretty(&f.config).expect("json")).collect();
    let accepted = Campaign::new("config.json").run(&corpus, |bytes| match ModelConfig::from_json_bytes(bytes) {
        Ok(config) => {
            let _ = (config.max_context(), config.group_size());
            true
        }
        Err(_) => false,
    });
    assert!(accepted > 1000, "mutated configs must still parse often ({accepted})");
}

#[test]
fn hostile_adapter_configs_parse_or_fail() {
    let golden = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/lora");
    let corpus: Vec<Vec<u8>> = ["r8-attn", "r16-all-rslora", "r8-qv"]
        .iter()
        .map(|a| std::fs::read(golden.join(a).join("adapter_config.json")).expect("adapter config"))
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("adapter_config.json");
    let accepted = Campaign::new("adapter_config.json").run(&corpus, |bytes| {
        std::fs::write(&path, bytes).expect("write");
        match tessera_model::read_adapter_config(dir.path()) {
            Ok(config) => {
                assert!((1..=tessera_model::MAX_LORA_RANK).contains(&config.rank) && config.scale().is_finite());
                true
            }
            Err(_) => false,
        }
    });
    assert!(accepted > 1000, "mutated adapter configs must still parse often ({accepted})");
}
