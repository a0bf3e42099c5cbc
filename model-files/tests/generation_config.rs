//! `generation_config.json`'s sampling settings, as the coordinator takes them for defaults.

use tessera_model_files::{ModelFiles, SamplingDefaults};

fn dir_with(generation_config: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).expect("write config");
    if let Some(text) = generation_config {
        std::fs::write(dir.path().join("generation_config.json"), text).expect("write generation config");
    }
    dir
}

fn defaults(generation_config: Option<&str>) -> Result<SamplingDefaults, String> {
    let dir = dir_with(generation_config);
    ModelFiles::locate(dir.path()).and_then(|f| f.sampling_defaults()).map_err(|e| e.to_string())
}

#[test]
fn the_four_sampling_keys_are_read_and_others_ignored() {
    // Qwen2.5-Instruct's file.
    let qwen = r#"{"bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643],
        "pad_token_id": 151643, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}"#;
    let want = SamplingDefaults { temperature: Some(0.7), top_k: Some(20), top_p: Some(0.8), repetition_penalty: Some(1.05) };
    assert_eq!(defaults(Some(qwen)), Ok(want));
    // Llama-3-Instruct's: no top_k, no repetition penalty.
    let llama = r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [128001, 128009]}"#;
    assert_eq!(defaults(Some(llama)), Ok(SamplingDefaults { temperature: Some(0.6), top_p: Some(0.9), ..Default::default() }));
}

#[test]
fn no_file_or_no_cut_gives_no_default() {
    assert_eq!(defaults(None), Ok(SamplingDefaults::default()));
    // transformers' 0 and vLLM's -1 mean no top-k cut; null means unset.
    for top_k in ["0", "-1", "null"] {
        let text = format!(r#"{{"top_k": {top_k}, "temperature": null}}"#);
        assert_eq!(defaults(Some(&text)), Ok(SamplingDefaults::default()), "top_k {top_k}");
    }
}

#[test]
fn a_key_of_the_wrong_type_is_refused_by_name() {
    let err = defaults(Some(r#"{"temperature": "0.7"}"#)).expect_err("a string temperature");
    assert!(err.contains("generation_config.json: temperature is \"0.7\", not a number"), "{err}");
}
