//! The coordinator's modules form no import cycle (issue 13): every `crate::` edge of
//! coordinator/src/*.rs (and of each module directory) is read from the source, and any
//! strongly connected set of more than one module fails the test, named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name → the crate modules its source names (`use crate::x`, `crate::x::…`).
fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let mut text = String::new();
        if path.is_file() && path.extension().is_some_and(|e| e == "rs") {
            text = std::fs::read_to_string(&path).unwrap();
        } else if path.is_dir() && name != "bin" {
            for file in std::fs::read_dir(&path).unwrap() {
                let file = file.unwrap().path();
                if file.extension().is_some_and(|e| e == "rs") {
                    text.push_str(&std::fs::read_to_string(&file).unwrap());
                }
            }
        } else {
            continue;
        }
        if name == "lib" || name == "main" {
            continue;
        }
        // Tests may reach anywhere: only the code above the first `#[cfg(test)]` counts.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut uses = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let mut names = Vec::new();
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a::X, b};`
                let group = &group[..group.find('}').unwrap_or(group.len())];
                names.extend(group.split(',').map(|p| p.trim().to_owned()));
            } else {
                names.push(rest.to_owned());
            }
            for n in names {
                let module: String = n
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !module.is_empty() && module != name {
                    uses.insert(module);
                }
            }
        }
        modules.insert(name, uses);
    }
    // Only edges to modules of this crate.
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    for uses in modules.values_mut() {
        uses.retain(|m| known.contains(m));
    }
    modules
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.graph[v] {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn the_parser_finds_a_cycle_it_is_shown() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(cycles(&graph), [["a", "b", "c"]]);
}

#[test]
#[ignore = "fails until issue 13 step 3 breaks the cycle {agent_client, clock, config, ebs, provider, retention, scheduler, workflow}"]
fn coordinator_modules_form_no_import_cycle() {
    // QUIESCE_LAYERING_SRC checks another tree (e.g. an older main) with this test.
    let src = std::env::var_os("QUIESCE_LAYERING_SRC")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let graph = edges(&src);
    assert!(graph.contains_key("workflow") && graph.contains_key("catalog"));
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "import cycles among coordinator modules: {}",
        found
            .iter()
            .map(|c| format!("{{{}}}", c.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    );
}
