//! The key file's format: `NAME SHA256HEX [max_concurrent=N] [tokens_per_minute=N]` per line;
//! blank lines and lines starting with `#` are skipped.

use std::path::PathBuf;

use super::KeyLimits;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the API key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("API key file line {line}: {what}")]
    Line { line: usize, what: String },
    #[error("the API key file names no key")]
    Empty,
}

pub(super) struct Line {
    pub name: String,
    pub digest: [u8; 32],
    pub limits: KeyLimits,
}

pub(super) fn parse(text: &str) -> Result<Vec<Line>, KeyFileError> {
    let mut lines: Vec<Line> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: String| KeyFileError::Line { line: i + 1, what };
        let mut words = line.split_whitespace();
        let (Some(name), Some(hex)) = (words.next(), words.next()) else {
            return Err(bad("expected NAME SHA256HEX [max_concurrent=N] [tokens_per_minute=N]".into()));
        };
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
            return Err(bad(format!("the name {name:?} may hold only letters, digits and - _ . @")));
        }
        if lines.iter().any(|l| l.name == name) {
            return Err(bad(format!("the name {name:?} is used twice")));
        }
        let digest = parse_digest(hex).ok_or_else(|| bad("the second field must be 64 hex digits (the key's SHA-256)".into()))?;
        if lines.iter().any(|l| l.digest == digest) {
            return Err(bad(format!("{name} has the same key as another line")));
        }
        let mut limits = KeyLimits::default();
        for word in words {
            let parsed = match word.split_once('=') {
                Some(("max_concurrent", n)) => n.parse().ok().filter(|&n| n > 0).map(|n| limits.max_concurrent = Some(n)),
                Some(("tokens_per_minute", n)) => n.parse().ok().filter(|&n| n > 0).map(|n| limits.tokens_per_minute = Some(n)),
                _ => None,
            };
            if parsed.is_none() {
                return Err(bad(format!("{word:?}: expected max_concurrent=N or tokens_per_minute=N with N at least 1")));
            }
        }
        lines.push(Line { name: name.to_string(), digest, limits });
    }
    if lines.is_empty() {
        return Err(KeyFileError::Empty);
    }
    Ok(lines)
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(digest)
}
