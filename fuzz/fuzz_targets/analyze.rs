//! `cargo +nightly fuzz run analyze`: coverage-guided fuzzing of the whole front end and the
//! formatter. The stable property test in tests/tests/robustness.rs runs in CI; this target
//! explores further. Seed it with `cp stdlib/*.recipe recipes/*.recipe fuzz/corpus/analyze/`.
#![no_main]

use lang::source::{MemoryLoader, SourceDb};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut loader = MemoryLoader::default();
    for (m, f, t) in stdlib::MODULES {
        loader = loader.with(m, &format!("<std>/{f}"), t);
    }
    let mut db = SourceDb::new();
    let file = db.add("fuzz.recipe", text);
    let _ = lang::analyze(&mut db, &[file], &loader);
    if let Ok(once) = lang::fmt::format_source(text) {
        assert_eq!(lang::fmt::format_source(&once).ok(), Some(once));
    }
});
