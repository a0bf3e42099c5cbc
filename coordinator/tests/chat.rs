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
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
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
