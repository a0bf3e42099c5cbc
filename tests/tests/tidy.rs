//! Architecture invariants that run: module docs, forbidden dependency edges, no should_panic,
//! unsafe code that states why it is sound, no `unwrap`/`expect` in library code.

#[path = "tidy/source.rs"]
mod source;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use source::{word_at, Source};

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn all_rust_files() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut files = Vec::new();
    for top in ["worker", "tests", "coordinator", "registry", "proto", "cli", "model-files"] {
        let dir = root.join(top);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        }
    }
    assert!(files.len() > 20, "tidy found only {} Rust files; is the walk broken?", files.len());
    files
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    let missing: Vec<_> = all_rust_files()
        .into_iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).expect("read source");
            !text.trim_start().starts_with("//!")
        })
        .collect();
    assert!(missing.is_empty(), "modules without a leading //! doc comment: {missing:#?}");
}

#[test]
fn no_should_panic_tests() {
    let marker = ["should", "_panic"].concat();
    let offenders: Vec<_> = all_rust_files()
        .into_iter()
        .filter(|p| std::fs::read_to_string(p).expect("read source").contains(&format!("#[{marker}")))
        .collect();
    assert!(offenders.is_empty(), "tests must assert errors, not panics: {offenders:#?}");
}

/// Every package `krate` depends on through normal (non-dev, non-build) edges: transitively,
/// or only directly with `direct_only`.
fn normal_dependencies(krate: &str, direct_only: bool) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec!["tree", "-p", krate, "-e", "normal", "--prefix", "none", "--format", "{p}"];
    if direct_only {
        args.extend(["--depth", "1"]);
    }
    let out = Command::new(cargo).args(&args).current_dir(workspace_root()).output().expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != krate)
        .map(str::to_string)
        .collect()
}

#[test]
fn forbidden_dependency_edges_are_absent() {
    // (crate, a dependency it must have — proof the walk saw its tree —, forbidden dependencies)
    // DESIGN: the model has no networking or async; collectives know no RPC, etcd or model code;
    // only the registry knows etcd and it knows no tensors; the coordinator never touches tensors;
    // the worker makes no scheduling decisions. The coordinator reaches etcd only through the
    // registry's trait, so etcd-client may sit below it but never be its direct dependency.
    let rules: &[(&str, &str, &[&str])] = &[
        ("tessera-model", "candle-core", &["tokio", "tonic", "prost", "etcd-client"]),
        ("tessera-collective", "candle-core", &["tokio", "tonic", "prost", "etcd-client", "tessera-model"]),
        ("tessera-registry", "etcd-client", &["candle-core", "tessera-model", "tessera-proto"]),
        ("tessera-coordinator", "tokenizers", &["candle-core", "tessera-model", "tessera-worker"]),
        // What a model path holds is read by the coordinator too: headers and small files only.
        ("tessera-model-files", "tokenizers", &["candle-core", "tokio", "tonic", "tessera-model"]),
        ("tessera-worker", "tessera-model", &["tessera-coordinator", "tessera-registry", "etcd-client"]),
        ("tessera-proto", "tonic", &["candle-core", "etcd-client", "tessera-model"]),
        // TLS is plumbing under the servers: rustls and tokio, no RPC, tensors or etcd.
        ("tessera-tls", "rustls", &["tonic", "candle-core", "etcd-client", "tessera-model"]),
    ];
    let mut checked = 0;
    for (krate, required, forbidden) in rules {
        let deps = normal_dependencies(krate, false);
        assert!(deps.contains(*required), "{krate}: dependency walk did not find {required}");
        for f in *forbidden {
            assert!(!deps.contains(*f), "{krate} must not depend on {f}");
        }
        checked += 1;
    }
    assert_eq!(checked, rules.len());

    let direct = normal_dependencies("tessera-coordinator", true);
    assert!(direct.contains("tessera-registry"), "tessera-coordinator: direct walk did not find tessera-registry");
    assert!(!direct.contains("etcd-client"), "tessera-coordinator must use etcd only through tessera-registry");
}

/// A workspace package's targets, from `cargo metadata`.
struct Package {
    name: String,
    /// (kinds, root source file) of each target: `lib`, `bin`, `test`, `bench`, ...
    targets: Vec<(Vec<String>, PathBuf)>,
}

fn packages() -> Vec<Package> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(workspace_root())
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
    };
    let packages: Vec<Package> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| Package {
            name: p["name"].as_str().expect("package name").to_string(),
            targets: p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .map(|t| (strings(&t["kind"]), PathBuf::from(t["src_path"].as_str().expect("src_path"))))
                .collect(),
        })
        .collect();
    assert!(packages.len() >= 8, "cargo metadata listed only {} packages", packages.len());
    packages
}

/// The files a target's crate is built from. A root `src/lib.rs` or `src/main.rs` takes its
/// `src/` tree except the roots of the package's other targets there (`src/bin/`, the other of
/// `lib.rs` and `main.rs`); any other root (`src/bin/x.rs`, `benches/x.rs`, `tests/x.rs`,
/// `tests/x/main.rs`) takes itself and the folder of its modules (`x/`, or its own folder).
fn crate_files(root: &Path) -> Vec<PathBuf> {
    let dir = root.parent().expect("a target root has a folder");
    let name = root.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut files = Vec::new();
    if dir.file_name().is_some_and(|d| d == "src") && (name == "lib.rs" || name == "main.rs") {
        rust_files(dir, &mut files);
        let other = dir.join(if name == "lib.rs" { "main.rs" } else { "lib.rs" });
        files.retain(|f| !f.starts_with(dir.join("bin")) && *f != other);
    } else if name == "main.rs" {
        rust_files(dir, &mut files);
    } else {
        files.push(root.to_path_buf());
        let modules = root.with_extension("");
        if modules.is_dir() {
            rust_files(&modules, &mut files);
        }
    }
    files
}

fn source(path: &Path) -> Source {
    Source::parse(&std::fs::read_to_string(path).expect("read source"))
}

fn relative(path: &Path) -> String {
    path.strip_prefix(workspace_root()).unwrap_or(path).display().to_string()
}

/// Every `unsafe fn` documents its contract in a `# Safety` section (one in an `impl Trait for
/// Type` block has the trait's), and every `unsafe { .. }` block and `unsafe impl` is preceded
/// by a `// SAFETY:` comment saying why it holds (on the comment lines above its statement).
#[test]
fn unsafe_code_says_why_it_is_sound() {
    let mut violations = Vec::new();
    let mut seen = 0;
    for path in all_rust_files() {
        let src = source(&path);
        for (i, line) in src.code.iter().enumerate() {
            for at in word_at(line, "unsafe") {
                seen += 1;
                let rest = line[at + "unsafe".len()..].trim_start();
                let item = rest.strip_prefix("extern").map_or(rest, |r| r.trim_start().trim_start_matches("\"\"").trim_start());
                let what = if rest.starts_with('{') || word_at(rest, "impl").first() == Some(&0) {
                    (!src.commented_above(i, "SAFETY:")).then_some("an unsafe block or impl without a `// SAFETY:` comment")
                } else if item.strip_prefix("fn").is_some_and(|f| f.starts_with(|c: char| c.is_whitespace())) {
                    (!src.in_trait_impl[i] && !src.documented(i, "# Safety")).then_some("an unsafe fn without a `# Safety` doc section")
                } else {
                    None
                };
                if let Some(what) = what {
                    violations.push(format!("{}:{}: {what}: {}", relative(&path), i + 1, src.show(i)));
                }
            }
        }
    }
    assert!(seen > 50, "tidy saw only {seen} uses of unsafe; is the scan broken?");
    assert!(violations.is_empty(), "unsafe code must say why it is sound:\n{}", violations.join("\n"));
}

/// Files of `paths` that are modules declared under `#[cfg(test)]` (`#[cfg(test)] mod tests;`
/// puts `tests.rs` beside a `mod.rs` or `lib.rs`, or in the folder named after its parent file),
/// and the files below them.
fn out_of_line_test_modules(paths: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut test_only = BTreeSet::new();
    for path in paths {
        let src = source(path);
        for (i, line) in src.code.iter().enumerate() {
            let Some(name) = line.trim().strip_prefix("mod ").and_then(|m| m.strip_suffix(';')) else { continue };
            let gated = (0..i).rev().map(|j| src.code[j].trim()).find(|l| !l.is_empty()).is_some_and(|l| l == "#[cfg(test)]");
            if !gated {
                continue;
            }
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let dir = path.parent().unwrap_or(Path::new(""));
            let dir = if stem == "mod" || stem == "lib" || stem == "main" { dir.to_path_buf() } else { dir.join(stem) };
            for candidate in [dir.join(format!("{name}.rs")), dir.join(name)] {
                test_only.extend(paths.iter().filter(|p| p.starts_with(&candidate)).cloned());
            }
        }
    }
    test_only
}

/// Crates that exist for tests only: their library code may unwrap.
const TEST_SUPPORT: &[&str] = &["tessera-tests", "tessera-etcd-harness"];

/// Library code returns its errors: no `.unwrap()` or `.expect(` outside `#[cfg(test)]` items,
/// in the library target of every package but the test-support ones. Binaries, tests and
/// benches may.
#[test]
fn library_code_does_not_unwrap() {
    let mut violations = Vec::new();
    let mut files = 0;
    for package in packages().iter().filter(|p| !TEST_SUPPORT.contains(&p.name.as_str())) {
        for (_, root) in package.targets.iter().filter(|(kinds, _)| kinds.iter().any(|k| k == "lib")) {
            let paths = crate_files(root);
            let test_only = out_of_line_test_modules(&paths);
            for path in paths.into_iter().filter(|p| !test_only.contains(p)) {
                files += 1;
                let src = source(&path);
                for (i, line) in src.code.iter().enumerate() {
                    if !src.in_test[i] && (line.contains(".unwrap()") || line.contains(".expect(")) {
                        violations.push(format!("{}:{}: {}", relative(&path), i + 1, src.show(i)));
                    }
                }
            }
        }
    }
    assert!(files > 50, "tidy read only {files} library files; is the walk broken?");
    assert!(violations.is_empty(), "library code must return errors, not unwrap or expect:\n{}", violations.join("\n"));
}

/// A crate with unsafe code denies `unsafe_op_in_unsafe_fn` at its root, so the body of an
/// `unsafe fn` is not one implicit unsafe block: each unsafe operation in it sits in its own
/// `unsafe { .. }` with its own `// SAFETY:` comment.
#[test]
fn crates_with_unsafe_code_deny_unsafe_ops_in_unsafe_fns() {
    let attribute = "#![deny(unsafe_op_in_unsafe_fn)]";
    let mut missing = Vec::new();
    let mut with_unsafe = BTreeSet::new();
    for package in packages() {
        for (_, root) in &package.targets {
            let uses_unsafe = crate_files(root).iter().any(|f| source(f).code.iter().any(|l| !word_at(l, "unsafe").is_empty()));
            if !uses_unsafe {
                continue;
            }
            with_unsafe.insert(package.name.clone());
            let denies = source(root).code.iter().any(|l| l.split_whitespace().collect::<String>() == attribute);
            if !denies {
                missing.push(relative(root));
            }
        }
    }
    for expected in ["tessera-model", "tessera-collective"] {
        assert!(with_unsafe.contains(expected), "tidy found no unsafe code in {expected}; is the scan broken?");
    }
    assert!(missing.is_empty(), "crate roots with unsafe code and without `{attribute}`: {missing:#?}");
}

/// Each gRPC server maps its errors to status codes in one place: the coordinator's
/// `CoordinatorError` and the worker's `WorkerError`, each converted by a single `From` impl in
/// its crate's `error.rs`. A second conversion elsewhere would let the same error reach clients
/// with two different codes.
#[test]
fn each_server_maps_errors_to_grpc_codes_in_one_place() {
    let mut conversions = Vec::new();
    for path in all_rust_files() {
        let src = source(&path);
        for (i, line) in src.code.iter().enumerate() {
            let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
            if line.starts_with("impl From<") && (line.contains("> for Status") || line.contains("> for tonic::Status")) {
                conversions.push(format!("{}:{}", relative(&path), i + 1));
            }
        }
    }
    conversions.sort();
    let files: Vec<&str> = conversions.iter().filter_map(|c| c.split(':').next()).collect();
    assert_eq!(files, ["coordinator/src/error.rs", "worker/src/error.rs"], "error → gRPC status conversions: {conversions:?}");
}

/// The test command runs the lint gates before any test, so a formatting change or a clippy
/// warning fails it (and `.ci/run`, which calls it) even when every test would pass.
#[test]
fn the_test_command_runs_the_lint_gates_first() {
    let script = std::fs::read_to_string(workspace_root().join("scripts/test.sh")).expect("read scripts/test.sh");
    let ci = std::fs::read_to_string(workspace_root().join(".ci/run")).expect("read .ci/run");
    assert!(ci.lines().any(|l| !l.trim_start().starts_with('#') && l.contains("scripts/test.sh")), ".ci/run must call scripts/test.sh");
    let position = |needle: &str| script.lines().position(|l| l.trim_start().starts_with(needle));
    let fmt = position("cargo fmt --all -- --check").expect("scripts/test.sh checks formatting");
    let clippy =
        position("cargo clippy --workspace --all-targets --locked -- -D warnings").expect("scripts/test.sh runs clippy with -D warnings");
    let tests = position("cargo test --workspace").expect("scripts/test.sh runs the tests");
    assert!(fmt < tests && clippy < tests, "the lint gates must run before the tests");
    assert!(script.lines().any(|l| l.trim() == "set -euo pipefail"), "a failing gate must stop the script");
}
