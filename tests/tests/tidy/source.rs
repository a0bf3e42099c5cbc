//! A Rust source file as the tidy checks read it: per line, the code with comments removed and
//! the contents of string and char literals blanked (so `unsafe`, `.unwrap()` or a brace inside
//! them is not taken for code), the comments, and which kind of block the line starts in.
//!
//! A lexer of a few states, not a parser: it knows comments (nested block comments too), string,
//! raw string and char literals, and tells a char literal from a lifetime by the quote after one
//! character. Blocks are tracked by braces; what precedes a `{` since the last `;`, `{` or `}`
//! names the block (`impl Trait for Type`, `mod tests`).

/// One file, line by line.
pub struct Source {
    /// The line as written, for messages.
    pub text: Vec<String>,
    /// The line's code: comments removed, literal contents blanked.
    pub code: Vec<String>,
    /// The line's comments (`//`, `///`, `//!` and block comments), markers included.
    pub comments: Vec<String>,
    /// Whether the line starts inside an item marked `#[cfg(test)]` (a `mod tests`, a function).
    pub in_test: Vec<bool>,
    /// Whether the line starts directly inside an `impl Trait for Type` block, whose `unsafe fn`s
    /// take their contract from the trait.
    pub in_trait_impl: Vec<bool>,
}

enum State {
    Code,
    LineComment,
    BlockComment(usize),
    Str,
    RawStr(usize),
}

impl Source {
    pub fn parse(text: &str) -> Self {
        let (code, comments) = lex(text);
        let (in_test, in_trait_impl) = blocks(&code);
        Self { text: text.lines().map(str::to_string).collect(), code, comments, in_test, in_trait_impl }
    }

    /// Line `index` (0-based) as written, trimmed, for a message.
    pub fn show(&self, index: usize) -> String {
        self.text.get(index).map(|t| t.trim().to_string()).unwrap_or_default()
    }

    /// Whether the comments directly above line `index` (or on it) contain `marker`. Walks up
    /// through comment lines and attributes, and through lines of code that the statement on
    /// line `index` continues (ending in neither `;`, `{`, `}` nor `,`) as long as no comment has
    /// been passed yet; stops at a blank line or any other code.
    pub fn commented_above(&self, index: usize, marker: &str) -> bool {
        if self.comments[index].contains(marker) {
            return true;
        }
        let mut passed_comment = false;
        for j in (0..index).rev() {
            let (code, comment) = (self.code[j].trim(), self.comments[j].trim());
            if code.is_empty() {
                if comment.is_empty() {
                    return false;
                }
                if comment.contains(marker) {
                    return true;
                }
                passed_comment = true;
            } else if code.starts_with("#[") {
                continue;
            } else if !passed_comment && !code.ends_with([';', '{', '}', ',']) {
                if comment.contains(marker) {
                    return true;
                }
            } else {
                return false;
            }
        }
        false
    }

    /// Whether the doc comment of the item on line `index` (the comment lines above it, across
    /// its attributes) contains `marker`.
    pub fn documented(&self, index: usize, marker: &str) -> bool {
        for j in (0..index).rev() {
            let (code, comment) = (self.code[j].trim(), self.comments[j].trim());
            if code.is_empty() && !comment.is_empty() {
                if comment.contains(marker) {
                    return true;
                }
            } else if !code.starts_with("#[") {
                return false;
            }
        }
        false
    }
}

/// Splits `text` into per-line code (comments removed, literal contents blanked) and comments.
fn lex(text: &str) -> (Vec<String>, Vec<String>) {
    let chars: Vec<char> = text.chars().collect();
    let (mut code, mut comments) = (Vec::new(), Vec::new());
    let (mut line_code, mut line_comment) = (String::new(), String::new());
    let mut state = State::Code;
    let at = |i: usize, s: &str| s.chars().enumerate().all(|(k, c)| chars.get(i + k) == Some(&c));
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            if matches!(state, State::LineComment) {
                state = State::Code;
            }
            code.push(std::mem::take(&mut line_code));
            comments.push(std::mem::take(&mut line_comment));
            i += 1;
            continue;
        }
        match state {
            State::Code => {
                let after_ident = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
                let raw = if c == 'r' && !after_ident { raw_string_hashes(&chars[i + 1..]) } else { None };
                if at(i, "//") {
                    state = State::LineComment;
                    line_comment.push_str("//");
                    i += 2;
                } else if at(i, "/*") {
                    state = State::BlockComment(1);
                    i += 2;
                } else if c == '"' {
                    state = State::Str;
                    line_code.push('"');
                    i += 1;
                } else if let Some(hashes) = raw {
                    state = State::RawStr(hashes);
                    line_code.push('"');
                    i += 2 + hashes;
                } else if c == '\'' && chars.get(i + 1) == Some(&'\\') {
                    // An escaped char literal: up to the quote after the escape.
                    let close = (i + 3..chars.len()).find(|&j| chars[j] == '\'').unwrap_or(chars.len() - 1);
                    line_code.push_str("' '");
                    i = close + 1;
                } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
                    line_code.push_str("' '");
                    i += 3;
                } else {
                    // Code, or a lifetime's quote.
                    line_code.push(c);
                    i += 1;
                }
            }
            State::LineComment => {
                line_comment.push(c);
                i += 1;
            }
            State::BlockComment(depth) => {
                if at(i, "*/") {
                    state = if depth == 1 { State::Code } else { State::BlockComment(depth - 1) };
                    i += 2;
                } else if at(i, "/*") {
                    state = State::BlockComment(depth + 1);
                    i += 2;
                } else {
                    line_comment.push(c);
                    i += 1;
                }
            }
            State::Str => {
                if c == '\\' && chars.get(i + 1) != Some(&'\n') {
                    i += 2;
                } else {
                    if c == '"' {
                        state = State::Code;
                        line_code.push('"');
                    }
                    i += 1;
                }
            }
            State::RawStr(hashes) => {
                if c == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    state = State::Code;
                    line_code.push('"');
                    i += 1 + hashes;
                } else {
                    i += 1;
                }
            }
        }
    }
    code.push(line_code);
    comments.push(line_comment);
    (code, comments)
}

/// After an `r`: the number of `#`s of a raw string's opening (`r"`, `r#"`), if it is one.
fn raw_string_hashes(rest: &[char]) -> Option<usize> {
    let hashes = rest.iter().take_while(|&&c| c == '#').count();
    (rest.get(hashes) == Some(&'"')).then_some(hashes)
}

/// Per line, whether it starts inside a `#[cfg(test)]` item and directly inside an
/// `impl Trait for Type` block.
fn blocks(code: &[String]) -> (Vec<bool>, Vec<bool>) {
    // One entry per open brace: (a test-only item, an `impl Trait for Type`).
    let mut open: Vec<(bool, bool)> = Vec::new();
    let mut header = String::new();
    let mut cfg_test = false;
    let (mut in_test, mut in_trait_impl) = (Vec::new(), Vec::new());
    for line in code {
        in_test.push(open.iter().any(|b| b.0));
        in_trait_impl.push(open.last().is_some_and(|b| b.1));
        if line.trim_start().starts_with("#[cfg(test)]") {
            cfg_test = true;
        }
        for c in line.chars() {
            match c {
                '{' => {
                    open.push((cfg_test, is_trait_impl(&header)));
                    cfg_test = false;
                    header.clear();
                }
                '}' => {
                    open.pop();
                    header.clear();
                }
                ';' => {
                    cfg_test = false;
                    header.clear();
                }
                _ => header.push(c),
            }
        }
        header.push(' ');
    }
    (in_test, in_trait_impl)
}

/// Whether a block's header (what precedes its `{`, attributes included) opens
/// `impl Trait for Type`. (An inherent impl with a `for<'a>` bound would pass too.)
fn is_trait_impl(header: &str) -> bool {
    let item = without_attributes(header);
    let words: Vec<&str> = item.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect();
    matches!(words.as_slice(), ["impl", ..] | ["unsafe", "impl", ..]) && words.contains(&"for")
}

/// `text` without its attributes (`#[...]`, `#![...]`, brackets balanced).
fn without_attributes(text: &str) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if depth > 0 {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
        } else if c == '#' && matches!(chars.peek(), Some('[' | '!')) {
            if chars.next() == Some('!') {
                chars.next();
            }
            depth = 1;
        } else {
            out.push(c);
        }
    }
    out
}

/// The byte offsets in `line` where the word `word` stands alone (not part of a longer name).
pub fn word_at(line: &str, word: &str) -> Vec<usize> {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    line.match_indices(word)
        .filter(|&(at, _)| {
            let before = line[..at].chars().next_back();
            let after = line[at + word.len()..].chars().next();
            !before.is_some_and(ident) && !after.is_some_and(ident)
        })
        .map(|(at, _)| at)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_comments_are_not_code() {
        let s = Source::parse(
            "let a = \"unsafe { .unwrap() }\"; // unsafe {\nlet b = r#\"x\"#.len(); let c = '{'; let d = '\\'';\nfn f<'a>(x: &'a str) {}\n/* unsafe { /* nested */ } */ let e = 1;",
        );
        assert_eq!(s.code[0].trim(), "let a = \"\";");
        assert!(s.comments[0].contains("unsafe {"));
        assert_eq!(s.code[1].trim(), "let b = \"\".len(); let c = ' '; let d = ' ';");
        assert_eq!(s.code[2].trim(), "fn f<'a>(x: &'a str) {}");
        assert_eq!(s.code[3].trim(), "let e = 1;");
    }

    #[test]
    fn test_modules_and_trait_impls_are_found() {
        let s = Source::parse(
            "impl Foo for Bar {\n    fn f() {}\n}\nimpl Bar {\n    fn g() {}\n}\n#[cfg(test)]\nmod tests {\n    fn h() {\n        x();\n    }\n}\nfn i() {}\n#[cfg(x)]\nunsafe impl<T> Send for P<T> {\n    fn j() {}\n}",
        );
        assert!(s.in_trait_impl[1] && !s.in_trait_impl[4] && s.in_trait_impl[15]);
        assert!(s.in_test[8] && s.in_test[9] && !s.in_test[12] && !s.in_test[1] && !s.in_test[15]);
    }

    #[test]
    fn comments_above_a_statement_count() {
        let s = Source::parse("// SAFETY: fine.\nlet x =\n    unsafe { y() };\nfoo();\nunsafe { z() };");
        assert!(s.commented_above(2, "SAFETY:"));
        assert!(!s.commented_above(4, "SAFETY:"));
    }
}
