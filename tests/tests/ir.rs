//! The graph IR of every stdlib item (functions, losses, optimizers, schedules, sparsity
//! rules, decoding policies) at sample shapes: snapshots after lowering, after autodiff (for
//! losses) and after the pass pipeline, each preceded by the item's source; every graph
//! verifies and its text form parses back to the same text.

use compiler::ir::{parse_graph, Graph};
use compiler::lower::Arg;
use lang::ast::{FnKind, ItemKind, RuleKind};
use lang::source::{MemoryLoader, SourceDb};
use lang::types::Dtype;

fn t(d: Dtype, s: &[usize]) -> Arg {
    Arg::Tensor(d, s.to_vec())
}

/// Sample arguments per item: tensors by shape, hyperparameters by value.
fn samples(module: &str, item: &str) -> Option<Vec<(&'static str, Arg)>> {
    use Dtype::*;
    let ce = || vec![("logits", t(F32, &[3, 5])), ("targets", t(I32, &[3]))];
    Some(match (module, item) {
        ("std.loss", "cross_entropy") | ("std.loss", "logz_penalty") => ce(),
        ("std.loss", "label_smoothed_cross_entropy") => ce(),
        ("std.loss", "zloss_spherical") => {
            let mut v = ce();
            v.push(("a", Arg::Scalar(1.0)));
            v.push(("b", Arg::Scalar(2.0)));
            v
        }
        ("std.loss", "linear_cross_entropy") => {
            vec![("hidden", t(F32, &[3, 4])), ("classifier", t(F32, &[5, 4])), ("targets", t(I32, &[3]))]
        }
        ("std.optim", _) => vec![("lr", Arg::Scalar(0.1))],
        ("std.schedule", "constant") => vec![("value", Arg::Scalar(1.0))],
        ("std.schedule", "linear_warmup") => vec![("peak", Arg::Scalar(1.0)), ("warmup", Arg::Scalar(10.0))],
        ("std.schedule", _) => vec![("peak", Arg::Scalar(1.0)), ("total", Arg::Scalar(100.0))],
        ("std.sparsity", _) => vec![],
        ("std.decode", _) => vec![("logits", t(F32, &[6]))],
        ("std.models", "layer_norm") => vec![("x", t(F32, &[3, 4])), ("gain", t(F32, &[4])), ("bias", t(F32, &[4]))],
        _ => return None,
    })
}

fn round_trip(g: &Graph, what: &str) {
    g.verify().unwrap_or_else(|e| panic!("{what}: {e}\n{g}"));
    let text = g.to_string();
    let back = parse_graph(&text).unwrap_or_else(|e| panic!("{what}: the text form does not parse back: {e}\n{text}"));
    assert_eq!(back.to_string(), text, "{what}: the text form does not round-trip");
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
            let lowered = match &item.kind {
                ItemKind::Fn(f) if f.kind == FnKind::Schedule => compiler::entry::schedule(mods, &db, r, &args),
                ItemKind::Fn(_) => compiler::entry::function(mods, &db, r, &args, false, true),
                ItemKind::Rule(rd) if rd.kind == RuleKind::Optimizer => {
                    compiler::entry::optimizer(mods, &db, r, (Dtype::F32, vec![4]), &args)
                }
                ItemKind::Rule(_) => compiler::entry::sparsity(mods, &db, r, (Dtype::F32, vec![2, 8]), &args),
                _ => continue,
            }
            .unwrap_or_else(|e| panic!("{module}.{name}: {e}"));
            round_trip(&lowered, &format!("{module}.{name} lowered"));
            snap.push_str(&format!("\nLOWERED\n{lowered}"));
            if matches!(&item.kind, ItemKind::Fn(f) if f.kind == FnKind::Loss || module == &"std.loss") {
                let g = compiler::entry::function(mods, &db, r, &args, true, true).unwrap();
                round_trip(&g, &format!("{module}.{name} with gradients"));
                snap.push_str(&format!("\nGRADIENTS\n{g}"));
            }
            let mut optimized = lowered.clone();
            compiler::passes::run_pipeline(&mut optimized, None, &mut vec![]).unwrap();
            round_trip(&optimized, &format!("{module}.{name} optimized"));
            snap.push_str(&format!("\nOPTIMIZED\n{optimized}"));
            let snap_name = format!("{}__{name}", module.replace('.', "_"));
            insta::with_settings!({snapshot_path => "../ir/snapshots", prepend_module_to_snapshot => false, omit_expression => true}, {
                insta::assert_snapshot!(snap_name, snap);
            });
            covered += 1;
        }
    }
    assert!(covered >= 18, "only {covered} stdlib items lowered");
}
