//! Benchmark: the whole front end (`lang::analyze`) over every stdlib module and example
//! recipe, as `recipec check stdlib/*.recipe recipes/*.recipe` does. Goal: under 50 ms.
//! Run with `cargo bench -p lang --bench check_stdlib`; prints the median of 30 runs.

use lang::source::{MemoryLoader, SourceDb};
use std::time::Instant;

fn main() {
    let mut loader = MemoryLoader::default();
    for (m, f, t) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{f}"), t);
    }
    let recipes_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../recipes");
    let mut recipes = vec![];
    for e in std::fs::read_dir(recipes_dir).expect("recipes/ exists").flatten() {
        let p = e.path();
        recipes.push((p.display().to_string(), std::fs::read_to_string(&p).expect("readable")));
    }
    let mut times = vec![];
    for _ in 0..30 {
        let start = Instant::now();
        let mut db = SourceDb::new();
        let mut roots = vec![];
        for (_, f, t) in stdlib::MODULES {
            roots.push(db.add(format!("stdlib/{f}"), *t));
        }
        for (n, t) in &recipes {
            roots.push(db.add(n.clone(), t.clone()));
        }
        let analysis = lang::analyze(&mut db, &roots, &loader);
        assert!(!analysis.has_errors());
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let lines: usize = stdlib::MODULES.iter().map(|m| m.2.lines().count()).sum::<usize>()
        + recipes.iter().map(|r| r.1.lines().count()).sum::<usize>();
    println!(
        "check stdlib + recipes ({} files, {lines} lines): median {:.2} ms, min {:.2} ms, max {:.2} ms (goal: < 50 ms)",
        roots_count(&recipes),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
}

fn roots_count(recipes: &[(String, String)]) -> usize {
    stdlib::MODULES.len() + recipes.len()
}
