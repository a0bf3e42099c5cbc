//! Chat input rendered with the model's own chat template (`chat_template.jinja`,
//! `chat_template.json`, `tokenizer_config.json` or a GGUF file's `tokenizer.chat_template`).
//!
//! Templates are Jinja written for Python: they call string methods (`.strip()`), raise errors
//! through `raise_exception`, and read `bos_token`/`eos_token`. minijinja with its Python
//! compatibility callback runs them without any Python.

use std::path::Path;

use serde::Serialize;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("model has no chat template")]
    NoTemplate,
    #[error("invalid chat template: {0}")]
    Template(String),
    /// The template refused the conversation (e.g. roles out of order); the client's fault.
    #[error("chat template rejected the messages: {0}")]
    Rejected(String),
}

/// A model's chat template with the special tokens it refers to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// The chat template of the model at `path` (a directory or a GGUF file), found where
    /// transformers looks for it (`tessera_model_files::ModelFiles::chat_template`).
    pub fn from_model(path: &Path) -> Result<Self, ChatError> {
        let read = |e: tessera_model_files::FilesError| ChatError::Read { path: path.display().to_string(), reason: e.to_string() };
        let files = tessera_model_files::ModelFiles::locate(path).map_err(read)?;
        let t = files.chat_template().map_err(read)?.ok_or(ChatError::NoTemplate)?;
        Self::new(t.template, t.bos, t.eos)
    }

    pub fn new(template: String, bos: String, eos: String) -> Result<Self, ChatError> {
        let mut env = minijinja::Environment::new();
        // transformers compiles chat templates with both set; newlines after tags depend on them.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Template(e.to_string()))?;
        // Namespace assignments go through a copying filter, so no value can hold itself.
        let template = crate::template_guard::detach_assignments(&template, syntax.clone()).map_err(ChatError::Template)?;
        env.set_syntax(syntax);
        env.add_filter(crate::template_guard::DETACH, |value: minijinja::Value| crate::template_guard::detach(&value));
        // A template comes with the model files; a hostile or broken one must not spin or fill
        // memory: every render has an instruction budget, and its output a size (`render`).
        env.set_fuel(Some(TEMPLATE_FUEL));
        // A namespace can be made to hold itself (`{% set ns.x = ns %}`); printing it would
        // recurse until the stack overflows, which no error handling survives. Printed values
        // are walked first, with bounded depth and size.
        env.set_formatter(|out, state, value| {
            bounded(value)?;
            minijinja::escape_formatter(out, state, value)
        });
        // The filters that write a whole value out, likewise.
        env.add_filter("tojson", |value: &minijinja::Value, indent: Option<minijinja::Value>, args: minijinja::value::Kwargs| {
            bounded(value)?;
            minijinja::filters::tojson(value, indent, args)
        });
        env.add_filter("string", |state: &minijinja::State, value: &minijinja::Value| {
            bounded(value)?;
            minijinja::filters::string(state, value)
        });
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, template).map_err(|e| ChatError::Template(e.to_string()))?;
        Ok(Self { env, bos, eos })
    }

    /// Renders a one-message conversation, so a template that fails on any input (a bad
    /// filter, an exception it always raises) is found when the model is loaded, not by the
    /// first client.
    pub fn check(&self) -> Result<(), ChatError> {
        let hello = [ChatMessage { role: "user".into(), content: "Hello".into() }];
        self.render(&hello, true).map(|_| ())
    }

    /// Renders `messages`, ending with the assistant's turn opened when `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatError> {
        let template = self.env.get_template(NAME).map_err(|e| ChatError::Template(e.to_string()))?;
        let mut out = CappedOutput { text: Vec::new(), limit: MAX_RENDERED_BYTES };
        crate::template_guard::start_render();
        let rendered = template
            .render_captured_to(
                minijinja::context! {
                    messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos.clone(),
                    eos_token => self.eos.clone(),
                },
                &mut out,
            )
            .map(drop);
        rendered.map_err(|e| match e.kind() {
            minijinja::ErrorKind::WriteFailure if out.text.len() >= out.limit => {
                ChatError::Template(format!("the chat template rendered more than {} bytes", out.limit))
            }
            minijinja::ErrorKind::OutOfFuel => ChatError::Template(format!("the chat template ran more than {TEMPLATE_FUEL} instructions")),
            minijinja::ErrorKind::InvalidOperation => ChatError::Rejected(e.to_string()),
            _ => ChatError::Template(e.to_string()),
        })?;
        String::from_utf8(out.text).map_err(|_| ChatError::Template("the chat template rendered bytes that are not UTF-8".into()))
    }
}

/// Deepest nesting of a value a template may print (the conversation itself is three deep).
const MAX_PRINTED_DEPTH: usize = 32;
/// Most items a printed value may hold, nested ones included.
const MAX_PRINTED_NODES: usize = 100_000;

/// Refuses to write out a value nested too deep, too large, or holding itself.
fn bounded(value: &minijinja::Value) -> Result<(), minijinja::Error> {
    let mut budget = MAX_PRINTED_NODES;
    if printable(value, 0, &mut budget) {
        Ok(())
    } else {
        Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("the chat template writes out a value nested deeper than {MAX_PRINTED_DEPTH} levels, larger than {MAX_PRINTED_NODES} items, or holding itself"),
        ))
    }
}

/// Whether `value` is nested at most [`MAX_PRINTED_DEPTH`] deep and holds at most `budget`
/// items: a value that holds itself is neither.
fn printable(value: &minijinja::Value, depth: usize, budget: &mut usize) -> bool {
    use minijinja::value::ValueKind;
    if !matches!(value.kind(), ValueKind::Seq | ValueKind::Map | ValueKind::Iterable | ValueKind::Plain) {
        return true;
    }
    if depth >= MAX_PRINTED_DEPTH {
        return false;
    }
    let Ok(items) = value.try_iter() else { return true };
    for item in items {
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        let inner = if value.kind() == ValueKind::Map { value.get_item(&item).unwrap_or_default() } else { item };
        if !printable(&inner, depth + 1, budget) {
            return false;
        }
    }
    true
}

/// Instructions one render may run: a chat of the most messages a request may send takes
/// well under a hundredth of it with the templates models ship.
const TEMPLATE_FUEL: u64 = 10_000_000;
/// Largest rendered conversation: far above what the prompt limits let through, far below
/// what would hurt the coordinator.
const MAX_RENDERED_BYTES: usize = 64 << 20;

/// A render's output, refusing to grow past `limit`.
struct CappedOutput {
    text: Vec<u8>,
    limit: usize,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + bytes.len() > self.limit {
            self.text.resize(self.limit, 0);
            return Err(std::io::Error::new(std::io::ErrorKind::OutOfMemory, "rendered text over its limit"));
        }
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str) -> Result<String, ChatError> {
        let hello = [ChatMessage { role: "user".into(), content: "Hello".into() }];
        ChatTemplate::new(template.into(), "<s>".into(), "</s>".into())?.render(&hello, true)
    }

    /// Found by the fuzz test (seed 2): a namespace made to hold itself, then printed, used to
    /// recurse until the stack overflowed and took the process down. A namespace now stores a
    /// copy of what is assigned to it (`template_guard.rs`), so it never holds itself.
    #[test]
    fn a_namespace_assigned_itself_holds_a_snapshot_not_a_cycle() {
        let cyclic = "{% set n = namespace(i=0) %}{% set n.i = n %}{{ n.i.i }}";
        assert_eq!(render(cyclic).expect("a snapshot prints"), "0");
        for filter in ["tojson", "string"] {
            let cyclic = format!("{{% set n = namespace(i=0) %}}{{% set n.i = n %}}{{{{ n | {filter} }}}}");
            assert!(render(&cyclic).expect(filter).contains('0'), "{filter} of a snapshot");
        }
        let deep = "{% set n = namespace(i=0) %}{% for _ in range(40) %}{% set n.i = [n.i] %}{% endfor %}{{ n.i }}";
        assert!(render(deep).is_err(), "40 levels are more than a namespace may hold");
        let shallow = "{% set n = namespace(i=0) %}{% for _ in range(3) %}{% set n.i = [n.i] %}{% endfor %}{{ n.i }}";
        assert_eq!(render(shallow).expect("3 levels print"), "[[[0]]]");
        // Printing keeps its own depth limit for values built without namespaces.
        let literal = format!("{{{{ {}0{} }}}}", "[".repeat(40), "]".repeat(40));
        assert!(render(&literal).expect_err("too deep to print").to_string().contains("nested deeper"));
        // Unchanged for a value that may be written: as Python's json.dumps writes it.
        assert_eq!(render("{{ messages | tojson }}").expect("tojson"), r#"[{"role": "user", "content": "Hello"}]"#);
    }

    #[test]
    fn an_ordinary_template_renders() {
        let text = render(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
        );
        assert_eq!(text.expect("renders"), "<|user|>Hello<|assistant|>");
    }

    #[test]
    fn a_template_that_loops_for_ever_runs_out_of_fuel() {
        let spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        match render(spin) {
            Err(ChatError::Template(m)) => assert!(m.contains("instructions"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_template_that_floods_its_output_is_cut_off() {
        let flood = "{% for i in range(1000) %}{{ 'x' * 1000000 }}{% endfor %}";
        match render(flood) {
            Err(ChatError::Template(m)) => assert!(m.contains("bytes"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    /// A namespace made to reach itself, then concatenated (`~`) or compared (`==`), used to
    /// recurse until the stack overflowed: neither printing's guard nor fuel saw it.
    #[test]
    fn values_that_would_hold_themselves_are_snapshots_so_concat_and_compare_end() {
        let cases = [
            "{% set ns = namespace(a=1) %}{% set ns.a = ns %}{{ (ns ~ '') | length > 0 }}",
            "{% set ns = namespace(a=1) %}{% set ns.a = ns %}{% set m = namespace(a=1) %}{% set m.a = m %}{{ ns == m }}",
            "{% set ns = namespace(a=[1]) %}{% set ns.b = [ns, ns] %}{{ ([ns.b] ~ '') | length > 0 }}{{ ns.b == ns.b }}",
            "{% set a = namespace(x=0) %}{% set b = namespace(y=a) %}{% set a.x = b %}{{ a == b }}{{ (a ~ b) | length > 0 }}",
        ];
        for template in cases {
            let text = render(template).unwrap_or_else(|e| panic!("{template}: {e}"));
            let text = text.to_lowercase();
            assert!(text.contains("true") || text.contains("false"), "{template} -> {text}");
        }
    }

    #[test]
    fn namespace_values_stay_shallow_and_copying_is_bounded() {
        let deep = "{% set ns = namespace(l=[]) %}{% for i in range(100) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l ~ '' }}";
        assert!(render(deep).expect_err("too deep").to_string().contains("nested deeper"));
        let copies = "{% set ns = namespace(l=range(5000) | list) %}{% for i in range(1000) %}{% set ns.l = ns.l %}{% endfor %}";
        assert!(render(copies).expect_err("too many copies").to_string().contains("copies more than"));
        // What real templates do still works: flags, counters, growing lists of messages.
        let real = "{% set ns = namespace(n=0, seen=[], first=true) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}\
                    {% set ns.seen = ns.seen + [m] %}{% set ns.first = false %}{% endfor %}{{ ns.n }} {{ ns.seen[0].role }} {{ ns.first }} {{ false }}";
        let text = render(real).expect("renders");
        assert!(text.starts_with("1 user ") && text.split(' ').nth(2) == text.split(' ').nth(3), "{text}");
    }
}
