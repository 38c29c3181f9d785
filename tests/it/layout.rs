//! The shape of `src/` the design relies on (docs/design.md, "The map of the code"): no cycle
//! among the top-level modules, so each can be read and tested after the ones it uses, and
//! `config` a leaf that imports no other module of the crate. A module's own `#[cfg(test)]`
//! block is left out: a test may use a helper from anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules of `src/` and the files each is made of.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("src/") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if path.is_dir() {
            let mut files = Vec::new();
            rust_files(&path, &mut files);
            modules.insert(name, files);
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            modules.insert(name, vec![path]);
        }
    }
    modules
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// The modules of the crate `text` names (`crate::name`, or `name` inside `use crate::{..}`),
/// outside comments and the test block.
fn uses(text: &str, known: &BTreeMap<String, Vec<PathBuf>>) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    let mut found = BTreeSet::new();
    let mut in_group = false;
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or_default();
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if rest.starts_with('{') {
                in_group = true;
            }
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            found.insert(name);
        }
        if in_group {
            // The first word of each item of the group is a module.
            for item in line.split(['{', ',']).skip(usize::from(line.contains("crate::{"))) {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.insert(name);
            }
            in_group = !line.contains("};");
        }
    }
    found.retain(|name| known.contains_key(name));
    found
}

/// Each module's uses of the others.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    modules
        .iter()
        .map(|(name, files)| {
            let mut used = BTreeSet::new();
            for file in files {
                let text = std::fs::read_to_string(file).expect("source file");
                used.extend(uses(&text, &modules));
            }
            used.remove(name);
            (name.clone(), used)
        })
        .collect()
}

/// A path from `from` back to `from` through `graph`, if there is one.
fn cycle_through(from: &str, graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![(from.to_string(), vec![from.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == from {
                let mut cycle = path.clone();
                cycle.push(from.to_string());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_top_level_module_of_src_is_in_a_cycle() {
    let graph = graph();
    assert!(graph.len() > 10, "read the modules of src/: {graph:?}");
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|module| cycle_through(module, &graph))
        .map(|cycle| cycle.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "module cycles in src/:\n{}", cycles.join("\n"));
}

#[test]
fn config_imports_no_other_module() {
    let graph = graph();
    assert_eq!(graph.get("config"), Some(&BTreeSet::new()), "config is a leaf");
}

#[test]
fn the_reader_finds_uses_in_paths_and_groups() {
    let known: BTreeMap<String, Vec<PathBuf>> = ["a", "b", "c", "d"]
        .into_iter()
        .map(|m| (m.to_string(), Vec::new()))
        .collect();
    let text = "use crate::a::X;\nuse crate::{\n    b::Y,\n    c,\n};\n// crate::d in a comment\nfn f() { crate::a::g() }\n#[cfg(test)]\nmod tests {\n    use crate::d;\n}\n";
    let found: Vec<String> = uses(text, &known).into_iter().collect();
    assert_eq!(found, ["a", "b", "c"]);
}

/// Every Rust file of `src/`, with its path relative to `src/` and its number of lines.
fn file_lengths() -> Vec<(String, usize)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("source file");
            let name = path.strip_prefix(&src).unwrap_or(&path).display().to_string();
            (name.replace('\\', "/"), text.lines().count())
        })
        .collect()
}

/// A file holds one concern a reader can take in: none over 750 lines, but the HTTP/1.1
/// exchange (one parser and its state machine), which may not grow much past its size.
#[test]
fn no_source_file_holds_more_than_one_concern_s_worth_of_lines() {
    let lengths = file_lengths();
    assert!(lengths.len() > 40, "read the files of src/: {lengths:?}");
    let long: Vec<String> = lengths
        .iter()
        .filter(|(name, lines)| *lines > if name == "delivery/h1.rs" { 1_300 } else { 750 })
        .map(|(name, lines)| format!("{name}: {lines} lines"))
        .collect();
    assert!(long.is_empty(), "files to split by concern:\n{}", long.join("\n"));
}

/// The worker's roles stay small enough to hold in mind one at a time.
#[test]
fn no_worker_file_is_over_400_lines() {
    let long: Vec<String> = file_lengths()
        .into_iter()
        .filter(|(name, lines)| name.starts_with("worker/") && *lines > 400)
        .map(|(name, lines)| format!("{name}: {lines} lines"))
        .collect();
    assert!(long.is_empty(), "worker files to split:\n{}", long.join("\n"));
}

/// The worker tells the outside through `health`; it does not know the admin port's module.
#[test]
fn the_worker_does_not_depend_on_the_admin_port() {
    let graph = graph();
    let worker = graph.get("worker").expect("the worker module");
    assert!(!worker.is_empty(), "read the worker's uses: {worker:?}");
    assert!(!worker.contains("admin"), "worker uses admin: {worker:?}");
}
