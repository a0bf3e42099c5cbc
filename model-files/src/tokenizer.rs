//! The tokenizer a llama.cpp GGUF file carries, rebuilt as a `tokenizers::Tokenizer`.
//!
//! A bare `.gguf` has no `tokenizer.json`: llama.cpp's converter stores the vocabulary, its merges
//! or sentencepiece scores, the token types and the special ids as `tokenizer.ggml.*` metadata.
//! [`from_metadata`] builds from those the tokenizer transformers builds from the same file
//! (`integrations/gguf/gguf_tokenizer_mapping.py`, transformers 5.25), so token ids match Hugging
//! Face's. Two vocabularies are supported:
//!
//! * `gpt2`: byte-level BPE with the file's merges; the pre-tokenizer follows `tokenizer.ggml.pre`.
//! * `llama`: sentencepiece BPE with byte fallback; merges are the file's, or recovered from the
//!   token scores as transformers' `generate_merges` does.
//!
//! Where transformers does not build what the file describes and llama.cpp does, this follows the
//! file (the goldens in `tests/golden/` record both):
//! * `tokenizer.ggml.pre = smollm` isolates every digit first, as SmolLM2's own `tokenizer.json`
//!   and llama.cpp do; transformers uses GPT-2's plain ByteLevel ("x  3" then differs).
//! * `tokenizer.ggml.add_space_prefix = false` on a sentencepiece vocabulary prepends no "▁";
//!   transformers ignores the key.
//! * Control and user-defined tokens of a byte-level vocabulary are matched as written even when
//!   they use characters outside the byte alphabet (`<｜User｜>`); transformers respells those and
//!   never matches them whole.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab as BpeVocab, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{FilesError, Result};
use crate::gguf::Value;

/// The tokenizer a GGUF file carries, with the special tokens the chat template needs.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`, then `eot_token_id` when the file names a different one:
    /// generation stops at any of them.
    pub eos_ids: Vec<u32>,
    /// Whether `encode(text, true)` starts with `bos` (the file's `add_bos_token`).
    pub add_bos: bool,
}

/// llama.cpp's `tokenizer.ggml.token_type` values that make a token an added token.
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Sentencepiece's word-boundary mark.
const SPACE_MARK: char = '\u{2581}';

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
///
/// Fails with [`FilesError::Invalid`], naming the key, when a key is missing or of the wrong
/// type, an id lies outside the vocabulary, the merges do not fit the tokens, or the file describes
/// a tokenizer this does not build (`tokenizer.ggml.model` other than gpt2 or llama, or a Gemma
/// sentencepiece vocabulary).
pub fn from_metadata(metadata: &HashMap<String, Value>) -> Result<GgufTokenizer> {
    let meta = Meta(metadata);
    let model = meta.string("tokenizer.ggml.model")?.ok_or_else(|| missing("tokenizer.ggml.model"))?;
    let vocab = Vocab::read(&meta)?;
    // llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    let (mut tokenizer, default_add_bos) = match model {
        "gpt2" => (byte_level(&vocab, meta.string("tokenizer.ggml.pre")?)?, false),
        "llama" => (sentencepiece(&vocab, &meta)?, true),
        other => return Err(invalid(format!("GGUF tokenizer.ggml.model {other:?} is not supported (expected gpt2 or llama)"))),
    };
    add_special_tokens(&mut tokenizer, &vocab)?;

    let add_bos = flag(&meta, "tokenizer.ggml.add_bos_token", default_add_bos, vocab.bos, "bos")?;
    let add_eos = flag(&meta, "tokenizer.ggml.add_eos_token", false, vocab.eos, "eos")?;
    let bos = vocab.bos.filter(|_| add_bos);
    let eos = vocab.eos.filter(|_| add_eos);
    tokenizer.with_post_processor(Some(post_processor(&vocab, bos, eos)?));

    let mut eos_ids: Vec<u32> = vocab.eos.into_iter().collect();
    if let Some(eot) = vocab.eot {
        if !eos_ids.contains(&eot) {
            eos_ids.push(eot);
        }
    }
    Ok(GgufTokenizer {
        tokenizer,
        bos: vocab.bos.map(|id| vocab.token(id).to_owned()),
        eos: vocab.eos.map(|id| vocab.token(id).to_owned()),
        bos_id: vocab.bos,
        eos_ids,
        add_bos,
    })
}

/// `add_bos_token` / `add_eos_token`. A file that asks for a token it does not name is an error;
/// the sentencepiece default of adding BOS only applies when the file names one.
fn flag(meta: &Meta, key: &str, default: bool, id: Option<u32>, what: &str) -> Result<bool> {
    match (meta.bool(key)?, id) {
        (Some(true), None) => Err(invalid(format!("GGUF {key} is true but tokenizer.ggml.{what}_token_id is missing"))),
        (Some(value), _) => Ok(value),
        (None, id) => Ok(default && id.is_some()),
    }
}

/// The entries both vocabularies share, checked against each other.
struct Vocab {
    /// Index = token id.
    tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token; empty when the file has none.
    types: Vec<i64>,
    /// `tokenizer.ggml.scores`, one per token; empty when the file has none.
    scores: Vec<f32>,
    /// `tokenizer.ggml.merges` as pairs, when the file lists them.
    merges: Option<Merges>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
}

impl Vocab {
    fn read(meta: &Meta) -> Result<Self> {
        let tokens = meta.strings("tokenizer.ggml.tokens")?.ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
        if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
            return Err(invalid(format!("GGUF tokenizer.ggml.tokens has {} entries", tokens.len())));
        }
        let types = meta.integers("tokenizer.ggml.token_type")?.unwrap_or_default();
        let scores = meta.floats("tokenizer.ggml.scores")?.unwrap_or_default();
        for (key, len) in [("tokenizer.ggml.token_type", types.len()), ("tokenizer.ggml.scores", scores.len())] {
            if len != 0 && len != tokens.len() {
                return Err(invalid(format!("GGUF {key} has {len} entries but tokenizer.ggml.tokens has {}", tokens.len())));
            }
        }
        let merges = match meta.strings("tokenizer.ggml.merges")? {
            Some(lines) => Some(parse_merges(&lines)?),
            None => None,
        };
        let id = |name: &str| meta.token_id(&format!("tokenizer.ggml.{name}_token_id"), tokens.len());
        Ok(Self {
            bos: id("bos")?,
            eos: id("eos")?,
            eot: id("eot")?,
            unk: id("unknown")?,
            pad: id("padding")?,
            tokens,
            types,
            scores,
            merges,
        })
    }

    /// The token of an id already checked against the vocabulary.
    fn token(&self, id: u32) -> &str {
        self.tokens.get(id as usize).map_or("", String::as_str)
    }

    fn has_type(&self, id: usize, token_type: i64) -> bool {
        self.types.get(id) == Some(&token_type)
    }

    /// Ids of the tokens that become special added tokens: those typed control, and the ones the
    /// file names as bos/eos/unk/pad (transformers adds those even when typed otherwise, as
    /// sentencepiece's `<unk>`). The end-of-turn id is not among them, as in transformers.
    fn special_ids(&self) -> HashSet<usize> {
        let named = [self.bos, self.eos, self.unk, self.pad].into_iter().flatten().map(|id| id as usize);
        (0..self.tokens.len()).filter(|&id| self.has_type(id, TYPE_CONTROL)).chain(named).collect()
    }

    /// Merges from the file, else recovered from the scores.
    fn merges(&self) -> Result<Merges> {
        match (&self.merges, self.scores.is_empty()) {
            (Some(merges), _) => Ok(merges.clone()),
            (None, false) => Ok(merges_from_scores(&self.tokens, &self.scores)),
            (None, true) => Err(invalid("GGUF metadata has neither tokenizer.ggml.merges nor tokenizer.ggml.scores".to_owned())),
        }
    }
}

/// `"a b"` lines as pairs; transformers splits on every space, so a line is exactly two tokens.
fn parse_merges(lines: &[String]) -> Result<Merges> {
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok((a.to_owned(), b.to_owned())),
                _ => Err(invalid(format!("GGUF tokenizer.ggml.merges[{i}] = {line:?} is not two tokens separated by one space"))),
            }
        })
        .collect()
}

/// The merges a sentencepiece vocabulary implies, ranked as transformers' `generate_merges` ranks
/// them: every split of every token into two tokens, in vocabulary order, then stably sorted
/// best-first by (score, left length, right length), lengths in characters. The ranking decides
/// which of two overlapping merges wins, so it is kept to the letter. (transformers also sorts each
/// token's splits by the parts' ids first; those splits differ in left length, so that order never
/// survives the final sort.)
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Merges {
    // A token listed twice keeps its last id and score but its first position, like a Python dict.
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        if ids.insert(token, id).is_none() {
            order.push(token);
        }
    }
    let score = |token: &str| ids.get(token).and_then(|&id| scores.get(id)).copied().unwrap_or(0.0);

    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for token in order {
        let splits = token.char_indices().skip(1).map(|(at, _)| token.split_at(at));
        let known = splits.filter(|(left, right)| ids.contains_key(left) && ids.contains_key(right));
        merges.extend(known.map(|(left, right)| (left, right, score(token))));
    }
    // Python compares scores as floats: equal ones (0.0 and -0.0 too) keep the order above.
    let key = |&(left, right, score): &(&str, &str, f32)| (score, left.chars().count(), right.chars().count());
    merges.sort_by(|a, b| {
        let ((sa, la, ra), (sb, lb, rb)) = (key(a), key(b));
        sb.partial_cmp(&sa).unwrap_or(Ordering::Equal).then(lb.cmp(&la)).then(rb.cmp(&ra))
    });
    merges.into_iter().map(|(left, right, _)| (left.to_owned(), right.to_owned())).collect()
}

/// Byte-level BPE, as transformers' `byte_level_tokenizer` plus `set_split_regex`.
fn byte_level(vocab: &Vocab, pre: Option<&str>) -> Result<Tokenizer> {
    let spelling = byte_spelling();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let kept = vocab.special_ids();
    // Every ordinary token is written in the byte alphabet; one that is not gets respelled from its
    // UTF-8 bytes, as transformers does. Added tokens stay as written: they are matched in the raw
    // text before any byte mapping, and must keep their own ids.
    let model_vocab: BpeVocab = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(id, token)| {
            let as_is = kept.contains(&id) || vocab.has_type(id, TYPE_USER_DEFINED) || token.chars().all(|c| alphabet.contains(&c));
            let key = if as_is { token.clone() } else { respell(token, &spelling) };
            (key, id as u32)
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(model_vocab, vocab.merges()?)
        .build()
        .map_err(|e| invalid(format!("GGUF tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// How `tokenizer.ggml.pre` splits text before the byte mapping.
fn byte_level_pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    if pre == Some("smollm") {
        // SmolLM2's tokenizer.json; llama.cpp's smollm pre-type also splits on \p{N} first.
        let digits = Digits::new(true).into();
        let byte_level = ByteLevel::new(false, true, true).into();
        return Ok(PreTokenizerSequence::new(vec![digits, byte_level]).into());
    }
    match pre.and_then(split_regex) {
        Some(regex) => {
            let split = Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| invalid(format!("GGUF tokenizer.ggml.pre {pre:?}: its split regex does not compile: {e}")))?;
            let byte_level = ByteLevel::new(false, true, false);
            Ok(PreTokenizerSequence::new(vec![split.into(), byte_level.into()]).into())
        }
        // GPT-2's own regex, inside ByteLevel: `gpt-2`, `default`, and any name not listed.
        None => Ok(ByteLevel::new(false, true, true).into()),
    }
}

const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex of a pre-tokenizer name, as transformers' `GGUF_PRE_TOKENIZER_SPLITS`.
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "jina-v5-nano" | "dbrx"
        | "smaug-bpe" => LLAMA3_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// GPT-2's `bytes_to_unicode`: the printable character each byte is written as.
fn byte_spelling() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut spelling = ['\0'; 256];
    // The others take 256, 257, ... in byte order: all valid chars.
    let mut next = 256u32;
    for b in 0..=255u8 {
        spelling[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    spelling
}

fn respell(token: &str, spelling: &[char; 256]) -> String {
    token.bytes().map(|b| spelling[b as usize]).collect()
}

/// Sentencepiece BPE with byte fallback, as transformers' `LlamaTokenizer` built from the file.
fn sentencepiece(vocab: &Vocab, meta: &Meta) -> Result<Tokenizer> {
    let arch = meta.string("general.architecture")?.unwrap_or("");
    if arch.starts_with("gemma") {
        // Gemma's scores do not follow its merge order and it spells runs of spaces differently.
        return Err(invalid(format!("GGUF general.architecture {arch:?} with a llama (sentencepiece) vocabulary is not supported")));
    }
    let model_vocab: BpeVocab = vocab.tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(model_vocab, vocab.merges()?)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| invalid(format!("GGUF tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}")))?;
    let add_prefix_space = meta.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let mark = SPACE_MARK.to_string();

    let mut tokenizer = Tokenizer::new(bpe);
    if arch == "phi3" {
        // Phi-3 prepends the mark in a normalizer, so "  hi" keeps both spaces (transformers'
        // `phi3_tokenizer`); Metaspace would fold the first into the prefix.
        let replace = replace(" ", &mark)?.into();
        let steps: Vec<NormalizerWrapper> = if add_prefix_space { vec![Prepend::new(mark.clone()).into(), replace] } else { vec![replace] };
        tokenizer
            .with_normalizer(Some(NormalizerSequence::new(steps)))
            .map_err(|e| invalid(format!("cannot set the phi3 normalizer: {e}")))?;
    } else {
        let scheme = if add_prefix_space { PrependScheme::First } else { PrependScheme::Never };
        tokenizer.with_pre_tokenizer(Some(Metaspace::new(SPACE_MARK, scheme, false)));
    }
    let mut steps: Vec<DecoderWrapper> = vec![replace(&mark, " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_prefix_space {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(steps)));
    Ok(tokenizer)
}

fn replace(pattern: &str, content: &str) -> Result<Replace> {
    Replace::new(pattern, content).map_err(|e| invalid(format!("cannot build Replace({pattern:?}, {content:?}): {e}")))
}

/// Control and named special tokens become special added tokens, user-defined ones plain added
/// tokens: both are matched whole in the raw text (`normalized: false`), as llama.cpp does.
fn add_special_tokens(tokenizer: &mut Tokenizer, vocab: &Vocab) -> Result<()> {
    let special_ids = vocab.special_ids();
    let mut special: Vec<usize> = special_ids.iter().copied().collect();
    special.sort_unstable();
    let added = |ids: &[usize], is_special: bool| -> Vec<AddedToken> {
        ids.iter().map(|&id| AddedToken::from(vocab.token(id as u32), is_special).normalized(false)).collect()
    };
    tokenizer.add_special_tokens(added(&special, true)).map_err(|e| invalid(format!("cannot add special tokens: {e}")))?;

    let user_defined: Vec<usize> =
        (0..vocab.tokens.len()).filter(|&id| vocab.has_type(id, TYPE_USER_DEFINED) && !special_ids.contains(&id)).collect();
    tokenizer.add_tokens(added(&user_defined, false)).map_err(|e| invalid(format!("cannot add user-defined tokens: {e}")))?;
    Ok(())
}

/// `[bos] $A [eos]`, as transformers' `update_post_processor` (a pair repeats it for `$B`). The
/// template names the tokens by role, so token text with spaces or colons cannot break it.
fn post_processor(vocab: &Vocab, bos: Option<u32>, eos: Option<u32>) -> Result<TemplateProcessing> {
    let template = |seq: &str, type_id: u32| -> Vec<String> {
        let mut pieces = Vec::new();
        if bos.is_some() {
            pieces.push(format!("BOS:{type_id}"));
        }
        pieces.push(format!("${seq}:{type_id}"));
        if eos.is_some() {
            pieces.push(format!("EOS:{type_id}"));
        }
        pieces
    };
    let special = |role: &str, id: u32| SpecialToken::new(role.to_owned(), vec![id], vec![vocab.token(id).to_owned()]);
    let mut specials = Vec::new();
    for (role, id) in [("BOS", bos), ("EOS", eos)] {
        if let Some(id) = id {
            specials.push(special(role, id).map_err(|e| invalid(format!("post-processor token {role}: {e}")))?);
        }
    }
    let mut pair = template("A", 0);
    pair.extend(template("B", 1));
    TemplateProcessing::builder()
        .try_single(template("A", 0))
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| invalid(format!("post-processor template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| invalid(format!("post-processor: {e}")))
}

/// Typed reads of the metadata map; every error names its key.
struct Meta<'a>(&'a HashMap<String, Value>);

impl Meta<'_> {
    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(key, "a string", other)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(key, "a bool", other)),
        }
    }

    /// A token id: any integer type, within the vocabulary.
    fn token_id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>> {
        let Some(value) = self.0.get(key) else { return Ok(None) };
        let id = integer(value).ok_or_else(|| wrong_type(key, "an integer", value))?;
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
            _ => Err(invalid(format!("GGUF {key} = {id} is not a token id ({n_tokens} tokens)"))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(wrong_type(key, "an array", other)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        self.elements(key, "a string", |v| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        })
    }

    fn integers(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.elements(key, "an integer", integer)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.elements(key, "a float", |v| match v {
            Value::F32(f) => Some(*f),
            Value::F64(f) => Some(*f as f32),
            _ => None,
        })
    }

    fn elements<T>(&self, key: &str, what: &str, read: impl Fn(&Value) -> Option<T>) -> Result<Option<Vec<T>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        let read_one = |(i, item): (usize, &Value)| read(item).ok_or_else(|| wrong_type(&format!("{key}[{i}]"), what, item));
        items.iter().enumerate().map(read_one).collect::<Result<Vec<T>>>().map(Some)
    }
}

fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::I8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::I16(v) => Some(v.into()),
        Value::U32(v) => Some(v.into()),
        Value::I32(v) => Some(v.into()),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

fn invalid(message: String) -> FilesError {
    FilesError::Invalid(message)
}

fn missing(key: &str) -> FilesError {
    invalid(format!("GGUF metadata has no {key}"))
}

fn wrong_type(key: &str, expected: &str, found: &Value) -> FilesError {
    invalid(format!("GGUF {key} should be {expected}, found {:?}", found.value_type()))
}
