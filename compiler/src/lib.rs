//! The compiler: graph IR, lowering, autodiff, passes and the reference interpreter.
//!
//! Input: a checked program from `lang` (its modules and an item to compile) and the
//! concrete shapes and hyperparameters of one entry point. Output: [`ir::Graph`]s (forward,
//! backward, optimizer step, schedule, mask rule, decode step) and, through
//! [`interp::run`], their values. Must not depend on the runtime, code generators or any
//! IO. Start reading at [`entry`], which builds the graph of each entry-point kind, then
//! [`autodiff`] and [`passes::PIPELINE`].

pub mod autodiff;
pub mod block;
pub mod builtins;
pub mod entry;
pub mod hoist;
pub mod incremental;
pub mod interp;
pub mod ir;
pub mod kernel;
pub mod lower;
pub mod math;
pub mod passes;
pub mod plan;
pub mod rng;
pub mod train;
