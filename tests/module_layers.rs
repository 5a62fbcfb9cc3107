//! The layers of `docs/ARCHITECTURE.md` hold in `src/`: every `crate::`
//! path of a top-level module names a module of a lower layer, every
//! top-level module has a layer, and the files of each module import one
//! another without a circle (a module's root file and its children count
//! as one). Read from the source text, so it needs no build of its own.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type ModulePath = Vec<String>;

/// One source file: its module and its code without comments and tests.
struct Source {
    file: PathBuf,
    module: ModulePath,
    code: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

fn sources() -> Vec<Source> {
    let src = root().join("src");
    let mut files = Vec::new();
    collect_rs(&src, &mut files);
    files
        .into_iter()
        .filter(|file| file.file_name().is_some_and(|n| n != "main.rs"))
        .map(|file| {
            let relative = file.strip_prefix(&src).unwrap().with_extension("");
            let mut module: ModulePath = relative.iter().map(|part| part.to_string_lossy().into_owned()).collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            let code = without_comments_and_tests(&std::fs::read_to_string(&file).unwrap());
            Source { file, module, code }
        })
        .collect()
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code before its unit tests, each line cut at `//` (a `//` inside
/// a string cuts it too: that loses at most a path, never adds one).
fn without_comments_and_tests(code: &str) -> String {
    let code = code.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    code.lines().map(|line| line.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

/// The first path segment after each `prefix::` (each of a `{…}` group's
/// members, too).
fn names_after(code: &str, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    let needle = format!("{prefix}::");
    for (at, _) in code.match_indices(&needle) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + needle.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..matching_brace(group)];
            names.extend(top_level_members(group).into_iter().filter_map(first_ident));
        } else if let Some(name) = first_ident(rest) {
            names.push(name);
        }
    }
    names
}

/// Where the group that starts just before `text` closes.
fn matching_brace(text: &str) -> usize {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

fn top_level_members(group: &str) -> Vec<&str> {
    let (mut members, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                members.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    members.push(&group[start..]);
    members
}

fn first_ident(text: &str) -> Option<String> {
    let name: String = text.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty()).then_some(name)
}

/// Every module `source` names: `crate::x…` and its siblings' `super::x…`.
fn named_modules(source: &Source, modules: &BTreeSet<ModulePath>) -> BTreeSet<ModulePath> {
    let mut named = BTreeSet::new();
    for name in names_after(&source.code, "crate") {
        named.insert(vec![name]);
    }
    // In `a/b.rs` and in `a/b/mod.rs` alike, `super` is `a`.
    if let Some((_, parent)) = source.module.split_last() {
        for name in names_after(&source.code, "super") {
            let mut target = parent.to_vec();
            target.push(name);
            named.insert(target);
        }
    }
    named.retain(|target| modules.contains(target));
    named
}

/// Every module there is, as the files make them (their prefixes too).
fn all_modules(sources: &[Source]) -> BTreeSet<ModulePath> {
    let mut modules = BTreeSet::new();
    for source in sources {
        for len in 1..=source.module.len() {
            modules.insert(source.module[..len].to_vec());
        }
    }
    modules
}

/// `| N | \`a\`, \`b\` |` rows of the layer table.
fn layers() -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let mut layers = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(layer), Some(names)) = (cells.get(1).and_then(|c| c.parse::<usize>().ok()), cells.get(2)) else {
            continue;
        };
        for name in names.split(',') {
            layers.insert(name.trim().trim_matches('`').to_owned(), layer);
        }
    }
    assert!(!layers.is_empty(), "docs/ARCHITECTURE.md has no layer table");
    layers
}

/// Edges `from → to` between the modules that are `depth` segments long
/// and have one parent (siblings), from every file under them.
fn sibling_edges(
    sources: &[Source],
    modules: &BTreeSet<ModulePath>,
    depth: usize,
) -> BTreeMap<ModulePath, BTreeSet<ModulePath>> {
    let mut edges: BTreeMap<ModulePath, BTreeSet<ModulePath>> = BTreeMap::new();
    for source in sources.iter().filter(|s| s.module.len() >= depth) {
        let from = source.module[..depth].to_vec();
        for target in named_modules(source, modules).into_iter().filter(|t| t.len() >= depth) {
            let to = target[..depth].to_vec();
            if to != from && to[..depth - 1] == from[..depth - 1] {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    edges
}

/// A circle in `edges`, as the modules along it.
fn find_circle(edges: &BTreeMap<ModulePath, BTreeSet<ModulePath>>) -> Option<Vec<ModulePath>> {
    fn visit(
        node: &ModulePath,
        edges: &BTreeMap<ModulePath, BTreeSet<ModulePath>>,
        done: &mut BTreeSet<ModulePath>,
        path: &mut Vec<ModulePath>,
    ) -> Option<Vec<ModulePath>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.clone());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, edges, done, path) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    edges.keys().find_map(|node| visit(node, edges, &mut done, &mut Vec::new()))
}

fn shown(module: &ModulePath) -> String {
    module.join("::")
}

#[test]
fn every_top_level_import_goes_down_a_layer() {
    let sources = sources();
    let modules = all_modules(&sources);
    let layers = layers();
    let top: BTreeSet<&str> = modules.iter().filter(|m| m.len() == 1).map(|m| m[0].as_str()).collect();
    let unlisted: Vec<&&str> = top.iter().filter(|m| !layers.contains_key(**m)).collect();
    assert!(unlisted.is_empty(), "modules without a layer in docs/ARCHITECTURE.md: {unlisted:?}");
    let stale: Vec<&String> = layers.keys().filter(|m| !top.contains(m.as_str())).collect();
    assert!(stale.is_empty(), "docs/ARCHITECTURE.md names modules that are not in src/: {stale:?}");

    let mut wrong = Vec::new();
    for source in sources.iter().filter(|s| !s.module.is_empty()) {
        let from = &source.module[0];
        for target in named_modules(source, &modules) {
            let to = &target[0];
            if to != from && layers[to] >= layers[from] {
                wrong.push(format!(
                    "{} (layer {}) imports {to} (layer {})",
                    source.file.strip_prefix(root()).unwrap().display(),
                    layers[from],
                    layers[to]
                ));
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(wrong.is_empty(), "imports that do not go down:\n{}", wrong.join("\n"));
}

#[test]
fn the_files_of_every_module_import_one_another_without_a_circle() {
    let sources = sources();
    let modules = all_modules(&sources);
    let deepest = modules.iter().map(Vec::len).max().unwrap();
    for depth in 1..=deepest {
        let edges = sibling_edges(&sources, &modules, depth);
        if let Some(circle) = find_circle(&edges) {
            let circle: Vec<String> = circle.iter().map(shown).collect();
            panic!("an import circle: {}", circle.join(" → "));
        }
    }
}

#[test]
fn the_reader_sees_the_imports_it_checks() {
    // The scan itself, on a file whose imports are known.
    let code =
        "use crate::{context::User, host::{a, b}};\nuse super::state::X; // crate::fake\nlet y = crate::fs::f();";
    let code = without_comments_and_tests(code);
    assert_eq!(names_after(&code, "crate"), ["context", "host", "fs"]);
    assert_eq!(names_after(&code, "super"), ["state"]);
    let sources = sources();
    let modules = all_modules(&sources);
    let init = sources.iter().find(|s| s.module == ["host", "init"]).unwrap();
    let named = named_modules(init, &modules);
    assert!(named.contains(&vec!["context".to_owned()]), "{named:?}");
    assert!(!named.contains(&vec!["restore".to_owned()]), "host::init reaches restore only through a trait");
}
