//! config.json parsing: both rope forms, every supported scaling type, and typed errors.

use tessera_model::{Architecture, ModelConfig, ModelError, RopeScaling};

fn parse(json: &str) -> Result<ModelConfig, ModelError> {
    ModelConfig::from_json_bytes(json.as_bytes())
}

fn llama(extra: &str) -> String {
    format!(
        r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":320,
        "max_position_embeddings":128,"rms_norm_eps":1e-5{extra}}}"#
    )
}

#[test]
fn legacy_and_rope_parameters_forms_agree() {
    let legacy =
        parse(&llama(r#","rope_theta":500000.0,"rope_scaling":{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32}"#))
            .unwrap();
    let new = parse(&llama(
        r#","rope_parameters":{"rope_type":"yarn","rope_theta":500000.0,"factor":4.0,"original_max_position_embeddings":32}"#,
    ))
    .unwrap();
    assert_eq!(legacy, new);
    assert_eq!(new.rope_theta, 500000.0);
    match new.rope_scaling {
        RopeScaling::Yarn { factor, original_max_position_embeddings, attention_factor, beta_fast, beta_slow, truncate } => {
            assert_eq!((factor, original_max_position_embeddings), (4.0, 32));
            assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
            assert_eq!((beta_fast, beta_slow, truncate), (32.0, 1.0, true));
        }
        other => panic!("expected yarn, got {other:?}"),
    }
}

#[test]
fn every_scaling_type_parses() {
    let linear = parse(&llama(r#","rope_theta":10000.0,"rope_scaling":{"type":"linear","factor":2.0}"#)).unwrap();
    assert_eq!(linear.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    let dynamic = parse(&llama(r#","rope_theta":10000.0,"rope_scaling":{"type":"dynamic","factor":2.0}"#)).unwrap();
    assert_eq!(dynamic.rope_scaling, RopeScaling::Dynamic { factor: 2.0, original_max_position_embeddings: 128 });
    assert_eq!(dynamic.max_context(), 256);
    let llama3 = parse(&llama(
        r#","rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
    ))
    .unwrap();
    assert_eq!(
        llama3.rope_scaling,
        RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 }
    );
    let default = parse(&llama(r#","rope_parameters":{"rope_type":"default","rope_theta":1000000.0}"#)).unwrap();
    assert_eq!((default.rope_scaling, default.rope_theta), (RopeScaling::None, 1e6));
    let null_scaling = parse(&llama(r#","rope_theta":10000.0,"rope_scaling":null"#)).unwrap();
    assert_eq!(null_scaling.rope_scaling, RopeScaling::None);
}

#[test]
fn fields_that_break_naive_parsers() {
    let c =
        parse(&llama(r#","rope_theta":1e4,"head_dim":24,"attention_bias":true,"eos_token_id":[5,7],"tie_word_embeddings":true"#)).unwrap();
    assert_eq!(c.head_dim, 24);
    assert!(c.qkv_bias && c.o_bias && !c.mlp_bias);
    assert_eq!(c.eos_token_ids, vec![5, 7]);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.group_size(), 2);

    let single_eos = parse(&llama(r#","rope_theta":1e4,"eos_token_id":2,"bos_token_id":1"#)).unwrap();
    assert_eq!((single_eos.eos_token_ids, single_eos.bos_token_id), (vec![2], Some(1)));

    let qwen = parse(
        &llama(r#","rope_theta":1e6,"sliding_window":4096,"use_sliding_window":false"#).replace("LlamaForCausalLM", "Qwen2ForCausalLM"),
    )
    .unwrap();
    assert_eq!(qwen.architecture, Architecture::Qwen2);
    assert!(qwen.qkv_bias && !qwen.o_bias, "Qwen2 biases q/k/v only");
    assert_eq!(qwen.sliding_window, vec![None, None], "use_sliding_window=false disables the window");

    let qwen_swa = parse(
        &llama(r#","rope_theta":1e6,"sliding_window":8,"use_sliding_window":true,"max_window_layers":1"#)
            .replace("LlamaForCausalLM", "Qwen2ForCausalLM"),
    )
    .unwrap();
    assert_eq!(qwen_swa.sliding_window, vec![None, Some(8)]);

    let mistral = parse(&llama(r#","rope_theta":1e6,"sliding_window":16"#).replace("LlamaForCausalLM", "MistralForCausalLM")).unwrap();
    assert_eq!(mistral.sliding_window, vec![Some(16), Some(16)]);

    let old = parse(&llama(r#","rope_theta":1e4"#).replace(r#""num_key_value_heads":2,"#, "")).unwrap();
    assert_eq!(old.num_key_value_heads, 4, "absent num_key_value_heads means multi-head attention");
}

#[test]
fn unsupported_values_are_typed_errors() {
    let arch = parse(&llama(r#","rope_theta":1e4"#).replace("LlamaForCausalLM", "GPT2LMHeadModel"));
    assert!(matches!(arch, Err(ModelError::UnsupportedArchitecture(ref a)) if a == "GPT2LMHeadModel"), "{arch:?}");

    let rope = parse(&llama(r#","rope_theta":1e4,"rope_scaling":{"rope_type":"longrope","factor":2.0}"#));
    assert!(matches!(rope, Err(ModelError::UnsupportedRopeType(ref t)) if t == "longrope"), "{rope:?}");

    let no_theta = parse(&llama(""));
    assert!(matches!(no_theta, Err(ModelError::InvalidConfig(ref m)) if m.contains("rope_theta")), "{no_theta:?}");

    let no_factor = parse(&llama(r#","rope_theta":1e4,"rope_scaling":{"type":"linear"}"#));
    assert!(matches!(no_factor, Err(ModelError::InvalidConfig(ref m)) if m.contains("factor")), "{no_factor:?}");

    let heads = parse(&llama(r#","rope_theta":1e4"#).replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#));
    assert!(matches!(heads, Err(ModelError::InvalidConfig(_))), "{heads:?}");

    let garbage = parse("{not json");
    assert!(matches!(garbage, Err(ModelError::ConfigJson { .. })), "{garbage:?}");

    let act = parse(&llama(r#","rope_theta":1e4,"hidden_act":"gelu""#));
    assert!(matches!(act, Err(ModelError::InvalidConfig(ref m)) if m.contains("gelu")), "{act:?}");
}
