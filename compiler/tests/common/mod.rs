//! Shared helpers: analyze source with the stdlib, lower an item, make random tensors.

#![allow(dead_code)]

use compiler::interp::Tensor;
use compiler::ir::Graph;
use compiler::lower::Arg;
use lang::source::{MemoryLoader, SourceDb};
use lang::types::{Dtype, ItemRef};

pub struct Program {
    pub db: SourceDb,
    pub analysis: lang::Analysis,
}

pub fn loader() -> MemoryLoader {
    let mut l = MemoryLoader::default();
    for (m, f, t) in stdlib::MODULES {
        l = l.with(m, &format!("<std>/{f}"), t);
    }
    l
}

pub fn program(src: &str) -> Program {
    let mut db = SourceDb::new();
    let f = db.add("test.recipe", src);
    let analysis = lang::analyze(&mut db, &[f], &loader());
    let errors: Vec<String> =
        analysis.diagnostics.iter().filter(|d| d.is_error()).map(|d| format!("{} {}", d.code, d.message)).collect();
    assert!(errors.is_empty(), "{errors:?}\n{src}");
    Program { db, analysis }
}

pub fn item(p: &Program, module: usize, name: &str) -> ItemRef {
    p.analysis.modules.find_item(module, name).unwrap_or_else(|| panic!("no item {name}"))
}

/// xorshift64* for reproducible test data.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    pub fn tensor(&mut self, dtype: Dtype, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::new(dtype, shape.to_vec(), (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect())
    }
    pub fn ints(&mut self, shape: &[usize], hi: usize) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::new(Dtype::I32, shape.to_vec(), (0..n).map(|_| self.range(0, hi - 1) as f64).collect())
    }
}

pub fn tensor_args(names: &[&str], ts: &[Tensor]) -> Vec<(String, Arg)> {
    names.iter().zip(ts).map(|(n, t)| (n.to_string(), Arg::Tensor(t.dtype, t.shape.clone()))).collect()
}

pub fn run(g: &Graph, inputs: &[Tensor]) -> std::collections::HashMap<String, Tensor> {
    compiler::interp::run(g, inputs, 0).unwrap_or_else(|e| panic!("{e}\n{g}"))
}
