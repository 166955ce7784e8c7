//! The LLVM backend (feature `llvm`): each loop kernel as LLVM IR (textual, scalar, one
//! function per kernel with the same `fn(bufs, lo, hi)` signature as the Cranelift code),
//! optimized with LLVM 14's `default<O3>` pipeline for the host CPU (the loop vectorizer
//! turns the innermost loops into AVX2 where the body allows) and compiled by MCJIT.
//!
//! The numerics are the Cranelift backend's (see the crate doc): same compute types, same
//! rounding after every op, the same helper functions for transcendentals, f64
//! accumulators, saturating float-to-int stores. Min and max propagate NaN (compare and
//! select), rounding uses `llvm.roundeven`.

use crate::{
    code, compute_ty_is_f32, rc_bin, rc_f16_to_f32, rc_f32_to_f16, rc_round, rc_un, LoopFn, BINS, DTYPES, UNS,
};
use compiler::interp;
use compiler::ir::{Bin, Red, Un};
use compiler::kernel::{Affine, Inst, Kernel, Loop, Program, StoreVal};
use inkwell::context::Context;
use inkwell::execution_engine::ExecutionEngine;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, InitializationConfig, RelocMode, Target, TargetMachine};
use inkwell::OptimizationLevel;
use lang::types::Dtype;
use std::fmt::Write;

/// Keeps the LLVM context and engine alive as long as the code is used.
pub struct Engine {
    engine: Option<ExecutionEngine<'static>>,
    ctx: *mut Context,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The engine borrows the context: drop it first.
        self.engine.take();
        // SAFETY: `ctx` came from `Box::into_raw` in `compile` and is dropped once, here.
        unsafe { drop(Box::from_raw(self.ctx)) };
    }
}

/// Compiles every loop kernel; returns the engine and each kernel's function.
pub fn compile(p: &Program) -> Result<(Engine, Vec<Option<LoopFn>>), String> {
    Target::initialize_native(&InitializationConfig::default())
        .map_err(|e| format!("LLVM has no native target: {e}"))?;
    let cpu = TargetMachine::get_host_cpu_name().to_string();
    let features = TargetMachine::get_host_cpu_features().to_string();
    let mut ir = String::new();
    let _ = writeln!(ir, "; recipec kernels for `{}`", p.name);
    for (ki, k) in p.kernels.iter().enumerate() {
        if let Kernel::Loop(l) = k {
            let last = l.dims.len() - 1;
            let parallel =
                (l.reduce.is_none() && l.stores.iter().all(|st| st.at.coef[last] != 0)).then_some((3 * ki, 3 * ki + 1));
            Gen { out: &mut ir, l, p, next: 0, parallel, idx: (0..l.dims.len()).map(|d| format!("%i{d}")).collect() }
                .function(ki);
            if let Some((group, lp)) = parallel {
                let _ = writeln!(ir, "!{group} = distinct !{{}}");
                let _ = writeln!(ir, "!{lp} = distinct !{{!{lp}, !{}}}", lp + 1);
                let _ = writeln!(ir, "!{} = !{{!\"llvm.loop.parallel_accesses\", !{group}}}", lp + 1);
            }
        }
    }
    let _ = writeln!(ir, "attributes #0 = {{ \"target-cpu\"=\"{cpu}\" \"target-features\"=\"{features}\" }}");
    for decl in [
        "declare float @llvm.sqrt.f32(float)",
        "declare double @llvm.sqrt.f64(double)",
        "declare float @llvm.fabs.f32(float)",
        "declare double @llvm.fabs.f64(double)",
        "declare float @llvm.floor.f32(float)",
        "declare double @llvm.floor.f64(double)",
        "declare float @llvm.ceil.f32(float)",
        "declare double @llvm.ceil.f64(double)",
        "declare float @llvm.roundeven.f32(float)",
        "declare double @llvm.roundeven.f64(double)",
        "declare i64 @llvm.fptosi.sat.i64.f64(double)",
        "declare i32 @llvm.fptosi.sat.i32.f32(float)",
    ] {
        let _ = writeln!(ir, "{decl}");
    }
    let ctx: &'static Context = Box::leak(Box::new(Context::create()));
    let ctx_ptr = ctx as *const Context as *mut Context;
    let fail = |e: String| {
        // SAFETY: nothing borrows the context once we give up.
        unsafe { drop(Box::from_raw(ctx_ptr)) };
        e
    };
    let buf = MemoryBuffer::create_from_memory_range_copy(ir.as_bytes(), &p.name);
    let module =
        ctx.create_module_from_ir(buf).map_err(|e| fail(format!("generated LLVM IR does not parse: {e}\n{ir}")))?;
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(|e| fail(e.to_string()))?;
    let tm = target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::JITDefault,
        )
        .ok_or_else(|| fail("LLVM cannot target this CPU".into()))?;
    module
        .run_passes("default<O3>", &tm, PassBuilderOptions::create())
        .map_err(|e| fail(format!("LLVM passes failed: {e}")))?;
    let engine = module.create_jit_execution_engine(OptimizationLevel::Aggressive).map_err(|e| fail(e.to_string()))?;
    let mut loops = vec![];
    for (ki, k) in p.kernels.iter().enumerate() {
        loops.push(match k {
            Kernel::Loop(_) => {
                let addr =
                    engine.get_function_address(&format!("k{ki}")).map_err(|e| fail(format!("kernel k{ki}: {e:?}")))?;
                // SAFETY: the function was emitted with the `LoopFn` signature.
                Some(unsafe { std::mem::transmute::<usize, LoopFn>(addr) })
            }
            _ => None,
        });
    }
    Ok((Engine { engine: Some(engine), ctx: ctx_ptr }, loops))
}

struct Gen<'a> {
    out: &'a mut String,
    l: &'a Loop,
    p: &'a Program,
    next: usize,
    /// Metadata ids of the innermost loop's access group and loop properties, when its
    /// iterations are independent (every iteration stores its own elements and reads stored
    /// buffers only at those elements: the scheduler guarantees the latter).
    parallel: Option<(usize, usize)>,
    /// The SSA name of each loop index where the code being emitted is.
    idx: Vec<String>,
}

fn ty(d: Dtype) -> &'static str {
    if compute_ty_is_f32(d) {
        "float"
    } else {
        "double"
    }
}

fn storage(d: Dtype) -> &'static str {
    match d {
        Dtype::Bool => "i8",
        Dtype::I32 => "i32",
        Dtype::I64 => "i64",
        Dtype::F16 | Dtype::BF16 => "i16",
        Dtype::F32 => "float",
        Dtype::F64 => "double",
    }
}

/// An LLVM float literal: the bits of the value as a double, in hex (exact).
fn lit(v: f64, f32ty: bool) -> String {
    let v = if f32ty { v as f32 as f64 } else { v };
    format!("0x{:016X}", v.to_bits())
}

/// An f32 constant in LLVM's textual form (the double with the same value, in hex).
fn fk(v: f32) -> String {
    format!("0x{:016X}", (v as f64).to_bits())
}

impl Gen<'_> {
    fn t(&mut self) -> String {
        self.next += 1;
        format!("%t{}", self.next)
    }
    fn emit(&mut self, s: &str) {
        self.out.push_str("  ");
        self.out.push_str(s);
        self.out.push('\n');
    }
    fn label(&mut self, l: &str) {
        let _ = writeln!(self.out, "{l}:");
    }

    fn function(mut self, ki: usize) {
        let _ = writeln!(self.out, "define void @k{ki}(i8** %bufs, i64 %lo, i64 %hi) #0 {{");
        self.label("entry");
        let mut used: Vec<usize> = self
            .l
            .body
            .iter()
            .filter_map(|i| if let Inst::Load { buf, .. } = &i.inst { Some(*buf) } else { None })
            .chain(self.l.stores.iter().map(|s| s.buf))
            .collect();
        used.sort();
        used.dedup();
        for b in used {
            let st = storage(self.p.buffers[b].dtype);
            self.emit(&format!("%bp{b} = getelementptr i8*, i8** %bufs, i64 {b}"));
            self.emit(&format!("%braw{b} = load i8*, i8** %bp{b}"));
            self.emit(&format!("%b{b} = bitcast i8* %braw{b} to {st}*"));
        }
        if self.l.reduce.is_some() {
            for k in 0..crate::JAM {
                self.emit(&format!("%acc{k} = alloca double"));
            }
        }
        let n = self.l.dims.len();
        let outer = self.l.outer_dims();
        if outer == 0 {
            self.reduction(0);
        } else {
            self.level(0, outer, n);
        }
        self.emit("ret void");
        let _ = writeln!(self.out, "}}\n");
    }

    /// The value of an affine at the current point: Σ coef·i_d + c.
    fn affine(&mut self, a: &Affine) -> String {
        let mut acc = a.c.to_string();
        for (d, c) in a.coef.iter().enumerate() {
            if *c == 0 {
                continue;
            }
            let m = self.t();
            let i = self.idx[d].clone();
            self.emit(&format!("{m} = mul i64 {i}, {c}"));
            let s = self.t();
            self.emit(&format!("{s} = add i64 {acc}, {m}"));
            acc = s;
        }
        acc
    }

    fn counted(&mut self, d: usize, start: &str, end: &str, body: &mut dyn FnMut(&mut Self)) {
        self.counted_by(d, start, end, 1, body);
    }

    /// A loop over `start..end` in steps of `step` (iterations while `i + step <= end`); the
    /// index's name afterwards (where the iterations stopped) is returned.
    fn counted_by(&mut self, d: usize, start: &str, end: &str, step: i64, body: &mut dyn FnMut(&mut Self)) -> String {
        let id = self.next;
        self.next += 1;
        let (pre, head, bodyl, latch, exit) = (
            format!("L{d}_{id}_pre"),
            format!("L{d}_{id}_head"),
            format!("L{d}_{id}_body"),
            format!("L{d}_{id}_latch"),
            format!("L{d}_{id}_exit"),
        );
        let i = format!("%i{d}_{id}");
        self.emit(&format!("br label %{pre}"));
        self.label(&pre);
        self.emit(&format!("br label %{head}"));
        self.label(&head);
        self.emit(&format!("{i} = phi i64 [ {start}, %{pre} ], [ {i}_next, %{latch} ]"));
        let last = self.t();
        self.emit(&format!("{last} = add i64 {i}, {}", step - 1));
        let c = self.t();
        self.emit(&format!("{c} = icmp slt i64 {last}, {end}"));
        self.emit(&format!("br i1 {c}, label %{bodyl}, label %{exit}"));
        self.label(&bodyl);
        let saved = std::mem::replace(&mut self.idx[d], i.clone());
        body(self);
        self.idx[d] = saved;
        self.emit(&format!("br label %{latch}"));
        self.label(&latch);
        self.emit(&format!("{i}_next = add i64 {i}, {step}"));
        match self.parallel {
            Some((_, lp)) if d + 1 == self.l.dims.len() => self.emit(&format!("br label %{head}, !llvm.loop !{lp}")),
            _ => self.emit(&format!("br label %{head}")),
        }
        self.label(&exit);
        i
    }

    fn level(&mut self, d: usize, outer: usize, n: usize) {
        let (start, end) =
            if d == 0 { ("%lo".to_string(), "%hi".to_string()) } else { ("0".to_string(), self.l.dims[d].to_string()) };
        if d + 1 == outer && self.l.reduce.is_some() && self.l.dims[d] >= crate::JAM as usize {
            // Unroll and jam, as the Cranelift backend does (see `crate::JAM`).
            let after = self.counted_by(d, &start, &end, crate::JAM, &mut |g| {
                let base = g.idx[d].clone();
                let names: Vec<String> = (0..crate::JAM)
                    .map(|k| {
                        let n = g.t();
                        g.emit(&format!("{n} = add i64 {base}, {k}"));
                        n
                    })
                    .collect();
                g.reductions(outer, d, &names);
            });
            self.counted(d, &after, &end, &mut |g| g.reduction(outer));
            return;
        }
        self.counted(d, &start, &end, &mut |g| {
            if d + 1 == outer {
                if g.l.reduce.is_some() {
                    g.reduction(outer);
                } else {
                    let vals = g.values();
                    g.stores(&vals, None);
                }
            } else {
                g.level(d + 1, outer, n);
            }
        });
    }

    fn reduction(&mut self, outer: usize) {
        // The output's own index (none for a reduction to a scalar: `usize::MAX` names no dim).
        let d = outer.checked_sub(1).unwrap_or(usize::MAX);
        let here = self.idx.get(d).cloned().unwrap_or_default();
        self.reductions(outer, d, &[here]);
    }

    /// The reductions of the outputs at index `names[k]` of dim `d` (one accumulator each,
    /// each in the interpreter's order), computed side by side, then their stores.
    fn reductions(&mut self, outer: usize, d: usize, names: &[String]) {
        let r = self.l.reduce.clone().expect("reduction");
        let init = crate::red_init(r.op);
        for k in 0..names.len() {
            self.emit(&format!("store double {}, double* %acc{k}", lit(init, false)));
        }
        self.red_level(outer, d, names, &r);
        for (k, name) in names.iter().enumerate() {
            let a = self.t();
            self.emit(&format!("{a} = load double, double* %acc{k}"));
            let v = self.round(r.dtype, &a, "double");
            let saved = self.set_idx(d, name);
            self.stores(&[], Some(v));
            self.restore_idx(d, saved);
        }
    }

    fn set_idx(&mut self, d: usize, name: &str) -> Option<String> {
        self.idx.get_mut(d).map(|x| std::mem::replace(x, name.to_string()))
    }

    fn restore_idx(&mut self, d: usize, saved: Option<String>) {
        if let Some(s) = saved {
            self.idx[d] = s;
        }
    }

    fn red_level(&mut self, level: usize, d: usize, names: &[String], r: &compiler::kernel::Reduction) {
        if level == self.l.dims.len() {
            for (k, name) in names.iter().enumerate() {
                let saved = self.set_idx(d, name);
                self.accumulate(r, k);
                self.restore_idx(d, saved);
            }
            return;
        }
        let end = self.l.dims[level].to_string();
        let last = level + 1 == self.l.dims.len();
        self.counted(level, "0", &end, &mut |g| {
            if last {
                for (k, name) in names.iter().enumerate() {
                    let saved = g.set_idx(d, name);
                    g.accumulate(r, k);
                    g.restore_idx(d, saved);
                }
            } else {
                g.red_level(level + 1, d, names, r);
            }
        });
    }

    fn accumulate(&mut self, r: &compiler::kernel::Reduction, k: usize) {
        let vals = self.values();
        let x = self.to_double(&vals[r.value].clone(), ty(self.l.body[r.value].dtype));
        let a = self.t();
        self.emit(&format!("{a} = load double, double* %acc{k}"));
        let nv = self.t();
        match r.op {
            Red::Sum => self.emit(&format!("{nv} = fadd double {a}, {x}")),
            Red::Prod => self.emit(&format!("{nv} = fmul double {a}, {x}")),
            Red::Max | Red::Min => {
                let m = self.minmax(r.op == Red::Max, &a, &x, "double");
                self.emit(&format!("{nv} = fadd double {m}, -0.0"));
            }
            _ => unreachable!("arg reductions are library kernels"),
        }
        self.emit(&format!("store double {nv}, double* %acc{k}"));
    }

    fn stores(&mut self, vals: &[String], acc: Option<String>) {
        for s in &self.l.stores.clone() {
            let v = match (&s.val, &acc) {
                (StoreVal::Val(v), None) => vals[*v].clone(),
                (StoreVal::Acc, Some(a)) => a.clone(),
                _ => continue,
            };
            let off = self.affine(&s.at);
            self.store(s.buf, &off, &v);
        }
    }

    fn call(&mut self, f: usize, ret: &str, args: &[(&str, String)]) -> String {
        let sig: Vec<&str> = args.iter().map(|a| a.0).collect();
        let a: Vec<String> = args.iter().map(|(t, v)| format!("{t} {v}")).collect();
        let r = self.t();
        self.emit(&format!("{r} = call {ret} inttoptr (i64 {f} to {ret} ({})*)({})", sig.join(", "), a.join(", ")));
        r
    }

    fn load(&mut self, buf: usize, off: &str) -> String {
        let d = self.p.buffers[buf].dtype;
        let st = storage(d);
        let p = self.t();
        self.emit(&format!("{p} = getelementptr {st}, {st}* %b{buf}, i64 {off}"));
        let x = self.t();
        let md = self.access();
        self.emit(&format!("{x} = load {st}, {st}* {p}{md}"));
        let r = self.t();
        match d {
            Dtype::F32 | Dtype::F64 => return x,
            Dtype::I32 | Dtype::I64 => self.emit(&format!("{r} = sitofp {st} {x} to double")),
            Dtype::Bool => self.emit(&format!("{r} = uitofp i8 {x} to double")),
            Dtype::BF16 => {
                let z = self.t();
                self.emit(&format!("{z} = zext i16 {x} to i32"));
                let s = self.t();
                self.emit(&format!("{s} = shl i32 {z}, 16"));
                self.emit(&format!("{r} = bitcast i32 {s} to float"));
            }
            Dtype::F16 => {
                let z = self.t();
                self.emit(&format!("{z} = zext i16 {x} to i64"));
                return self.call(rc_f16_to_f32 as *const () as usize, "float", &[("i64", z)]);
            }
        }
        r
    }

    fn store(&mut self, buf: usize, off: &str, v: &str) {
        let d = self.p.buffers[buf].dtype;
        let st = storage(d);
        let p = self.t();
        self.emit(&format!("{p} = getelementptr {st}, {st}* %b{buf}, i64 {off}"));
        let x = match d {
            Dtype::F32 | Dtype::F64 => v.to_string(),
            Dtype::I32 | Dtype::I64 => {
                let w = self.t();
                self.emit(&format!("{w} = call i64 @llvm.fptosi.sat.i64.f64(double {v})"));
                if d == Dtype::I32 {
                    let t = self.t();
                    self.emit(&format!("{t} = trunc i64 {w} to i32"));
                    t
                } else {
                    w
                }
            }
            Dtype::Bool => {
                let c = self.t();
                self.emit(&format!("{c} = fcmp une double {v}, 0.0"));
                let z = self.t();
                self.emit(&format!("{z} = zext i1 {c} to i8"));
                z
            }
            Dtype::BF16 => {
                let b = self.t();
                self.emit(&format!("{b} = bitcast float {v} to i32"));
                let s = self.t();
                self.emit(&format!("{s} = lshr i32 {b}, 16"));
                let t = self.t();
                self.emit(&format!("{t} = trunc i32 {s} to i16"));
                t
            }
            Dtype::F16 => {
                let h = self.call(rc_f32_to_f16 as *const () as usize, "i64", &[("float", v.to_string())]);
                let t = self.t();
                self.emit(&format!("{t} = trunc i64 {h} to i16"));
                t
            }
        };
        let md = self.access();
        self.emit(&format!("store {st} {x}, {st}* {p}{md}"));
    }

    /// `x` (of LLVM type `t`) as a double.
    fn to_double(&mut self, x: &str, t: &str) -> String {
        if t == "float" {
            let e = self.t();
            self.emit(&format!("{e} = fpext float {x} to double"));
            e
        } else {
            x.to_string()
        }
    }

    fn access(&self) -> String {
        match self.parallel {
            Some((g, _)) => format!(", !llvm.access.group !{g}"),
            None => String::new(),
        }
    }

    /// Rounds `x` (of LLVM type `t`) to `dtype`, in `dtype`'s compute type.
    fn round(&mut self, dtype: Dtype, x: &str, t: &str) -> String {
        match dtype {
            Dtype::F32 if t == "double" => {
                let r = self.t();
                self.emit(&format!("{r} = fptrunc double {x} to float"));
                r
            }
            Dtype::F64 if t == "float" => {
                let r = self.t();
                self.emit(&format!("{r} = fpext float {x} to double"));
                r
            }
            Dtype::F32 | Dtype::F64 => x.to_string(),
            _ => {
                let xd = self.to_double(x, t);
                let r = self.call(
                    rc_round as *const () as usize,
                    "double",
                    &[("i64", code(&DTYPES, &dtype).to_string()), ("double", xd)],
                );
                if compute_ty_is_f32(dtype) {
                    let f = self.t();
                    self.emit(&format!("{f} = fptrunc double {r} to float"));
                    f
                } else {
                    r
                }
            }
        }
    }

    fn values(&mut self) -> Vec<String> {
        let l = self.l;
        let mut vals: Vec<String> = vec![];
        for ins in &l.body {
            let dt = ins.dtype;
            let t = ty(dt);
            let v = match &ins.inst {
                Inst::Load { buf, at } => {
                    let off = self.affine(at);
                    self.load(*buf, &off)
                }
                Inst::Const(c) => lit(interp::round(dt, *c), t == "float"),
                Inst::Index(at) => {
                    let off = self.affine(at);
                    let x = self.t();
                    self.emit(&format!("{x} = sitofp i64 {off} to double"));
                    if matches!(dt, Dtype::I32 | Dtype::I64) {
                        x
                    } else {
                        self.round(dt, &x, "double")
                    }
                }
                Inst::Un(u, a) => {
                    let xt = ty(l.body[*a].dtype);
                    let x = vals[*a].clone();
                    self.unary(*u, &x, xt, dt)
                }
                Inst::Bin(b, x, y, float) => {
                    let xt = ty(l.body[*x].dtype);
                    let (x, y) = (vals[*x].clone(), vals[*y].clone());
                    self.binary(*b, &x, &y, xt, *float, dt)
                }
                Inst::Select(c, a, b) => {
                    let k = self.t();
                    self.emit(&format!("{k} = fcmp une double {}, 0.0", vals[*c]));
                    let r = self.t();
                    self.emit(&format!("{r} = select i1 {k}, {t} {}, {t} {}", vals[*a], vals[*b]));
                    r
                }
                Inst::Cast(a) => {
                    let from = l.body[*a].dtype;
                    let x = vals[*a].clone();
                    self.cast(&x, from, dt)
                }
            };
            vals.push(v);
        }
        vals
    }

    fn cast(&mut self, x: &str, from: Dtype, to: Dtype) -> String {
        let ft = ty(from);
        match to {
            Dtype::Bool => {
                let xd = self.to_double(x, ft);
                let c = self.t();
                self.emit(&format!("{c} = fcmp une double {xd}, 0.0"));
                let r = self.t();
                self.emit(&format!("{r} = select i1 {c}, double 1.0, double 0.0"));
                r
            }
            Dtype::F16 | Dtype::BF16 if ft == "double" => {
                let r = self.call(
                    rc_round as *const () as usize,
                    "double",
                    &[("i64", code(&DTYPES, &to).to_string()), ("double", x.to_string())],
                );
                let f = self.t();
                self.emit(&format!("{f} = fptrunc double {r} to float"));
                f
            }
            _ => self.round(to, x, ft),
        }
    }

    // ---- recipec's f32 exp/erf/gelu (`compiler::math`): the same operation sequence, no
    // fast-math flags (so LLVM neither fuses nor reassociates), vectorized by the loop
    // vectorizer.

    fn f2(&mut self, op: &str, a: &str, b: &str) -> String {
        let r = self.t();
        self.emit(&format!("{r} = {op} float {a}, {b}"));
        r
    }

    /// `if a cc b { x } else { y }` (cc an `fcmp` predicate).
    fn fsel(&mut self, cc: &str, a: &str, b: &str, x: &str, y: &str) -> String {
        let (c, r) = (self.t(), self.t());
        self.emit(&format!("{c} = fcmp {cc} float {a}, {b}"));
        self.emit(&format!("{r} = select i1 {c}, float {x}, float {y}"));
        r
    }

    fn horner(&mut self, x: &str, coefs: &[f32]) -> String {
        let mut p = fk(coefs[0]);
        for &c in &coefs[1..] {
            let m = self.f2("fmul", &p, x);
            p = self.f2("fadd", &m, &fk(c));
        }
        p
    }

    fn pow2_bits(&mut self, e: &str) -> String {
        let (a, b, f) = (self.t(), self.t(), self.t());
        self.emit(&format!("{a} = add i32 {e}, 127"));
        self.emit(&format!("{b} = shl i32 {a}, 23"));
        self.emit(&format!("{f} = bitcast i32 {b} to float"));
        f
    }

    fn exp_f32(&mut self, x: &str) -> String {
        use compiler::math::*;
        let (hi, lo) = (fk(EXP_HI), fk(EXP_LO));
        let xc = self.fsel("ogt", x, &hi, &hi, x);
        let xc = self.fsel("olt", x, &lo, &lo, &xc);
        let t = self.f2("fmul", &xc, &fk(LOG2E));
        let t = self.f2("fadd", &t, &fk(ROUND_MAGIC));
        let n = self.f2("fsub", &t, &fk(ROUND_MAGIC));
        let m1 = self.f2("fmul", &n, &fk(LN2_HI));
        let r = self.f2("fsub", &xc, &m1);
        let m2 = self.f2("fmul", &n, &fk(LN2_LO));
        let r = self.f2("fsub", &r, &m2);
        let z = self.f2("fmul", &r, &r);
        let p = self.horner(&r, &EXP_P);
        let p = self.f2("fmul", &p, &z);
        let p = self.f2("fadd", &p, &r);
        let p = self.f2("fadd", &p, &fk(1.0));
        let (ni, h, d) = (self.t(), self.t(), self.t());
        // `n` is an integer in [-126, 128] unless `x` is NaN; a NaN lane's poison only reaches
        // the arm the final `select` discards. (Plain `fptosi` vectorizes; the saturating
        // intrinsic does not in LLVM 14.)
        self.emit(&format!("{ni} = fptosi float {n} to i32"));
        self.emit(&format!("{h} = ashr i32 {ni}, 1"));
        self.emit(&format!("{d} = sub i32 {ni}, {h}"));
        let s1 = self.pow2_bits(&h);
        let s2 = self.pow2_bits(&d);
        let y = self.f2("fmul", &p, &s1);
        let y = self.f2("fmul", &y, &s2);
        let y = self.fsel("olt", x, &lo, &fk(0.0), &y);
        let y = self.fsel("ogt", x, &hi, &fk(f32::INFINITY), &y);
        self.fsel("uno", x, x, x, &y)
    }

    fn erf_f32(&mut self, x: &str) -> String {
        use compiler::math::*;
        let ax = self.t();
        self.emit(&format!("{ax} = call float @llvm.fabs.f32(float {x})"));
        let z = self.f2("fmul", x, x);
        let small: Vec<f32> = ERF_SMALL.iter().rev().copied().collect();
        let s = self.horner(&z, &small);
        let small = self.f2("fmul", x, &s);
        let pa = self.f2("fmul", &fk(ERF_P), &ax);
        let den = self.f2("fadd", &fk(1.0), &pa);
        let t = self.f2("fdiv", &fk(1.0), &den);
        let a: Vec<f32> = ERF_A.iter().rev().copied().collect();
        let q = self.horner(&t, &a);
        let sq = self.f2("fmul", &ax, &ax);
        let neg = self.t();
        self.emit(&format!("{neg} = fneg float {sq}"));
        let e = self.exp_f32(&neg);
        let tq = self.f2("fmul", &t, &q);
        let tqe = self.f2("fmul", &tq, &e);
        let large = self.f2("fsub", &fk(1.0), &tqe);
        let nl = self.t();
        self.emit(&format!("{nl} = fneg float {large}"));
        let large = self.fsel("olt", x, &fk(0.0), &nl, &large);
        self.fsel("olt", &ax, &fk(0.5), &small, &large)
    }

    fn gelu_f32(&mut self, x: &str) -> String {
        let xs = self.f2("fmul", x, &fk(compiler::math::FRAC_1_SQRT_2));
        let e = self.erf_f32(&xs);
        let e1 = self.f2("fadd", &fk(1.0), &e);
        let hx = self.f2("fmul", &fk(0.5), x);
        self.f2("fmul", &hx, &e1)
    }

    fn unary(&mut self, u: Un, x: &str, xt: &str, dt: Dtype) -> String {
        if dt == Dtype::F32 && xt == "float" {
            match u {
                Un::Exp => return self.exp_f32(x),
                Un::Erf => return self.erf_f32(x),
                Un::Gelu => return self.gelu_f32(x),
                _ => {}
            }
        }
        let sfx = if xt == "float" { "f32" } else { "f64" };
        let r = self.t();
        let native = match u {
            Un::Neg => Some(format!("{r} = fneg {xt} {x}")),
            Un::Abs => Some(format!("{r} = call {xt} @llvm.fabs.{sfx}({xt} {x})")),
            Un::Sqrt => Some(format!("{r} = call {xt} @llvm.sqrt.{sfx}({xt} {x})")),
            Un::Floor => Some(format!("{r} = call {xt} @llvm.floor.{sfx}({xt} {x})")),
            Un::Ceil => Some(format!("{r} = call {xt} @llvm.ceil.{sfx}({xt} {x})")),
            Un::Round => Some(format!("{r} = call {xt} @llvm.roundeven.{sfx}({xt} {x})")),
            Un::StopGradient => Some(format!("{r} = fadd {xt} {x}, -0.0")),
            Un::Relu => {
                let c = self.t();
                self.emit(&format!("{c} = fcmp ogt {xt} {x}, 0.0"));
                Some(format!("{r} = select i1 {c}, {xt} {x}, {xt} 0.0"))
            }
            _ => None,
        };
        match native {
            Some(line) => {
                self.emit(&line);
                match dt {
                    Dtype::F32 | Dtype::F64 => r,
                    _ => self.round(dt, &r, xt),
                }
            }
            None => {
                let xd = self.to_double(x, xt);
                let c = self.call(
                    rc_un as *const () as usize,
                    "double",
                    &[("i64", code(&UNS, &u).to_string()), ("double", xd)],
                );
                self.round(dt, &c, "double")
            }
        }
    }

    /// NaN-propagating maximum (or minimum) of `x` and `y` (what Cranelift's `fmax` does;
    /// LLVM 14's x86 backend cannot select `llvm.maximum`).
    fn minmax(&mut self, max: bool, x: &str, y: &str, t: &str) -> String {
        let (uno, c, sel, r) = (self.t(), self.t(), self.t(), self.t());
        self.emit(&format!("{uno} = fcmp uno {t} {x}, {y}"));
        self.emit(&format!("{c} = fcmp {} {t} {x}, {y}", if max { "ogt" } else { "olt" }));
        self.emit(&format!("{sel} = select i1 {c}, {t} {x}, {t} {y}"));
        self.emit(&format!("{r} = select i1 {uno}, {t} 0x7FF8000000000000, {t} {sel}"));
        r
    }

    fn binary(&mut self, op: Bin, x: &str, y: &str, xt: &str, float: bool, dt: Dtype) -> String {
        let cmp = match op {
            Bin::Eq => Some("oeq"),
            Bin::Ne => Some("une"),
            Bin::Lt => Some("olt"),
            Bin::Le => Some("ole"),
            Bin::Gt => Some("ogt"),
            Bin::Ge => Some("oge"),
            _ => None,
        };
        if let Some(cc) = cmp {
            let c = self.t();
            self.emit(&format!("{c} = fcmp {cc} {xt} {x}, {y}"));
            let r = self.t();
            self.emit(&format!("{r} = select i1 {c}, double 1.0, double 0.0"));
            return r;
        }
        if matches!(op, Bin::And | Bin::Or) {
            let (a, b) = (self.t(), self.t());
            self.emit(&format!("{a} = fcmp une double {x}, 0.0"));
            self.emit(&format!("{b} = fcmp une double {y}, 0.0"));
            let c = self.t();
            self.emit(&format!("{c} = {} i1 {a}, {b}", if op == Bin::And { "and" } else { "or" }));
            let r = self.t();
            self.emit(&format!("{r} = select i1 {c}, double 1.0, double 0.0"));
            return r;
        }
        let r = self.t();
        let native = match op {
            Bin::Add => Some(format!("{r} = fadd {xt} {x}, {y}")),
            Bin::Sub => Some(format!("{r} = fsub {xt} {x}, {y}")),
            Bin::Mul => Some(format!("{r} = fmul {xt} {x}, {y}")),
            Bin::Div if float => Some(format!("{r} = fdiv {xt} {x}, {y}")),
            Bin::Min | Bin::Max => {
                let m = self.minmax(op == Bin::Max, x, y, xt);
                Some(format!("{r} = fadd {xt} {m}, -0.0"))
            }
            _ => None,
        };
        match native {
            Some(line) => {
                self.emit(&line);
                match dt {
                    Dtype::F32 | Dtype::F64 => r,
                    Dtype::I32 | Dtype::I64 if matches!(op, Bin::Min | Bin::Max) => r,
                    _ => self.round(dt, &r, xt),
                }
            }
            None => {
                let (xd, yd) = (self.to_double(x, xt), self.to_double(y, xt));
                let c = self.call(
                    rc_bin as *const () as usize,
                    "double",
                    &[
                        ("i64", code(&BINS, &op).to_string()),
                        ("double", xd),
                        ("double", yd),
                        ("i64", (float as i64).to_string()),
                    ],
                );
                self.round(dt, &c, "double")
            }
        }
    }
}
