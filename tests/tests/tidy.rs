//! Architecture invariants that run: module docs, forbidden dependency edges, no should_panic.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    for top in ["worker", "tests", "coordinator", "registry", "proto", "cli"] {
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
