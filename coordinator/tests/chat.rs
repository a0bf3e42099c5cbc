//! Chat templates from real `tokenizer_config.json` files render as the model expects.

use tessera_coordinator::chat::{ChatError, ChatMessage, ChatTemplate};
use tessera_model::fixture::{test_fixtures, write_fixture, WriteOptions};

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.into(), content: content.into() }
}

#[test]
fn fixture_chatml_template_renders() {
    let spec = test_fixtures().into_iter().next().unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chat-{}", std::process::id()));
    let dir = write_fixture(&spec, &root, &WriteOptions::default()).unwrap();
    let t = ChatTemplate::from_model(&dir).unwrap();
    let out = t.render(&[msg("system", "Be brief."), msg("user", "你好")], true).unwrap();
    assert_eq!(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n");
    let no_prompt = t.render(&[msg("user", "hi")], false).unwrap();
    assert_eq!(no_prompt, "<|im_start|>user\nhi<|im_end|>\n");
}

/// A Mistral-style template: `.strip()`, `bos_token`, and `raise_exception` on bad role order.
#[test]
fn python_style_templates_run_and_reject_bad_conversations() {
    let template = "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}{% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]{% else %}{{ m['content'].strip() }}{{ eos_token }}{% endif %}{% endfor %}";
    let t = ChatTemplate::new(template.into(), "<s>".into(), "</s>".into()).unwrap();
    let ok = t.render(&[msg("user", "  hello  "), msg("assistant", " hi "), msg("user", "again")], true).unwrap();
    assert_eq!(ok, "<s>[INST] hello [/INST]hi</s>[INST] again [/INST]");
    match t.render(&[msg("assistant", "first")], true) {
        Err(ChatError::Rejected(m)) => assert!(m.contains("alternate"), "{m}"),
        other => panic!("expected Rejected, got {other:?}", other = other.map(|_| ())),
    }
    assert!(matches!(ChatTemplate::new("{% for %}".into(), String::new(), String::new()), Err(ChatError::Template(_))));
}

fn fixture_dir(tag: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let spec = test_fixtures().into_iter().next().expect("a fixture");
    let root = tempfile::Builder::new().prefix(tag).tempdir().expect("temp dir");
    let dir = write_fixture(&spec, root.path(), &WriteOptions::default()).expect("write fixture");
    (root, dir)
}

/// Moves the fixture's template out of `tokenizer_config.json`, as transformers ≥ 4.43 saves it.
fn take_template(dir: &std::path::Path) -> String {
    let path = dir.join("tokenizer_config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
    let template = config["chat_template"].as_str().expect("fixture template").to_string();
    config.as_object_mut().expect("object").remove("chat_template");
    std::fs::write(&path, serde_json::to_vec(&config).expect("json")).expect("write");
    template
}

/// transformers ≥ 4.43 writes `chat_template.jinja` (or `chat_template.json`); both are read,
/// in transformers' order: `.jinja`, then `.json`, then `tokenizer_config.json`.
#[test]
fn templates_are_found_where_current_transformers_saves_them() {
    let conversation = [msg("system", "Be brief."), msg("user", "你好")];
    let expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n";

    let (_root, dir) = fixture_dir("jinja");
    let template = take_template(&dir);
    assert!(matches!(ChatTemplate::from_model(&dir), Err(ChatError::NoTemplate)));
    std::fs::write(dir.join("chat_template.jinja"), &template).expect("write jinja");
    assert_eq!(ChatTemplate::from_model(&dir).expect("jinja").render(&conversation, true).expect("render"), expected);

    let (_root, dir) = fixture_dir("json");
    let template = take_template(&dir);
    std::fs::write(dir.join("chat_template.json"), serde_json::json!({ "chat_template": template }).to_string()).expect("write json");
    assert_eq!(ChatTemplate::from_model(&dir).expect("json").render(&conversation, true).expect("render"), expected);

    // The .jinja file wins over the others, as in transformers.
    std::fs::write(dir.join("chat_template.jinja"), "JINJA{{ messages[0]['content'] }}").expect("write jinja");
    assert_eq!(ChatTemplate::from_model(&dir).expect("jinja first").render(&conversation, true).expect("render"), "JINJABe brief.");
}

#[derive(serde::Deserialize)]
struct Rendering {
    messages: Vec<ChatMessage>,
    rendered: String,
}

/// The bare GGUF file's own `tokenizer.chat_template` renders exactly what transformers'
/// `apply_chat_template` renders for the same file (`tests/golden/smollm2-greedy.json`).
#[test]
fn a_bare_gguf_renders_as_transformers_does() {
    let path = tessera_model::fixture::smollm2_gguf();
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/smollm2-greedy.json")).expect("golden"),
    )
    .expect("parse golden");
    let renderings: Vec<Rendering> = serde_json::from_value(golden["renderings"].clone()).expect("renderings");
    assert!(renderings.len() >= 3);
    let t = ChatTemplate::from_model(&path).expect("the GGUF carries its template");
    for r in &renderings {
        assert_eq!(t.render(&r.messages, true).expect("render"), r.rendered);
    }
}
