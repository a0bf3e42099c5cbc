//! Architecture invariants that run: module docs, forbidden dependency edges, no should_panic.

use std::collections::{BTreeMap, BTreeSet};
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

/// Normal (non-dev) dependencies of each workspace package, transitively.
fn dependency_closure() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(workspace_root())
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let name_of: BTreeMap<String, String> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().unwrap().to_string(), p["name"].as_str().unwrap().to_string()))
        .collect();
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve nodes") {
        let id = node["id"].as_str().unwrap().to_string();
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null()))
            .map(|d| d["pkg"].as_str().unwrap().to_string())
            .collect();
        edges.insert(id, deps);
    }
    let members: Vec<String> = meta["workspace_members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
    let mut closure = BTreeMap::new();
    for m in members {
        let mut seen = BTreeSet::new();
        let mut stack = vec![m.clone()];
        while let Some(id) = stack.pop() {
            for d in edges.get(&id).into_iter().flatten() {
                if seen.insert(name_of[d].clone()) {
                    stack.push(d.clone());
                }
            }
        }
        closure.insert(name_of[&m].clone(), seen);
    }
    closure
}

#[test]
fn forbidden_dependency_edges_are_absent() {
    let closure = dependency_closure();
    // DESIGN: the model has no networking or async; collectives know no RPC, etcd or model code.
    let rules: &[(&str, &[&str])] = &[
        ("tessera-model", &["tokio", "tonic", "prost", "etcd-client"]),
        ("tessera-collective", &["tokio", "tonic", "prost", "etcd-client", "tessera-model"]),
    ];
    let mut checked = 0;
    for (krate, forbidden) in rules {
        let deps = closure.get(*krate).unwrap_or_else(|| panic!("{krate} is not a workspace member"));
        assert!(deps.contains("candle-core"), "{krate}: dependency walk found no candle-core");
        for f in *forbidden {
            assert!(!deps.contains(*f), "{krate} must not depend on {f}");
        }
        checked += 1;
    }
    assert_eq!(checked, rules.len());
}
