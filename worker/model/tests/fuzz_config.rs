//! Seeded mutation fuzzing of `config.json` parsing (see `tessera_mutate`): 100,000 mutated
//! configs of every fixture architecture end in a config or a typed error, never a panic, and
//! what is accepted answers the questions the loader asks of it.

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
