//! The code's structure, checked: no import cycle between the modules of any crate, no
//! source file over 700 lines (tests aside) without a stated reason, and docs/ARCHITECTURE.md
//! naming every crate and every module it maps.
//!
//! The module graph is read from the source text: an edge `a → b` for every `crate::b`
//! path (in `use` trees too) written in module `a` of the same crate, where `a` and `b` are
//! top-level modules (`src/a.rs` or `src/a/…`); a name the crate root re-exports counts as the
//! module it comes from. Inside a folder module (`src/round/…`), sibling files are checked the
//! same way through `super::sibling` paths. A child using its parent is containment, not a
//! cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a source file may be (lines before its test module) without a
/// `//! Length:` line in its module doc saying why.
const MAX_LINES: usize = 700;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every crate's source directory: the workspace members and the root package.
fn crates() -> Vec<(String, PathBuf)> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("a workspace members list");
    let mut out = vec![("cohort".to_string(), root().join("src"))];
    for m in members.split('"').skip(1).step_by(2) {
        out.push((m.to_string(), root().join(m).join("src")));
    }
    out
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Source text without comments and string literals (so a path in a doc comment or a
/// message is not an import).
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i + 1 < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i..].starts_with(b"r#\"") {
            i += 3;
            while i + 1 < b.len() && !b[i..].starts_with(b"\"#") {
                i += 1;
            }
            i += 2;
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal ('x', '\n'); lifetimes ('a) are left alone.
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The names a path prefix (`crate::` or `super::`) reaches: `p::a`, and each `a` of
/// `p::{a, b::c, d as e}` at the top level of the group.
fn names_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(k) = rest.find(prefix) {
        let before = rest[..k].chars().next_back();
        rest = &rest[k + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            let mut at_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_start = true,
                    c if at_start && (c.is_alphanumeric() || c == '_') => item.push(c),
                    _ => {
                        if !item.is_empty() {
                            out.push(std::mem::take(&mut item));
                        }
                        if !c.is_whitespace() {
                            at_start = false;
                        }
                    }
                }
            }
            if !item.is_empty() {
                out.push(item);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

/// `pub use module::{A, B}` and `pub use module::A` in a crate root: item name → module.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stmt in code_of(lib).split(';') {
        let Some(path) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = path.split_once("::") else {
            continue;
        };
        for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
            let name = item
                .rsplit("::")
                .next()
                .unwrap()
                .split(" as ")
                .last()
                .unwrap()
                .trim();
            if !name.is_empty() && name != "*" {
                out.insert(name.to_string(), module.trim().to_string());
            }
        }
    }
    out
}

/// A cycle in `graph`, if any, as the modules along it.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()) {
                Some(1) => {
                    let at = path.iter().position(|p| p == m).unwrap();
                    let mut c = path[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, g, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if !state.contains_key(n.as_str())
            && let Some(c) = visit(n, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// The module graphs of one crate: its top level, and the children of each folder module.
fn graphs(src: &Path) -> Vec<(String, BTreeMap<String, BTreeSet<String>>)> {
    let mut files = Vec::new();
    rs_files(src, &mut files);
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap_or_default();
    let renamed = reexports(&lib);
    let module_of = |p: &Path| -> Vec<String> {
        let rel = p.strip_prefix(src).unwrap();
        let mut parts: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if parts.last().is_some_and(|l| l == "mod") {
            parts.pop();
        }
        parts
    };
    let top: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(f))
        .filter(|m| !m.is_empty() && m[0] != "lib" && m[0] != "main")
        .map(|m| m[0].clone())
        .collect();
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in &files {
        let m = module_of(f);
        let Some(first) = m.first().filter(|t| top.contains(*t)) else {
            continue;
        };
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        let g = out.entry(String::new()).or_default();
        g.entry(first.clone()).or_default();
        for name in names_after(&code, "crate::") {
            let target = if top.contains(&name) {
                Some(name)
            } else {
                renamed.get(&name).cloned()
            };
            if let Some(t) = target.filter(|t| t != first) {
                g.get_mut(first).unwrap().insert(t);
            }
        }
        // Siblings inside a folder module: `super::sibling` from `parent/child.rs`.
        if m.len() >= 2 {
            let parent = m[..m.len() - 1].join("/");
            let me = m.last().unwrap().clone();
            let folder = src.join(&parent);
            let siblings: BTreeSet<String> = std::fs::read_dir(&folder)
                .map(|d| {
                    d.filter_map(|e| {
                        let p = e.ok()?.path();
                        Some(p.file_stem()?.to_string_lossy().to_string())
                    })
                    .collect()
                })
                .unwrap_or_default();
            let g = out.entry(parent).or_default();
            g.entry(me.clone()).or_default();
            for name in names_after(&code, "super::") {
                if siblings.contains(&name) && name != me {
                    g.get_mut(&me).unwrap().insert(name);
                }
            }
        }
    }
    out.into_iter().collect()
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let mut cycles = Vec::new();
    let mut modules = 0;
    for (krate, src) in crates() {
        for (scope, g) in graphs(&src) {
            modules += g.len();
            if let Some(c) = cycle(&g) {
                cycles.push(format!("{krate} {scope}: {}", c.join(" → ")));
            }
        }
    }
    assert!(
        modules > 40,
        "only {modules} modules found: is the parser broken?"
    );
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_finder_finds_cycles() {
    // The checker itself: a two-module cycle read from source text is found.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\npub use b::Thing;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::{Thing, c as _};\n").unwrap();
    std::fs::write(
        src.join("b.rs"),
        "// crate::c in a comment\nfn f() { crate::a::g(\"crate::b\") }\n",
    )
    .unwrap();
    let g = &graphs(src)[0].1;
    assert_eq!(g["a"], BTreeSet::from(["b".to_string()]));
    assert_eq!(g["b"], BTreeSet::from(["a".to_string()]));
    assert!(cycle(g).is_some());
    std::fs::write(src.join("b.rs"), "fn f() {}\n").unwrap();
    assert!(cycle(&graphs(src)[0].1).is_none());
}

#[test]
fn long_files_say_why() {
    let mut long = Vec::new();
    for (_, src) in crates() {
        let mut files = Vec::new();
        rs_files(&src, &mut files);
        for f in files {
            if f.file_name().is_some_and(|n| n == "tests.rs")
                || f.components().any(|c| c.as_os_str() == "tests")
            {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            let lines = text
                .lines()
                .take_while(|l| !(l.starts_with("#[cfg(") && l.contains("test")))
                .count();
            let reason = text
                .lines()
                .take_while(|l| l.starts_with("//!"))
                .any(|l| l.starts_with("//! Length:"));
            if lines > MAX_LINES && !reason {
                long.push(format!("{} ({lines} lines)", f.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines without a `//! Length:` reason:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_architecture_map_names_every_crate_and_module() {
    let map = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let mut missing = Vec::new();
    for (krate, src) in crates() {
        if krate != "cohort" && !map.contains(&format!("`{krate}/`")) {
            missing.push(format!("crate `{krate}/`"));
        }
        for (scope, g) in graphs(&src) {
            if !scope.is_empty() {
                continue;
            }
            for m in g.keys() {
                let named = [format!("{m}.rs"), format!("{m}/"), format!("`{m}`")];
                if !named.iter().any(|n| map.contains(n.as_str())) {
                    missing.push(format!("{krate}: module {m} ({m}.rs, {m}/ or `{m}`)"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md does not name:\n{}",
        missing.join("\n")
    );
}

/// A file's text before its test module, comments and strings removed.
fn product_code(f: &Path) -> String {
    let text = std::fs::read_to_string(f).unwrap();
    let body: Vec<&str> = text
        .lines()
        .take_while(|l| !(l.starts_with("#[cfg(") && l.contains("test")))
        .collect();
    code_of(&body.join("\n"))
}

/// The non-test source files under `dir`.
fn product_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    rs_files(dir, &mut files);
    files.retain(|f| {
        f.file_name().is_some_and(|n| n != "tests.rs")
            && !f.components().any(|c| c.as_os_str() == "tests")
    });
    files
}

#[test]
fn the_invariants_in_the_architecture_map_hold_in_the_code() {
    // (where, what must not appear in its product code, the invariant)
    let rules: &[(&str, &[&str], &str)] = &[
        (
            "coordinator/src/round",
            &[
                "Instant::now",
                "SystemTime",
                "rand::rng()",
                "thread_rng",
                "tracing::",
                "std::fs",
                "tokio",
                "tonic",
            ],
            "Orchestrator: no I/O, no async, no clock, no entropy but its seed, no logging",
        ),
        (
            "crypto/src",
            &[
                "SystemTime::now",
                "Instant::now",
                "std::env",
                "tokio",
                "tonic",
                "burn",
                "rand::rng()",
                "thread_rng",
            ],
            "crypto: no clock, no environment, no gRPC, tokio or Burn; randomness is an argument",
        ),
        (
            "model/src",
            &["tokio", "tonic", "prost"],
            "model: no async, no network",
        ),
        (
            "storage/src",
            &["tonic", "cohort_coordinator", "cohort_serving"],
            "storage knows nothing of the services above it",
        ),
        (
            "serving/src",
            &["cohort_coordinator"],
            "serving does not depend on the coordinator",
        ),
    ];
    let mut broken = Vec::new();
    for (dir, banned, rule) in rules {
        for f in product_files(&root().join(dir)) {
            let code = product_code(&f);
            for b in *banned {
                if code.contains(b) {
                    broken.push(format!("{} uses {b}: {rule}", f.display()));
                }
            }
        }
    }
    // Only `protocol` defines prost messages.
    for (krate, src) in crates() {
        if krate == "protocol" {
            continue;
        }
        for f in product_files(&src) {
            if product_code(&f).contains("prost::Message") {
                broken.push(format!("{} defines a prost message", f.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
