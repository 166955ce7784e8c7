//! The graph IR of every stdlib item (functions, losses, optimizers, schedules, sparsity
//! rules, decoding policies) at sample shapes: snapshots after lowering, after autodiff (for
//! losses) and after the pass pipeline, each preceded by the item's source; every graph
//! verifies and its text form parses back to the same text.

use compiler::ir::{parse_graph, Graph};
use compiler::lower::Arg;
use lang::ast::{FnKind, ItemKind};
use lang::source::{MemoryLoader, SourceDb};
use tests::{auto_args, samples};

fn round_trip(g: &Graph, what: &str) {
    g.verify().unwrap_or_else(|e| panic!("{what}: {e}\n{g}"));
    let text = g.to_string();
    let back = parse_graph(&text).unwrap_or_else(|e| panic!("{what}: the text form does not parse back: {e}\n{text}"));
    assert_eq!(back.to_string(), text, "{what}: the text form does not round-trip");
}

/// The kernel program of a graph: its memory plan is valid and consistent (aligned slices
/// inside the arena, no overlap between values live together, peak ≤ arena ≤ naive).
fn check_plan(g: &Graph, what: &str) -> compiler::kernel::Program {
    let p = compiler::kernel::schedule(g).unwrap_or_else(|e| panic!("{what}: {e}"));
    p.verify().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(p.peak_bytes <= p.arena_bytes, "{what}: peak {} > arena {}", p.peak_bytes, p.arena_bytes);
    assert!(p.arena_bytes <= p.naive_bytes.max(64), "{what}: arena {} > naive {}", p.arena_bytes, p.naive_bytes);
    p
}

#[test]
fn stdlib_graphs() {
    let mut loader = MemoryLoader::default();
    for (m, f, text) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{f}"), text);
    }
    let mut covered = 0;
    for (module, file, text) in stdlib::MODULES {
        let mut db = SourceDb::new();
        let root = db.add(format!("<std>/{file}"), *text);
        let analysis = lang::analyze(&mut db, &[root], &loader);
        assert!(!analysis.has_errors());
        let m = 0;
        let mut names: Vec<(usize, String)> =
            analysis.modules.list[m].items.iter().map(|(n, i)| (*i, n.clone())).collect();
        names.sort();
        for (_, name) in names {
            let r = analysis.modules.find_item(m, &name).unwrap();
            let item = analysis.modules.item(r);
            let Some(args) = samples(module, &name) else {
                assert!(matches!(item.kind, ItemKind::Model(_)), "no sample arguments for {module}.{name}");
                continue;
            };
            let args: Vec<(String, Arg)> = args.into_iter().map(|(n, a)| (n.to_string(), a)).collect();
            let src = &text[item.span.range()];
            let mut snap = format!("SOURCE\n{src}\n");
            let mods = &analysis.modules;
            let Some(lowered) = tests::item_graph(mods, &db, r, &args, false, (vec![4], vec![2, 8])) else { continue };
            let lowered = lowered.unwrap_or_else(|e| panic!("{module}.{name}: {e}"));
            round_trip(&lowered, &format!("{module}.{name} lowered"));
            snap.push_str(&format!("\nLOWERED\n{lowered}"));
            if tests::takes_gradients(module, &item.kind) {
                let g = compiler::entry::function(mods, &db, r, &args, true).unwrap();
                round_trip(&g, &format!("{module}.{name} with gradients"));
                snap.push_str(&format!("\nGRADIENTS\n{g}"));
            }
            let mut optimized = lowered.clone();
            compiler::passes::run_pipeline(&mut optimized, None, &mut vec![]).unwrap();
            round_trip(&optimized, &format!("{module}.{name} optimized"));
            snap.push_str(&format!("\nOPTIMIZED\n{optimized}"));
            let plan = check_plan(&optimized, &format!("{module}.{name}"));
            snap.push_str(&format!("\nPLAN\n{}\nKERNELS\n{}", plan.report(), plan.text()));
            let snap_name = format!("{}__{name}", module.replace('.', "_"));
            insta::with_settings!({snapshot_path => "../ir/snapshots", prepend_module_to_snapshot => false, omit_expression => true}, {
                insta::assert_snapshot!(snap_name, snap);
            });
            covered += 1;
        }
    }
    assert!(covered >= 18, "only {covered} stdlib items lowered");
}

#[test]
fn case_file_graphs() {
    let dir = tests::root().join("tests/compile/valid");
    let mut lowered_count = 0;
    for path in tests::recipe_files(&dir) {
        let rel = path.strip_prefix(tests::root()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut db = SourceDb::new();
        let root = db.add(rel.clone(), text.clone());
        let analysis = lang::analyze(&mut db, &[root], &tests::RepoLoader);
        let mods = &analysis.modules;
        let mut snap = format!("SOURCE\n{text}");
        let mut any = false;
        for (i, item) in mods.list[0].ast.items.iter().enumerate() {
            let r = lang::types::ItemRef { module: 0, item: i };
            let (params, kind) = match &item.kind {
                ItemKind::Fn(f) => (f.params.clone(), f.kind.keyword()),
                ItemKind::Rule(rd) => {
                    (rd.params.iter().filter(|p| p.name.name != "param").cloned().collect(), rd.kind.keyword())
                }
                _ => continue,
            };
            let name = item.name().unwrap().name.clone();
            let args = auto_args(&params);
            let param_shape = match &item.kind {
                ItemKind::Rule(rd) => match rd.params.iter().find(|p| p.name.name == "param") {
                    Some(p) => match auto_args(std::slice::from_ref(p)).pop() {
                        Some((_, Arg::Tensor(_, s))) => s,
                        _ => vec![4, 8],
                    },
                    None => vec![4, 8],
                },
                _ => vec![],
            };
            let grads = matches!(&item.kind, ItemKind::Fn(f) if f.kind == FnKind::Loss);
            let Some(g) = tests::item_graph(mods, &db, r, &args, grads, (param_shape.clone(), param_shape)) else {
                continue;
            };
            any = true;
            match g {
                Ok(g) => {
                    round_trip(&g, &format!("{rel}: {name}"));
                    let mut opt = g.clone();
                    compiler::passes::run_pipeline(&mut opt, None, &mut vec![]).unwrap();
                    round_trip(&opt, &format!("{rel}: {name} optimized"));
                    check_plan(&opt, &format!("{rel}: {name}"));
                    // A loss's graph includes its gradients; the optimized form is the one to read.
                    snap.push_str(&format!("\n{kind} {name}: OPTIMIZED\n{opt}"));
                    lowered_count += 1;
                }
                Err(e) => snap.push_str(&format!("\n{kind} {name}: NOT LOWERED\n{}\n", e.message)),
            }
        }
        if !any {
            continue;
        }
        let snap_name =
            format!("cases__{}", rel.trim_start_matches("tests/compile/valid/").trim_end_matches(".recipe"));
        insta::with_settings!({snapshot_path => "../ir/snapshots", prepend_module_to_snapshot => false, omit_expression => true}, {
            insta::assert_snapshot!(snap_name, snap);
        });
    }
    assert!(lowered_count >= 50, "only {lowered_count} case items lowered");
}
