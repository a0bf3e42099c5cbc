//! Chat templates come with the model files, and a hostile one must not crash the coordinator.
//!
//! minijinja's values are immutable except namespaces (`{% set ns.attr = value %}`), so the
//! only way a template can build a value that holds itself — which printing, `~` or `==` walk
//! until the stack overflows, taking the process down — is to store in a namespace a value that
//! reaches that namespace. [`detach_assignments`] rewrites every such assignment so the stored
//! value first passes through the [`DETACH`] filter, which copies it into fresh plain lists and
//! maps, at most [`MAX_DEPTH`] deep: a namespace then holds snapshots, never a namespace, so no
//! value can reach itself and none is deeper than the limit. Each render may copy at most
//! [`RENDER_NODES`] items this way, so a loop of copies cannot spin where fuel does not count.

use std::cell::Cell;

use minijinja::machinery::{tokenize, Token};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// Name of the filter that assignments to namespace attributes go through.
pub const DETACH: &str = "__tessera_detach";
/// Deepest value a namespace attribute may hold (a conversation is three deep).
pub const MAX_DEPTH: usize = 32;
/// Items one render may copy into namespaces, all assignments together.
pub const RENDER_NODES: usize = 1_000_000;

thread_local! {
    /// What is left of this thread's current render's copying budget; a render runs on one
    /// thread from start to end.
    static BUDGET: Cell<usize> = const { Cell::new(RENDER_NODES) };
}

/// Resets the copying budget for a render starting on this thread.
pub fn start_render() {
    BUDGET.with(|b| b.set(RENDER_NODES));
}

/// `source` with the right-hand side of every `{% set NS.ATTR = EXPR %}` wrapped as
/// `(EXPR) | __tessera_detach`. Refuses a template that assigns to an attribute in any other
/// form (inside a tuple target): no chat template does, and it would escape the rewrite.
pub fn detach_assignments(source: &str, syntax: SyntaxConfig) -> Result<String, String> {
    let tokens: Vec<(Token<'_>, minijinja::machinery::Span)> =
        tokenize(source, false, syntax).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    // (start, end) byte offsets of each right-hand side to wrap.
    let mut wraps = Vec::new();
    let mut i = 0;
    while i + 1 < tokens.len() {
        if !(matches!(tokens[i].0, Token::BlockStart) && matches!(tokens[i + 1].0, Token::Ident("set"))) {
            i += 1;
            continue;
        }
        let target_start = i + 2;
        let mut j = target_start;
        while j < tokens.len() && !matches!(tokens[j].0, Token::Assign | Token::BlockEnd | Token::Pipe) {
            j += 1;
        }
        let target = &tokens[target_start..j];
        let dotted = target.iter().any(|(t, _)| matches!(t, Token::Dot | Token::BracketOpen));
        let assigns = j < tokens.len() && matches!(tokens[j].0, Token::Assign);
        if dotted && assigns {
            let simple = matches!(target, [(Token::Ident(_), _), (Token::Dot, _), (Token::Ident(_), _)]);
            if !simple {
                let at = target[0].1.start_line;
                return Err(format!("line {at}: a namespace attribute may only be assigned as `{{% set ns.attr = ... %}}`"));
            }
            let first = j + 1;
            let mut end = first;
            while end < tokens.len() && !matches!(tokens[end].0, Token::BlockEnd) {
                end += 1;
            }
            if end > first {
                wraps.push((tokens[first].1.start_offset as usize, tokens[end - 1].1.end_offset as usize));
            }
            i = end;
        } else {
            i = j;
        }
    }
    let mut out = String::with_capacity(source.len() + wraps.len() * (DETACH.len() + 6));
    let mut copied = 0;
    for (start, end) in wraps {
        out.push_str(&source[copied..start]);
        out.push('(');
        out.push_str(&source[start..end]);
        out.push_str(") | ");
        out.push_str(DETACH);
        copied = end;
    }
    out.push_str(&source[copied..]);
    Ok(out)
}

/// The [`DETACH`] filter: `value` copied into fresh plain lists and maps (strings and numbers
/// are shared, they cannot hold anything), or an error when it is deeper than [`MAX_DEPTH`]
/// or this render's copying budget runs out.
pub fn detach(value: &Value) -> Result<Value, Error> {
    copy(value, 0)
}

fn copy(value: &Value, depth: usize) -> Result<Value, Error> {
    let kind = value.kind();
    if !matches!(kind, ValueKind::Seq | ValueKind::Map | ValueKind::Iterable) {
        return Ok(value.clone());
    }
    if depth >= MAX_DEPTH {
        return Err(refusal(format!("the chat template stores a value nested deeper than {MAX_DEPTH} levels in a namespace")));
    }
    let items = value.try_iter()?;
    if kind == ValueKind::Map {
        let mut map = std::collections::BTreeMap::new();
        for key in items {
            charge()?;
            let item = value.get_item(&key)?;
            map.insert(key, copy(&item, depth + 1)?);
        }
        Ok(Value::from(map))
    } else {
        let mut seq = Vec::new();
        for item in items {
            charge()?;
            seq.push(copy(&item, depth + 1)?);
        }
        Ok(Value::from(seq))
    }
}

fn charge() -> Result<(), Error> {
    BUDGET.with(|b| match b.get() {
        0 => Err(refusal(format!("the chat template copies more than {RENDER_NODES} items into namespaces"))),
        n => {
            b.set(n - 1);
            Ok(())
        }
    })
}

fn refusal(message: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(source: &str) -> Result<String, String> {
        detach_assignments(source, SyntaxConfig::default())
    }

    #[test]
    fn attribute_assignments_are_wrapped_and_nothing_else_changes() {
        let source = "{% set ns = namespace(a=1) %}{%- set ns.a = ns.a + [x], 2 -%}{% set y = ns %}{% set ns.b %}z{% endset %}";
        assert_eq!(
            rewrite(source).expect("rewrites"),
            "{% set ns = namespace(a=1) %}{%- set ns.a = (ns.a + [x], 2) | __tessera_detach -%}{% set y = ns %}{% set ns.b %}z{% endset %}"
        );
        let strings = "{% set ns.a = '%}' ~ \"{% set ns.b = ns %}\" %}";
        assert_eq!(rewrite(strings).expect("rewrites"), "{% set ns.a = ('%}' ~ \"{% set ns.b = ns %}\") | __tessera_detach %}");
        assert_eq!(rewrite("no statements {{ x }}").expect("plain"), "no statements {{ x }}");
    }

    #[test]
    fn attribute_assignments_in_other_forms_are_refused() {
        for source in ["{% set ns.a, b = ns, 1 %}", "{% set (b, ns.a) = (1, ns) %}", "{% set ns['a'] = ns %}"] {
            assert!(rewrite(source).is_err(), "{source}");
        }
    }
}
