//! Seeded mutation fuzzing of what the coordinator parses from clients and model files: the
//! whole `Generate` request path (protobuf bytes, decoded and validated against a served model,
//! chat rendering included), chat templates themselves (a template from a hostile file must
//! neither hang nor exhaust memory), the stop-string matcher, the incremental detokenizer and
//! the API key file. Each target takes 100,000 inputs (see `tessera_mutate`) and must answer
//! `Ok` or a typed error, never panic.

use std::sync::Arc;

use prost::Message;
use tessera_coordinator::auth::ApiKeys;
use tessera_coordinator::chat::{ChatMessage, ChatTemplate};
use tessera_coordinator::detokenize::IncrementalDecoder;
use tessera_coordinator::limits::Limits;
use tessera_coordinator::model::{ModelSpec, ServedModel};
use tessera_coordinator::request::prepare;
use tessera_coordinator::stop::{StopMatcher, StopOutcome};
use tessera_model::fixture::tokenizer::{byte_level_bpe, TokenizerSpec, DEFAULT_CORPUS};
use tessera_model::fixture::{demo, write_fixture, WriteOptions, SPECIAL_TOKENS};
use tessera_mutate::Campaign;
use tessera_proto::v1 as pb;
use tokenizers::Tokenizer;

/// Splits an input into text pieces at NUL bytes (lossily decoded).
fn pieces(input: &[u8]) -> Vec<String> {
    input.split(|b| *b == 0).map(|p| String::from_utf8_lossy(p).into_owned()).collect()
}

#[test]
fn generate_requests_decoded_from_hostile_bytes_are_refused_or_prepared() {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = write_fixture(&demo(), root.path(), &WriteOptions::default()).expect("write fixture");
    let spec = ModelSpec { name: "demo".into(), dir, tp: 1, dtype: "f32".into(), max_context: None, batch_invariant: false };
    let models = [Arc::new(ServedModel::load(spec).expect("load"))];
    let limits = Limits::default();
    let sampling = pb::SamplingParams {
        temperature: Some(0.7),
        top_k: Some(40),
        top_p: Some(0.9),
        repetition_penalty: Some(1.1),
        seed: Some(3),
        ..Default::default()
    };
    let stopping = pb::StoppingCriteria { max_new_tokens: 16, stop: vec!["\n\n".into(), "END".into()], ..Default::default() };
    let requests = [
        pb::GenerateRequest {
            model: "demo".into(),
            input: Some(pb::generate_request::Input::Prompt("Once upon a time".into())),
            sampling: Some(sampling.clone()),
            stopping: Some(stopping.clone()),
            ..Default::default()
        },
        pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Tokens(pb::TokenIds { ids: vec![5, 6, 7, 8, 300] })),
            stopping: Some(pb::StoppingCriteria { max_new_tokens: 4, ignore_eos: true, ..Default::default() }),
            ..Default::default()
        },
        pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Chat(pb::ChatInput {
                messages: vec![
                    pb::ChatMessage { role: "system".into(), content: "Be brief.".into() },
                    pb::ChatMessage { role: "user".into(), content: "Hello there".into() },
                ],
            })),
            sampling: Some(sampling),
            stopping: Some(stopping),
            ..Default::default()
        },
    ];
    let corpus: Vec<Vec<u8>> = requests.iter().map(|r| r.encode_to_vec()).collect();
    for request in &requests {
        prepare(request.clone(), &models, &limits).expect("the corpus is valid");
    }
    let accepted = Campaign::new("generate request").run(&corpus, |bytes| {
        let Ok(request) = pb::GenerateRequest::decode(bytes) else { return false };
        prepare(request, &models, &limits).is_ok()
    });
    assert!(accepted > 1000, "mutations must reach past decoding and validation ({accepted} prepared)");
}

#[test]
fn hostile_chat_templates_render_within_limits_or_fail() {
    let templates = [
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ raise_exception('bad role') }}{% endif %}{% endfor %}",
        "{% set n = namespace(i=0) %}{% for m in messages * 3 %}{% set n.i = n.i + 1 %}{{ n.i }}:{{ m.content | upper }}{% endfor %}{% for i in range(10) %}{{ i }}{% endfor %}",
        "{% macro r(x) %}{% if x > 0 %}{{ r(x - 1) }}{% endif %}{{ x }}{% endmacro %}{{ r(5) }}{{ messages | length }}",
    ];
    let corpus: Vec<Vec<u8>> = templates.iter().map(|t| t.as_bytes().to_vec()).collect();
    let messages = [
        ChatMessage { role: "system".into(), content: "You are terse.".into() },
        ChatMessage { role: "user".into(), content: "What is the capital of France?".into() },
        ChatMessage { role: "assistant".into(), content: "Paris.".into() },
    ];
    let rendered = Campaign::new("chat template").run(&corpus, |bytes| {
        let Ok(template) = ChatTemplate::new(String::from_utf8_lossy(bytes).into_owned(), "<s>".into(), "</s>".into()) else {
            return false;
        };
        template.render(&messages, true).is_ok()
    });
    assert!(rendered > 1000, "mutated templates must still render often ({rendered})");
}

#[test]
fn hostile_chat_messages_render_or_fail() {
    let template = ChatTemplate::new(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}".into(),
        "<s>".into(),
        "</s>".into(),
    )
    .expect("template");
    let corpus = vec![b"user\0Hello {{ 7 * 7 }} {% raw %}\0assistant\0Hi\0user\0Bye".to_vec()];
    Campaign::new("chat messages").run(&corpus, |bytes| {
        let parts = pieces(bytes);
        let messages: Vec<ChatMessage> =
            parts.chunks(2).map(|p| ChatMessage { role: p[0].clone(), content: p.get(1).cloned().unwrap_or_default() }).collect();
        match template.render(&messages, true) {
            Ok(text) => {
                // Content is data, never template code: `{{ 7 * 7 }}` stays as written.
                let given = messages.iter().any(|m| m.content.contains("49") || m.role.contains("49"));
                assert!(given || !text.contains("49"), "a message was evaluated as template code: {text:?}");
                true
            }
            Err(_) => false,
        }
    });
}

#[test]
fn the_stop_matcher_passes_every_byte_through_or_stops() {
    let corpus = vec![b"END\0\n\n\0Once upon a time\0 the end\0END\0ing".to_vec(), "é\0\u{1F389}\0é\u{1F389}x\0".as_bytes().to_vec()];
    Campaign::new("stop matcher").run(&corpus, |bytes| {
        let parts = pieces(bytes);
        let (stops, texts) = parts.split_at(parts.len().min(2));
        let mut matcher = StopMatcher::new(stops.iter().filter(|s| !s.is_empty()).cloned());
        let mut out = String::new();
        for text in texts {
            match matcher.push(text) {
                StopOutcome::Continue(piece) => out.push_str(&piece),
                StopOutcome::Stopped { text, matched } => {
                    out.push_str(&text);
                    assert!(stops.contains(&matched), "matched {matched:?}, not a stop string");
                    let all: String = texts.concat();
                    assert!(all.starts_with(&out), "sent text {out:?} is not a prefix of the input");
                    return true;
                }
            }
        }
        out.push_str(&matcher.finish());
        assert_eq!(out, texts.concat(), "without a match every byte goes through");
        false
    });
}

#[test]
fn the_detokenizer_takes_any_id_sequence() {
    let json =
        byte_level_bpe(&TokenizerSpec { corpus: DEFAULT_CORPUS, vocab_size: 320, special_tokens: &SPECIAL_TOKENS }).expect("tokenizer");
    let tokenizer = Arc::new(Tokenizer::from_bytes(json.to_string().as_bytes()).expect("tokenizer"));
    let ids: Vec<u32> = tokenizer.encode("Hello, 世界! 🎉 fine", false).expect("encode").get_ids().to_vec();
    let corpus = vec![ids.iter().flat_map(|id| (*id as u16).to_le_bytes()).collect::<Vec<u8>>()];
    Campaign::new("detokenizer").run(&corpus, |bytes| {
        let mut decoder = IncrementalDecoder::new(tokenizer.clone(), false);
        let mut ok = true;
        for id in bytes.chunks(2).map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32) {
            ok &= decoder.push(id).is_ok();
        }
        decoder.flush().is_ok() && ok
    });
}

#[test]
fn api_key_files_parse_or_fail() {
    let digest = tessera_coordinator::auth::digest_hex("tsk-example");
    let corpus = vec![
        format!("# keys\nalice {digest}\nbob {digest} max_concurrent=4 tokens_per_minute=10000\n").into_bytes(),
        format!("carol {digest} max_concurrent=1\n\n").into_bytes(),
    ];
    let accepted = Campaign::new("api key file").run(&corpus, |bytes| ApiKeys::parse(&String::from_utf8_lossy(bytes)).is_ok());
    assert!(accepted > 100, "some mutated files still parse ({accepted})");
}
