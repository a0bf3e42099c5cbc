//! Incremental detokenization with the fixtures' byte-level BPE: pieces never split a UTF-8
//! character and always concatenate to the full decode.

use tessera_coordinator::detokenize::IncrementalDecoder;
use tessera_model::fixture::tokenizer::{byte_level_bpe, TokenizerSpec, DEFAULT_CORPUS};
use tessera_model::fixture::SPECIAL_TOKENS;
use tokenizers::Tokenizer;

fn tokenizer() -> Tokenizer {
    let json = byte_level_bpe(&TokenizerSpec { corpus: DEFAULT_CORPUS, vocab_size: 320, special_tokens: &SPECIAL_TOKENS }).unwrap();
    Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap()
}

fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut d = IncrementalDecoder::new(std::sync::Arc::new(tok.clone()), false);
    let mut pieces: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
    pieces.push(d.flush().unwrap());
    pieces
}

#[test]
fn chinese_streams_whole_characters_only() {
    let tok = tokenizer();
    for text in ["你好，世界！今天天气很好。", "混合 text 和中文 with emoji 🎉 结束", "ASCII only, fine."] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert!(ids.len() > text.chars().count() / 2, "expected byte-level splits in {text:?}");
        let pieces = stream(&tok, &ids);
        for p in &pieces {
            assert!(!p.contains('\u{FFFD}'), "piece {p:?} of {text:?} holds a replacement character");
        }
        assert_eq!(pieces.concat(), text);
        assert_eq!(pieces.concat(), tok.decode(&ids, false).unwrap());
    }
}

#[test]
fn invalid_bytes_do_not_stall_the_stream() {
    let tok = tokenizer();
    // A lone continuation byte repeated: never valid UTF-8. Find the id of byte 0x80.
    let lone = tok.encode("é", false).unwrap().get_ids().to_vec();
    let continuation = *lone.last().unwrap();
    let ids = vec![continuation; 12];
    let mut d = IncrementalDecoder::new(std::sync::Arc::new(tok.clone()), false);
    let emitted: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
    assert!(emitted.iter().filter(|p| !p.is_empty()).count() >= 2, "invalid bytes must flush periodically: {emitted:?}");
    let mut all = emitted.concat();
    all.push_str(&d.flush().unwrap());
    assert_eq!(all, tok.decode(&ids, false).unwrap());
}
