//! CPU code generation for the kernel IR's loops: Cranelift JIT (the default backend).
//!
//! Input: a scheduled [`Program`]. Output: one native function per [`Loop`] kernel,
//! `fn(bufs: *const *mut u8, lo: i64, hi: i64)`, which runs the loop nest for the outermost
//! indices `lo..hi` (the runtime splits that range across threads). `bufs[b]` is the base
//! address of buffer `b`; the runtime validates every buffer's size before a call, so the
//! generated code does no bounds checks.
//!
//! Numerics follow `compiler::kernel` exactly (f32 compute for f32/f16/bf16, f64 for the
//! rest, rounding after every op, f64 accumulators, transcendentals through the
//! interpreter's f64 functions), so elementwise results equal the interpreter's bits.
//! The innermost loop is vectorized 4-wide (128-bit, what Cranelift emits) when every
//! instruction is an f32 op Cranelift has as a vector instruction and every access walks
//! the innermost index contiguously or not at all.

use compiler::interp;
use compiler::ir::{Bin, Un};
use compiler::kernel::{Affine, Inst, Kernel, Loop, Program, StoreVal};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, ConstantData, Endianness, InstBuilder, MemFlagsData, Signature, Type, UserFuncName, Value,
};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use lang::types::Dtype;
use red_ops::*;

/// A compiled loop: `bufs`, then the outermost index range.
pub type LoopFn = unsafe extern "C" fn(bufs: *const *mut u8, lo: i64, hi: i64);

#[cfg(feature = "llvm")]
pub mod llvm;

/// The native code of a program's loops. Keeps the JIT memory alive.
pub struct Compiled {
    _module: Option<JITModule>,
    #[cfg(feature = "llvm")]
    _llvm: Option<llvm::Engine>,
    /// Per kernel: the function of a loop kernel, `None` for the others.
    pub loops: Vec<Option<LoopFn>>,
    /// Per kernel: whether the loop was vectorized.
    pub vectorized: Vec<bool>,
}

// SAFETY: after `finalize_definitions` the module is only kept to own the code memory; the
// function pointers are plain code and may be called from any thread.
unsafe impl Send for Compiled {}
unsafe impl Sync for Compiled {}

mod red_ops {
    pub use compiler::ir::Red;
}

const UNS: [Un; 23] = [
    Un::Neg,
    Un::Not,
    Un::Exp,
    Un::Log,
    Un::Log1p,
    Un::Sqrt,
    Un::Rsqrt,
    Un::Tanh,
    Un::Sigmoid,
    Un::Softplus,
    Un::Gelu,
    Un::GeluTanh,
    Un::Silu,
    Un::Erf,
    Un::Cos,
    Un::Sin,
    Un::Abs,
    Un::Sign,
    Un::Relu,
    Un::Floor,
    Un::Ceil,
    Un::Round,
    Un::StopGradient,
];
const BINS: [Bin; 16] = [
    Bin::Add,
    Bin::Sub,
    Bin::Mul,
    Bin::Div,
    Bin::Rem,
    Bin::Pow,
    Bin::Min,
    Bin::Max,
    Bin::Eq,
    Bin::Ne,
    Bin::Lt,
    Bin::Le,
    Bin::Gt,
    Bin::Ge,
    Bin::And,
    Bin::Or,
];
const DTYPES: [Dtype; 7] = [Dtype::Bool, Dtype::I32, Dtype::I64, Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::F64];

fn code<T: PartialEq>(table: &[T], x: &T) -> i64 {
    table.iter().position(|t| t == x).expect("in table") as i64
}

extern "C" fn rc_un(code: i64, x: f64) -> f64 {
    interp::unary(UNS[code as usize], x)
}
extern "C" fn rc_bin(code: i64, x: f64, y: f64, float: i64) -> f64 {
    interp::binary(BINS[code as usize], x, y, float != 0)
}
extern "C" fn rc_round(dtype: i64, x: f64) -> f64 {
    interp::round(DTYPES[dtype as usize], x)
}
extern "C" fn rc_f16_to_f32(bits: i64) -> f32 {
    f16_to_f32(bits as u16)
}
extern "C" fn rc_f32_to_f16(x: f32) -> i64 {
    f32_to_f16(x) as i64
}

/// IEEE binary16 bits to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as f32;
    let v = match exp {
        0 => man * 2f32.powi(-24),
        31 => {
            if man == 0.0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        }
        e => (1.0 + man / 1024.0) * 2f32.powi(e - 15),
    };
    sign * v
}

/// f32 that is already a binary16 value (after rounding) to its bits.
pub fn f32_to_f16(x: f32) -> u16 {
    let sign: u16 = if x.is_sign_negative() { 0x8000 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return 0x7e00;
    }
    if a.is_infinite() || a > 65504.0 {
        return sign | 0x7c00;
    }
    if a < 2f32.powi(-14) {
        return sign | (a / 2f32.powi(-24)).round() as u16;
    }
    let e = a.log2().floor() as i32;
    let (e, m) = {
        let m = a / 2f32.powi(e);
        if m >= 2.0 {
            (e + 1, a / 2f32.powi(e + 1))
        } else if m < 1.0 {
            (e - 1, a / 2f32.powi(e - 1))
        } else {
            (e, m)
        }
    };
    sign | (((e + 15) as u16) << 10) | ((m - 1.0) * 1024.0).round() as u16
}

pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 that is already a bfloat16 value to its bits.
pub fn f32_to_bf16(x: f32) -> u16 {
    (x.to_bits() >> 16) as u16
}

/// The identity a reduction's f64 accumulator starts from.
fn red_init(op: Red) -> f64 {
    match op {
        Red::Sum => 0.0,
        Red::Prod => 1.0,
        Red::Max => f64::NEG_INFINITY,
        _ => f64::INFINITY,
    }
}

fn compute_ty(d: Dtype) -> Type {
    match d {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => types::F32,
        _ => types::F64,
    }
}

fn is_int(d: Dtype) -> bool {
    matches!(d, Dtype::I32 | Dtype::I64)
}

/// Compiles every loop kernel of `p`.
pub fn compile(p: &Program) -> Result<Compiled, String> {
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").map_err(|e| e.to_string())?;
    flags.set("use_colocated_libcalls", "false").map_err(|e| e.to_string())?;
    flags.set("is_pic", "false").map_err(|e| e.to_string())?;
    let isa = cranelift_native::builder()
        .map_err(|e| format!("this CPU is not supported by Cranelift: {e}"))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| e.to_string())?;
    let mut module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let mut ids = vec![];
    let mut vectorized = vec![];
    for (ki, k) in p.kernels.iter().enumerate() {
        let Kernel::Loop(l) = k else {
            ids.push(None);
            vectorized.push(false);
            continue;
        };
        let ptr = module.target_config().pointer_type();
        let mut sig = module.make_signature();
        sig.params.push(AbiParam::new(ptr));
        sig.params.push(AbiParam::new(types::I64));
        sig.params.push(AbiParam::new(types::I64));
        let id = module.declare_function(&format!("k{ki}"), Linkage::Local, &sig).map_err(|e| e.to_string())?;
        ctx.func.signature = sig;
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        let tc = module.target_config();
        let vec = {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            let v = Gen::new(&mut b, l, p).emit();
            b.seal_all_blocks();
            b.finalize(tc);
            v
        };
        module.define_function(id, &mut ctx).map_err(|e| format!("kernel k{ki}: {e:?}"))?;
        module.clear_context(&mut ctx);
        ids.push(Some(id));
        vectorized.push(vec);
    }
    module.finalize_definitions().map_err(|e| e.to_string())?;
    let loops = ids
        .into_iter()
        .map(|id| {
            id.map(|id| {
                let f = module.get_finalized_function(id);
                // SAFETY: the function was declared with the `LoopFn` signature above.
                unsafe { std::mem::transmute::<*const u8, LoopFn>(f) }
            })
        })
        .collect();
    Ok(Compiled {
        _module: Some(module),
        #[cfg(feature = "llvm")]
        _llvm: None,
        loops,
        vectorized,
    })
}

/// Compiles every loop kernel of `p` with LLVM (O3 for the host CPU).
#[cfg(feature = "llvm")]
pub fn compile_llvm(p: &Program) -> Result<Compiled, String> {
    let (engine, loops) = llvm::compile(p)?;
    let n = loops.len();
    Ok(Compiled { _module: None, _llvm: Some(engine), loops, vectorized: vec![false; n] })
}

#[cfg(feature = "llvm")]
fn compute_ty_is_f32(d: Dtype) -> bool {
    compute_ty(d) == types::F32
}

struct Gen<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    l: &'a Loop,
    p: &'a Program,
    bases: Vec<Option<Value>>,
    /// Every distinct affine of the loop, and its running value at the current level.
    affines: Vec<Affine>,
    bufs: Value,
    /// Loop-invariant values (computed once before the loops): scalar and 4-lane forms.
    inv: Vec<bool>,
    inv_s: Vec<Option<Value>>,
    inv_v: Vec<Option<Value>>,
    /// The dim whose neighbouring points are the 4 lanes: the innermost one for elementwise
    /// loops, the innermost output dim for reductions jammed across lanes.
    vaxis: usize,
    /// Lane values fixed for one jam group (they do not move with the reduced dims).
    row_v: Vec<Option<Value>>,
    /// Whether jammed reductions run as lanes (`jam_vectorizable`).
    jam_vec: bool,
}

/// Outputs a reduction loop computes side by side (unroll and jam), in both backends.
pub(crate) const JAM: i64 = 4;

/// The arithmetic per element of a loop body (ops other than loads, constants and indices).
/// Jammed reductions run as lanes from 2 up: below, gathering a row's element into each lane
/// costs more than it saves (measured: a plain row maximum ran 1.5x slower as lanes).
pub fn jam_work(l: &Loop) -> usize {
    l.body.iter().filter(|i| matches!(i.inst, Inst::Un(..) | Inst::Bin(..) | Inst::Select(..) | Inst::Cast(..))).count()
}

/// Which body values stay fixed while loop dims `from..` move: loads (and, with `index`,
/// indices) with no coefficient on those dims, constants, and ops on fixed values.
fn fixed_while(l: &Loop, from: usize, index: bool) -> Vec<bool> {
    let mut f = vec![false; l.body.len()];
    for (v, i) in l.body.iter().enumerate() {
        f[v] = match &i.inst {
            Inst::Load { at, .. } => at.coef[from..].iter().all(|c| *c == 0),
            Inst::Index(at) => index && at.coef[from..].iter().all(|c| *c == 0),
            Inst::Const(_) => true,
            Inst::Un(_, a) | Inst::Cast(a) => f[*a],
            Inst::Bin(_, a, b2, _) => f[*a] && f[*b2],
            Inst::Select(c, a, b2) => f[*c] && f[*a] && f[*b2],
        };
    }
    f
}

fn aff_id(affines: &mut Vec<Affine>, a: &Affine) -> usize {
    match affines.iter().position(|x| x == a) {
        Some(i) => i,
        None => {
            affines.push(a.clone());
            affines.len() - 1
        }
    }
}

impl<'a, 'b> Gen<'a, 'b> {
    fn new(b: &'a mut FunctionBuilder<'b>, l: &'a Loop, p: &'a Program) -> Self {
        let mut affines = vec![];
        for i in &l.body {
            if let Inst::Load { at, .. } | Inst::Index(at) = &i.inst {
                aff_id(&mut affines, at);
            }
        }
        for s in &l.stores {
            aff_id(&mut affines, &s.at);
        }
        let dummy = Value::from_u32(0);
        // Invariant: loads that no loop index moves, constants, and ops on invariants.
        let inv = fixed_while(l, 0, false);
        let n = l.body.len();
        Gen {
            b,
            l,
            p,
            bases: vec![None; p.buffers.len()],
            affines,
            bufs: dummy,
            inv,
            inv_s: vec![None; n],
            inv_v: vec![None; n],
            vaxis: l.dims.len() - 1,
            row_v: vec![None; n],
            jam_vec: false,
        }
    }

    fn aid(&self, a: &Affine) -> usize {
        self.affines.iter().position(|x| x == a).expect("affine collected")
    }

    /// Whether the innermost loop can run 4 lanes at a time.
    fn vectorizable(&self) -> bool {
        let l = self.l;
        if l.reduce.is_some() {
            return false;
        }
        let last = l.dims.len() - 1;
        if l.dims[last] < 8 {
            return false;
        }
        self.lanes_ok(last, false)
            && l.stores.iter().all(|s| {
                self.p.buffers[s.buf].dtype == Dtype::F32
                    && s.at.coef[last] == 1
                    && matches!(s.val, StoreVal::Val(v) if l.body[v].dtype == Dtype::F32)
            })
    }

    /// Whether a reduction can compute its JAM jammed outputs as the 4 lanes of vectors:
    /// each lane still has its own f64 accumulator in the interpreter's order (two f64x2
    /// accumulators), so the results are the scalar code's bits; the per-element work (the
    /// exp of a log-sum-exp, the compare and select of a one-hot pick) runs 4 outputs at once.
    fn jam_vectorizable(&self) -> bool {
        let l = self.l;
        let Some(r) = &l.reduce else { return false };
        let outer = l.outer_dims();
        outer > 0
            && l.dims[outer - 1] >= JAM as usize
            && outer < l.dims.len()
            && matches!(r.op, Red::Sum | Red::Prod | Red::Max | Red::Min)
            && l.body[r.value].dtype == Dtype::F32
            && jam_work(l) >= 2
            && self.lanes_ok(outer - 1, true)
    }

    /// Whether every instruction has a 4-lane form with lanes along dim `vaxis` (loads with
    /// any stride along it when `strided`, else only 0 or 1).
    fn lanes_ok(&self, vaxis: usize, strided: bool) -> bool {
        let l = self.l;
        let last = vaxis;
        // A compare's lane mask may only be a select's condition.
        let mask_only = |v: usize| {
            l.body.iter().all(|u| match &u.inst {
                Inst::Select(_, a, b) => *a != v && *b != v,
                Inst::Un(_, a) | Inst::Cast(a) => *a != v,
                Inst::Bin(_, a, b, _) => *a != v && *b != v,
                _ => true,
            }) && l.stores.iter().all(|s| s.val != StoreVal::Val(v))
        };
        // An i32 value may only be compared with another i32 value (integer lanes, then a mask).
        let compared_only = |v: usize| {
            l.body.iter().all(|u| match &u.inst {
                Inst::Bin(b, x, y, _) if *x == v || *y == v => {
                    matches!(b, Bin::Lt | Bin::Le | Bin::Gt | Bin::Ge | Bin::Eq | Bin::Ne)
                        && l.body[*x].dtype == Dtype::I32
                        && l.body[*y].dtype == Dtype::I32
                }
                Inst::Select(c, a, b) => *c != v && *a != v && *b != v,
                Inst::Un(_, a) | Inst::Cast(a) => *a != v,
                _ => true,
            }) && l.stores.iter().all(|s| s.val != StoreVal::Val(v))
        };
        for (v, i) in l.body.iter().enumerate() {
            let ok = match &i.inst {
                Inst::Load { buf, at } => {
                    let bd = self.p.buffers[*buf].dtype;
                    let unit = at.coef[last] == 0 || at.coef[last] == 1;
                    let gathered = unit || strided;
                    (i.dtype == Dtype::F32 && bd == Dtype::F32 && gathered)
                        || (bd == Dtype::Bool && unit && mask_only(v))
                        || (i.dtype == Dtype::I32 && bd == Dtype::I32 && gathered && compared_only(v))
                }
                Inst::Index(at) => {
                    // Every value of the index fits i32 lanes.
                    let span: i64 = l.dims.iter().zip(&at.coef).map(|(d, c)| (*d as i64) * c.abs()).sum();
                    i.dtype == Dtype::I32 && compared_only(v) && span + at.c.abs() < 1 << 30
                }
                Inst::Const(_) => i.dtype == Dtype::F32,
                Inst::Un(u, _) => {
                    i.dtype == Dtype::F32
                        && (matches!(u, Un::Neg | Un::Abs | Un::Sqrt | Un::StopGradient | Un::Relu)
                            || compiler::math::has_f32(*u))
                }
                Inst::Bin(b, x, y, _) => {
                    let f32ops = l.body[*x].dtype == Dtype::F32 && l.body[*y].dtype == Dtype::F32;
                    match b {
                        Bin::Add | Bin::Sub | Bin::Mul | Bin::Div | Bin::Min | Bin::Max => i.dtype == Dtype::F32,
                        Bin::Lt | Bin::Le | Bin::Gt | Bin::Ge | Bin::Eq | Bin::Ne => {
                            let i32ops = l.body[*x].dtype == Dtype::I32 && l.body[*y].dtype == Dtype::I32;
                            (f32ops || i32ops) && mask_only(v)
                        }
                        _ => false,
                    }
                }
                Inst::Select(c, _, _) => {
                    i.dtype == Dtype::F32
                        && match &l.body[*c].inst {
                            Inst::Bin(Bin::Lt | Bin::Le | Bin::Gt | Bin::Ge | Bin::Eq | Bin::Ne, ..) => true,
                            Inst::Load { buf, .. } => self.p.buffers[*buf].dtype == Dtype::Bool,
                            _ => false,
                        }
                }
                Inst::Cast(_) => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }

    fn emit(mut self) -> bool {
        let block = self.b.create_block();
        self.b.append_block_params_for_function_params(block);
        self.b.switch_to_block(block);
        let params = self.b.block_params(block).to_vec();
        self.bufs = params[0];
        let (lo, hi) = (params[1], params[2]);
        let mut used: Vec<usize> = self
            .l
            .body
            .iter()
            .filter_map(|i| match &i.inst {
                Inst::Load { buf, .. } => Some(*buf),
                _ => None,
            })
            .chain(self.l.stores.iter().map(|s| s.buf))
            .collect();
        used.sort();
        used.dedup();
        for b in used {
            let v = self.b.ins().load(types::I64, MemFlagsData::trusted(), self.bufs, (b * 8) as i32);
            self.bases[b] = Some(v);
        }
        let partial: Vec<Value> = self.affines.iter().map(|a| self.b.ins().iconst(types::I64, a.c)).collect();
        let vec = self.vectorizable();
        self.jam_vec = self.jam_vectorizable();
        self.hoist(&partial, vec || self.jam_vec);
        let outer = self.l.outer_dims();
        if outer == 0 {
            self.reduction(partial);
        } else {
            self.level(0, Some((lo, hi)), partial, vec);
        }
        self.b.ins().return_(&[]);
        vec || self.jam_vec
    }

    /// Computes the loop-invariant values once, before the loops (and their 4-lane splats).
    fn hoist(&mut self, partial: &[Value], vec: bool) {
        if !self.inv.iter().any(|x| *x) {
            return;
        }
        let inv = self.inv.clone();
        let vals = self.values_where(partial, false, Some(&inv));
        for v in 0..self.l.body.len() {
            if !self.inv[v] {
                continue;
            }
            self.inv_s[v] = Some(vals[v]);
            if vec {
                let dt = self.l.body[v].dtype;
                self.inv_v[v] = Some(if dt == Dtype::F32 {
                    self.b.ins().splat(types::F32X4, vals[v])
                } else if dt == Dtype::I32 {
                    // An i32 value (exact in f64) as integer lanes, for integer compares.
                    let x = self.b.ins().fcvt_to_sint_sat(types::I32, vals[v]);
                    self.b.ins().splat(types::I32X4, x)
                } else {
                    // A condition (0 or 1 in f64) as a lane mask.
                    let z = self.b.ins().f64const(0.0);
                    let c = self.b.ins().fcmp(FloatCC::NotEqual, vals[v], z);
                    let m = self.b.ins().bmask(types::I32, c);
                    self.b.ins().splat(types::I32X4, m)
                });
            }
        }
    }

    fn advance(&mut self, partial: &[Value], d: usize, i: Value) -> Vec<Value> {
        partial
            .iter()
            .enumerate()
            .map(|(a, p)| {
                let c = self.affines[a].coef[d];
                if c == 0 {
                    *p
                } else {
                    let t = self.b.ins().imul_imm_s(i, c);
                    self.b.ins().iadd(*p, t)
                }
            })
            .collect()
    }

    /// A counted loop `start..end` step `step`; `body` gets the index.
    fn counted(&mut self, start: Value, end: Value, step: i64, body: &mut dyn FnMut(&mut Self, Value)) -> Value {
        let var: Variable = self.b.declare_var(types::I64);
        self.b.def_var(var, start);
        let header = self.b.create_block();
        let body_b = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(var);
        let last = self.b.ins().iadd_imm_s(i, step - 1);
        let c = self.b.ins().icmp(IntCC::SignedLessThan, last, end);
        self.b.ins().brif(c, body_b, &[], exit, &[]);
        self.b.switch_to_block(body_b);
        let i = self.b.use_var(var);
        body(self, i);
        let i = self.b.use_var(var);
        let n = self.b.ins().iadd_imm_s(i, step);
        self.b.def_var(var, n);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(exit);
        self.b.use_var(var)
    }

    fn level(&mut self, d: usize, range: Option<(Value, Value)>, partial: Vec<Value>, vec: bool) {
        let l = self.l;
        let (start, end) = match range {
            Some(r) => r,
            None => (self.b.ins().iconst(types::I64, 0), self.b.ins().iconst(types::I64, l.dims[d] as i64)),
        };
        let last = d + 1 == l.outer_dims();
        if last && l.reduce.is_none() && vec {
            let after = self.counted(start, end, 4, &mut |g, i| {
                let part = g.advance(&partial, d, i);
                g.body(&part, true);
            });
            self.counted(after, end, 1, &mut |g, i| {
                let part = g.advance(&partial, d, i);
                g.body(&part, false);
            });
            return;
        }
        if last && l.reduce.is_some() && l.dims[d] >= JAM as usize {
            // Unroll and jam: JAM neighbouring outputs reduce side by side, each with its own
            // accumulator in its own (the interpreter's) order, so the additions of different
            // outputs overlap instead of waiting on one dependency chain, and a column
            // reduction reads JAM neighbouring elements of each row at once.
            let after = self.counted(start, end, JAM, &mut |g, i| {
                let parts: Vec<Vec<Value>> = (0..JAM)
                    .map(|k| {
                        let ik = g.b.ins().iadd_imm_s(i, k);
                        g.advance(&partial, d, ik)
                    })
                    .collect();
                if g.jam_vec {
                    g.reductions_lanes(parts);
                } else {
                    g.reductions(parts);
                }
            });
            self.counted(after, end, 1, &mut |g, i| {
                let part = g.advance(&partial, d, i);
                g.reduction(part);
            });
            return;
        }
        self.counted(start, end, 1, &mut |g, i| {
            let part = g.advance(&partial, d, i);
            if last {
                if g.l.reduce.is_some() {
                    g.reduction(part);
                } else {
                    g.body(&part, false);
                }
            } else {
                g.level(d + 1, None, part, vec);
            }
        });
    }

    /// The reduced dims with an f64 accumulator, then the store of the result.
    fn reduction(&mut self, partial: Vec<Value>) {
        self.reductions(vec![partial]);
    }

    /// Several outputs' reductions in one pass over the reduced dims (one f64 accumulator
    /// each, every accumulator in the interpreter's order), then their stores.
    fn reductions(&mut self, partials: Vec<Vec<Value>>) {
        let r = self.l.reduce.clone().expect("reduction");
        let init = red_init(r.op);
        let accs: Vec<Variable> = partials
            .iter()
            .map(|_| {
                let acc = self.b.declare_var(types::F64);
                let z = self.b.ins().f64const(init);
                self.b.def_var(acc, z);
                acc
            })
            .collect();
        let outer = self.l.outer_dims();
        self.red_walk(outer, partials.clone(), &mut |g, parts| {
            for (part, acc) in parts.iter().zip(&accs) {
                g.accumulate(part, *acc, &r);
            }
        });
        for (partial, acc) in partials.iter().zip(&accs) {
            let a = self.b.use_var(*acc);
            let v = self.round(r.dtype, a, types::F64);
            for s in &self.l.stores {
                if s.val == StoreVal::Acc {
                    let at = self.aid(&s.at);
                    self.store(s.buf, partial[at], v, r.dtype, false);
                }
            }
        }
    }

    /// The JAM (= 4) jammed outputs' reductions as the lanes of vectors (`jam_vectorizable`):
    /// values along the reduced dims computed 4 outputs at a time, each lane accumulated in
    /// f64 in the interpreter's order (two f64x2 accumulators), then every lane stored as the
    /// scalar path would store it.
    fn reductions_lanes(&mut self, parts: Vec<Vec<Value>>) {
        let r = self.l.reduce.clone().expect("reduction");
        let outer = self.l.outer_dims();
        self.vaxis = outer - 1;
        // Values that do not move with the reduced dims: once per group, not per element.
        let fixed = fixed_while(self.l, outer, true);
        if fixed.iter().any(|f| *f) {
            let vals = self.values_where(&parts[0], true, Some(&fixed));
            for (v, f) in fixed.iter().enumerate() {
                if *f && self.inv_v[v].is_none() {
                    self.row_v[v] = Some(vals[v]);
                }
            }
        }
        let init = self.b.ins().f64const(red_init(r.op));
        let init = self.b.ins().splat(types::F64X2, init);
        let accs = [self.b.declare_var(types::F64X2), self.b.declare_var(types::F64X2)];
        for a in accs {
            self.b.def_var(a, init);
        }
        self.red_walk(outer, vec![parts[0].clone()], &mut |g, parts| g.accumulate_lanes(&parts[0], accs, &r));
        self.row_v.iter_mut().for_each(|v| *v = None);
        self.vaxis = self.l.dims.len() - 1;
        for (k, partial) in parts.iter().enumerate() {
            let acc = self.b.use_var(accs[k / 2]);
            let a = self.b.ins().extractlane(acc, (k % 2) as u8);
            let v = self.round(r.dtype, a, types::F64);
            for s in &self.l.stores {
                if s.val == StoreVal::Acc {
                    let at = self.aid(&s.at);
                    self.store(s.buf, partial[at], v, r.dtype, false);
                }
            }
        }
    }

    fn accumulate_lanes(&mut self, part: &[Value], accs: [Variable; 2], r: &compiler::kernel::Reduction) {
        let vals = self.values(part, true);
        let x = vals[r.value];
        // Lanes 0, 1 and lanes 2, 3 widened to f64 (exact).
        let lo = self.b.ins().fvpromote_low(x);
        let le = MemFlagsData::new().with_endianness(Endianness::Little);
        let bytes = self.b.ins().bitcast(types::I8X16, le, x);
        let mask: Vec<u8> = (8..16).chain(8..16).collect();
        let mask = self.b.func.dfg.immediates.push(ConstantData::from(mask));
        let high = self.b.ins().shuffle(bytes, bytes, mask);
        let high = self.b.ins().bitcast(types::F32X4, le, high);
        let hi = self.b.ins().fvpromote_low(high);
        for (acc, x) in accs.into_iter().zip([lo, hi]) {
            self.combine(acc, x, r.op);
        }
    }

    /// `acc = acc op x` (sum, product, NaN-propagating max or min; scalars or lanes).
    fn combine(&mut self, acc: Variable, x: Value, op: Red) {
        let a = self.b.use_var(acc);
        let n = match op {
            Red::Sum => self.b.ins().fadd(a, x),
            Red::Prod => self.b.ins().fmul(a, x),
            Red::Max => self.b.ins().fmax(a, x),
            _ => self.b.ins().fmin(a, x),
        };
        self.b.def_var(acc, n);
    }

    /// Loops over the reduced dims `d..`, calling `at` with the partial offsets of every
    /// output at each point in order (once, if every reduced dim was coalesced away).
    fn red_walk(&mut self, d: usize, partials: Vec<Vec<Value>>, at: &mut dyn FnMut(&mut Self, &[Vec<Value>])) {
        if d == self.l.dims.len() {
            at(self, &partials);
            return;
        }
        let zero = self.b.ins().iconst(types::I64, 0);
        let end = self.b.ins().iconst(types::I64, self.l.dims[d] as i64);
        self.counted(zero, end, 1, &mut |g, i| {
            let parts: Vec<Vec<Value>> = partials.iter().map(|p| g.advance(p, d, i)).collect();
            g.red_walk(d + 1, parts, at);
        });
    }

    fn accumulate(&mut self, part: &[Value], acc: Variable, r: &compiler::kernel::Reduction) {
        let vals = self.values(part, false);
        let x = vals[r.value];
        let x = if self.b.func.dfg.value_type(x) == types::F32 { self.b.ins().fpromote(types::F64, x) } else { x };
        self.combine(acc, x, r.op);
    }

    fn addr(&mut self, buf: usize, off: Value, size: i64) -> Value {
        let base = self.bases[buf].expect("buffer base loaded");
        let bytes = self.b.ins().imul_imm_s(off, size);
        self.b.ins().iadd(base, bytes)
    }

    fn load(&mut self, buf: usize, off: Value, lanes: bool, stride: i64) -> Value {
        let d = self.p.buffers[buf].dtype;
        let size = compiler::plan::dtype_bytes(d) as i64;
        let a = self.addr(buf, off, size);
        let m = MemFlagsData::trusted();
        if lanes {
            if d == Dtype::Bool && stride == 0 {
                // A broadcast condition: the lane mask of one byte.
                let x = self.b.ins().uload8(types::I32, m, a, 0);
                let x = self.b.ins().bmask(types::I32, x);
                return self.b.ins().splat(types::I32X4, x);
            }
            if d == Dtype::Bool {
                // Four consecutive conditions (one byte each, 0 or 1): widen the bytes to
                // 32-bit lanes and compare with zero for the lane masks.
                let x = self.b.ins().load(types::I32, m, a, 0);
                let v = self.b.ins().scalar_to_vector(types::I32X4, x);
                let le = MemFlagsData::new().with_endianness(Endianness::Little);
                let v = self.b.ins().bitcast(types::I8X16, le, v);
                let v = self.b.ins().uwiden_low(v);
                let v = self.b.ins().uwiden_low(v);
                let zero = self.b.ins().iconst(types::I32, 0);
                let zero = self.b.ins().splat(types::I32X4, zero);
                return self.b.ins().icmp(IntCC::NotEqual, v, zero);
            }
            let (st, vt) = if d == Dtype::I32 { (types::I32, types::I32X4) } else { (types::F32, types::F32X4) };
            // Integer lanes are only compared (see `lanes_ok`).
            if stride == 1 {
                return self.b.ins().load(vt, m, a, 0);
            }
            let x = self.b.ins().load(st, m, a, 0);
            if stride == 0 {
                return self.b.ins().splat(vt, x);
            }
            // Lanes `stride` elements apart (the rows of a jammed reduction).
            let mut v = self.b.ins().scalar_to_vector(vt, x);
            for lane in 1..4u8 {
                let off = stride * size * lane as i64;
                let y = match i32::try_from(off) {
                    Ok(o) => self.b.ins().load(st, m, a, o),
                    Err(_) => {
                        let a2 = self.b.ins().iadd_imm_s(a, off);
                        self.b.ins().load(st, m, a2, 0)
                    }
                };
                v = self.b.ins().insertlane(v, y, lane);
            }
            return v;
        }
        match d {
            Dtype::F32 => self.b.ins().load(types::F32, m, a, 0),
            Dtype::F64 => self.b.ins().load(types::F64, m, a, 0),
            Dtype::I32 => {
                let x = self.b.ins().sload32(m, a, 0);
                self.b.ins().fcvt_from_sint(types::F64, x)
            }
            Dtype::I64 => {
                let x = self.b.ins().load(types::I64, m, a, 0);
                self.b.ins().fcvt_from_sint(types::F64, x)
            }
            Dtype::Bool => {
                let x = self.b.ins().uload8(types::I64, m, a, 0);
                self.b.ins().fcvt_from_uint(types::F64, x)
            }
            Dtype::BF16 => {
                let x = self.b.ins().uload16(types::I32, m, a, 0);
                let x = self.b.ins().ishl_imm_u(x, 16);
                self.b.ins().bitcast(types::F32, MemFlagsData::new(), x)
            }
            Dtype::F16 => {
                let x = self.b.ins().uload16(types::I64, m, a, 0);
                self.call(rc_f16_to_f32 as *const u8, &[types::I64], types::F32, &[x])
            }
        }
    }

    /// Stores `v` (in the compute type of `dtype`) into `buf` converted to its storage type.
    fn store(&mut self, buf: usize, off: Value, v: Value, _dtype: Dtype, lanes: bool) {
        let d = self.p.buffers[buf].dtype;
        let size = compiler::plan::dtype_bytes(d) as i64;
        let a = self.addr(buf, off, size);
        let m = MemFlagsData::trusted();
        if lanes {
            self.b.ins().store(m, v, a, 0);
            return;
        }
        match d {
            Dtype::F32 | Dtype::F64 => {
                self.b.ins().store(m, v, a, 0);
            }
            Dtype::I32 => {
                let x = self.b.ins().fcvt_to_sint_sat(types::I64, v);
                self.b.ins().istore32(m, x, a, 0);
            }
            Dtype::I64 => {
                let x = self.b.ins().fcvt_to_sint_sat(types::I64, v);
                self.b.ins().store(m, x, a, 0);
            }
            Dtype::Bool => {
                let z = self.b.ins().f64const(0.0);
                let c = self.b.ins().fcmp(FloatCC::NotEqual, v, z);
                self.b.ins().store(m, c, a, 0);
            }
            Dtype::BF16 => {
                let x = self.b.ins().bitcast(types::I32, MemFlagsData::new(), v);
                let x = self.b.ins().ushr_imm_u(x, 16);
                self.b.ins().istore16(m, x, a, 0);
            }
            Dtype::F16 => {
                let x = self.call(rc_f32_to_f16 as *const u8, &[types::F32], types::I64, &[v]);
                self.b.ins().istore16(m, x, a, 0);
            }
        }
    }

    fn call(&mut self, f: *const u8, params: &[Type], ret: Type, args: &[Value]) -> Value {
        let mut sig = Signature::new(self.b.func.signature.call_conv);
        for p in params {
            sig.params.push(AbiParam::new(*p));
        }
        sig.returns.push(AbiParam::new(ret));
        let sr = self.b.import_signature(sig);
        let callee = self.b.ins().iconst(types::I64, f as i64);
        let c = self.b.ins().call_indirect(sr, callee, args);
        self.b.inst_results(c)[0]
    }

    /// Rounds `x` (of compute type `ty`) to `dtype` and returns it in `dtype`'s compute type.
    fn round(&mut self, dtype: Dtype, x: Value, ty: Type) -> Value {
        let want = compute_ty(dtype);
        match dtype {
            Dtype::F32 => {
                if ty == types::F64 {
                    self.b.ins().fdemote(types::F32, x)
                } else {
                    x
                }
            }
            Dtype::F64 => {
                if ty == types::F32 {
                    self.b.ins().fpromote(types::F64, x)
                } else {
                    x
                }
            }
            _ => {
                let x = if ty == types::F32 { self.b.ins().fpromote(types::F64, x) } else { x };
                let c = self.b.ins().iconst(types::I64, code(&DTYPES, &dtype));
                let r = self.call(rc_round as *const u8, &[types::I64, types::F64], types::F64, &[c, x]);
                if want == types::F32 {
                    self.b.ins().fdemote(types::F32, r)
                } else {
                    r
                }
            }
        }
    }

    fn body(&mut self, part: &[Value], lanes: bool) {
        let vals = self.values(part, lanes);
        for s in &self.l.stores.clone() {
            if let StoreVal::Val(v) = s.val {
                let at = self.aid(&s.at);
                self.store(s.buf, part[at], vals[v], self.l.body[v].dtype, lanes);
            }
        }
    }

    fn values(&mut self, part: &[Value], lanes: bool) -> Vec<Value> {
        self.values_where(part, lanes, None)
    }

    /// The body's values at one point; with `only`, just those it marks (the others are
    /// placeholders), otherwise the invariant ones come from `hoist`.
    fn values_where(&mut self, part: &[Value], lanes: bool, only: Option<&[bool]>) -> Vec<Value> {
        let l = self.l;
        let last = self.vaxis;
        let mut vals: Vec<Value> = Vec::with_capacity(l.body.len());
        for (vi, ins) in l.body.iter().enumerate() {
            if only.is_some_and(|m| !m[vi]) {
                vals.push(Value::from_u32(0));
                continue;
            }
            {
                let pre = if lanes { self.inv_v[vi].or(self.row_v[vi]) } else { self.inv_s[vi] };
                if let Some(x) = pre {
                    vals.push(x);
                    continue;
                }
            }
            let dt = ins.dtype;
            let ty = if lanes && dt == Dtype::F32 { types::F32X4 } else { compute_ty(dt) };
            let v = match &ins.inst {
                Inst::Load { buf, at } => {
                    let a = self.aid(at);
                    self.load(*buf, part[a], lanes, at.coef[last])
                }
                Inst::Const(c) => {
                    let c = interp::round(dt, *c);
                    let s = if compute_ty(dt) == types::F32 {
                        self.b.ins().f32const(c as f32)
                    } else {
                        self.b.ins().f64const(c)
                    };
                    if lanes {
                        self.b.ins().splat(types::F32X4, s)
                    } else {
                        s
                    }
                }
                Inst::Index(at) if lanes => {
                    // i32 lanes x, x + c, x + 2c, x + 3c (`vectorizable` bounds them).
                    let a = self.aid(at);
                    let x = self.b.ins().ireduce(types::I32, part[a]);
                    let x = self.b.ins().splat(types::I32X4, x);
                    let c = at.coef[last];
                    let zero = self.b.ins().iconst(types::I32, 0);
                    let mut step = self.b.ins().splat(types::I32X4, zero);
                    for lane in 1..4u8 {
                        let k = self.b.ins().iconst(types::I32, c * lane as i64);
                        step = self.b.ins().insertlane(step, k, lane);
                    }
                    self.b.ins().iadd(x, step)
                }
                Inst::Index(at) => {
                    let a = self.aid(at);
                    let x = self.b.ins().fcvt_from_sint(types::F64, part[a]);
                    // Indices are exact integers in every integer dtype.
                    if is_int(dt) {
                        x
                    } else {
                        self.round(dt, x, types::F64)
                    }
                }
                Inst::Un(u, a) => {
                    let x = vals[*a];
                    let xt = compute_ty(l.body[*a].dtype);
                    self.unary(*u, x, xt, dt, lanes)
                }
                Inst::Bin(b, x, y, float) => {
                    let (x, y) = (vals[*x], vals[*y]);
                    let xt = compute_ty(l.body[*ins_operand(&ins.inst)].dtype);
                    self.binary(*b, x, y, xt, *float, dt, lanes)
                }
                Inst::Select(c, a, b) => {
                    let (c, a, b) = (vals[*c], vals[*a], vals[*b]);
                    if lanes {
                        // `c` is a lane mask from a vector compare.
                        let m = self.b.ins().bitcast(
                            types::F32X4,
                            MemFlagsData::new().with_endianness(Endianness::Little),
                            c,
                        );
                        self.b.ins().bitselect(m, a, b)
                    } else {
                        let z = self.b.ins().f64const(0.0);
                        let t = self.b.ins().fcmp(FloatCC::NotEqual, c, z);
                        self.b.ins().select(t, a, b)
                    }
                }
                Inst::Cast(a) => {
                    let from = l.body[*a].dtype;
                    self.cast(vals[*a], from, dt)
                }
            };
            let _ = ty;
            vals.push(v);
        }
        vals
    }

    fn cast(&mut self, x: Value, from: Dtype, to: Dtype) -> Value {
        let ft = compute_ty(from);
        match to {
            Dtype::Bool => {
                let x = if ft == types::F32 { self.b.ins().fpromote(types::F64, x) } else { x };
                let z = self.b.ins().f64const(0.0);
                let c = self.b.ins().fcmp(FloatCC::NotEqual, x, z);
                let one = self.b.ins().f64const(1.0);
                self.b.ins().select(c, one, z)
            }
            Dtype::F16 | Dtype::BF16 if ft == types::F64 => {
                // Round from f64 directly (no double rounding through f32).
                let c = self.b.ins().iconst(types::I64, code(&DTYPES, &to));
                let r = self.call(rc_round as *const u8, &[types::I64, types::F64], types::F64, &[c, x]);
                self.b.ins().fdemote(types::F32, r)
            }
            _ => self.round(to, x, ft),
        }
    }

    // ---- recipec's f32 exp/erf/gelu (`compiler::math`), the same operation sequence.

    fn fk(&mut self, lanes: bool, v: f32) -> Value {
        let c = self.b.ins().f32const(v);
        if lanes {
            self.b.ins().splat(types::F32X4, c)
        } else {
            c
        }
    }

    fn ik(&mut self, lanes: bool, v: i64) -> Value {
        let c = self.b.ins().iconst(types::I32, v);
        if lanes {
            self.b.ins().splat(types::I32X4, c)
        } else {
            c
        }
    }

    /// `if a cc b { x } else { y }` on f32 scalars or lanes.
    fn fsel(&mut self, lanes: bool, cc: FloatCC, a: Value, b: Value, x: Value, y: Value) -> Value {
        let c = self.b.ins().fcmp(cc, a, b);
        if lanes {
            let m = self.b.ins().bitcast(types::F32X4, MemFlagsData::new().with_endianness(Endianness::Little), c);
            self.b.ins().bitselect(m, x, y)
        } else {
            self.b.ins().select(c, x, y)
        }
    }

    fn int_bits_to_f32(&mut self, lanes: bool, v: Value) -> Value {
        let t = if lanes { types::F32X4 } else { types::F32 };
        self.b.ins().bitcast(t, MemFlagsData::new().with_endianness(Endianness::Little), v)
    }

    fn horner(&mut self, lanes: bool, x: Value, coefs: &[f32]) -> Value {
        let mut p = self.fk(lanes, coefs[0]);
        for &c in &coefs[1..] {
            let m = self.b.ins().fmul(p, x);
            let k = self.fk(lanes, c);
            p = self.b.ins().fadd(m, k);
        }
        p
    }

    fn exp_f32(&mut self, lanes: bool, x: Value) -> Value {
        use compiler::math::*;
        let (hi, lo) = (self.fk(lanes, EXP_HI), self.fk(lanes, EXP_LO));
        let xc = self.fsel(lanes, FloatCC::GreaterThan, x, hi, hi, x);
        let xc = self.fsel(lanes, FloatCC::LessThan, x, lo, lo, xc);
        let l2e = self.fk(lanes, LOG2E);
        let magic = self.fk(lanes, ROUND_MAGIC);
        let t = self.b.ins().fmul(xc, l2e);
        let t = self.b.ins().fadd(t, magic);
        let n = self.b.ins().fsub(t, magic);
        let (c1, c2) = (self.fk(lanes, LN2_HI), self.fk(lanes, LN2_LO));
        let m1 = self.b.ins().fmul(n, c1);
        let r = self.b.ins().fsub(xc, m1);
        let m2 = self.b.ins().fmul(n, c2);
        let r = self.b.ins().fsub(r, m2);
        let z = self.b.ins().fmul(r, r);
        let p = self.horner(lanes, r, &EXP_P);
        let p = self.b.ins().fmul(p, z);
        let p = self.b.ins().fadd(p, r);
        let one = self.fk(lanes, 1.0);
        let p = self.b.ins().fadd(p, one);
        let it = if lanes { types::I32X4 } else { types::I32 };
        let ni = self.b.ins().fcvt_to_sint_sat(it, n);
        let h = self.b.ins().sshr_imm_u(ni, 1);
        let bias = self.ik(lanes, 127);
        let e1 = self.b.ins().iadd(h, bias);
        let e1 = self.b.ins().ishl_imm_u(e1, 23);
        let s1 = self.int_bits_to_f32(lanes, e1);
        let e2 = self.b.ins().isub(ni, h);
        let e2 = self.b.ins().iadd(e2, bias);
        let e2 = self.b.ins().ishl_imm_u(e2, 23);
        let s2 = self.int_bits_to_f32(lanes, e2);
        let y = self.b.ins().fmul(p, s1);
        let y = self.b.ins().fmul(y, s2);
        let zero = self.fk(lanes, 0.0);
        let inf = self.fk(lanes, f32::INFINITY);
        let y = self.fsel(lanes, FloatCC::LessThan, x, lo, zero, y);
        let y = self.fsel(lanes, FloatCC::GreaterThan, x, hi, inf, y);
        self.fsel(lanes, FloatCC::Unordered, x, x, x, y)
    }

    fn erf_f32(&mut self, lanes: bool, x: Value) -> Value {
        use compiler::math::*;
        let ax = self.b.ins().fabs(x);
        let z = self.b.ins().fmul(x, x);
        let small: Vec<f32> = ERF_SMALL.iter().rev().copied().collect();
        let s = self.horner(lanes, z, &small);
        let small = self.b.ins().fmul(x, s);
        let p = self.fk(lanes, ERF_P);
        let one = self.fk(lanes, 1.0);
        let pa = self.b.ins().fmul(p, ax);
        let den = self.b.ins().fadd(one, pa);
        let t = self.b.ins().fdiv(one, den);
        let a: Vec<f32> = ERF_A.iter().rev().copied().collect();
        let q = self.horner(lanes, t, &a);
        let sq = self.b.ins().fmul(ax, ax);
        let neg = self.b.ins().fneg(sq);
        let e = self.exp_f32(lanes, neg);
        let tq = self.b.ins().fmul(t, q);
        let tqe = self.b.ins().fmul(tq, e);
        let large = self.b.ins().fsub(one, tqe);
        let nl = self.b.ins().fneg(large);
        let zero = self.fk(lanes, 0.0);
        let large = self.fsel(lanes, FloatCC::LessThan, x, zero, nl, large);
        let half = self.fk(lanes, 0.5);
        self.fsel(lanes, FloatCC::LessThan, ax, half, small, large)
    }

    fn gelu_f32(&mut self, lanes: bool, x: Value) -> Value {
        let c = self.fk(lanes, compiler::math::FRAC_1_SQRT_2);
        let xs = self.b.ins().fmul(x, c);
        let e = self.erf_f32(lanes, xs);
        let one = self.fk(lanes, 1.0);
        let e1 = self.b.ins().fadd(one, e);
        let half = self.fk(lanes, 0.5);
        let hx = self.b.ins().fmul(half, x);
        self.b.ins().fmul(hx, e1)
    }

    fn unary(&mut self, u: Un, x: Value, xt: Type, dt: Dtype, lanes: bool) -> Value {
        if dt == Dtype::F32 && (lanes || xt == types::F32) {
            match u {
                Un::Exp => return self.exp_f32(lanes, x),
                Un::Erf => return self.erf_f32(lanes, x),
                Un::Gelu => return self.gelu_f32(lanes, x),
                _ => {}
            }
        }
        let native = match u {
            Un::Neg => Some(self.b.ins().fneg(x)),
            Un::Abs => Some(self.b.ins().fabs(x)),
            Un::Sqrt => Some(self.b.ins().sqrt(x)),
            Un::StopGradient => Some(x),
            Un::Floor => Some(self.b.ins().floor(x)),
            Un::Ceil => Some(self.b.ins().ceil(x)),
            Un::Round => Some(self.b.ins().nearest(x)),
            Un::Relu => {
                // x.max(0.0): NaN gives 0.
                if lanes {
                    let z = self.b.ins().f32const(0.0);
                    let z = self.b.ins().splat(types::F32X4, z);
                    let m = self.b.ins().fcmp(FloatCC::GreaterThan, x, z);
                    let m =
                        self.b.ins().bitcast(types::F32X4, MemFlagsData::new().with_endianness(Endianness::Little), m);
                    Some(self.b.ins().bitselect(m, x, z))
                } else {
                    let z = if xt == types::F32 { self.b.ins().f32const(0.0) } else { self.b.ins().f64const(0.0) };
                    let c = self.b.ins().fcmp(FloatCC::GreaterThan, x, z);
                    Some(self.b.ins().select(c, x, z))
                }
            }
            _ => None,
        };
        match native {
            // Exact in the compute type: round only for f16/bf16 and integers.
            Some(v) if lanes => v,
            Some(v) => match dt {
                Dtype::F32 | Dtype::F64 => v,
                _ => self.round(dt, v, xt),
            },
            None => {
                let x = if xt == types::F32 { self.b.ins().fpromote(types::F64, x) } else { x };
                let c = self.b.ins().iconst(types::I64, code(&UNS, &u));
                let r = self.call(rc_un as *const u8, &[types::I64, types::F64], types::F64, &[c, x]);
                self.round(dt, r, types::F64)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn binary(&mut self, op: Bin, x: Value, y: Value, xt: Type, float: bool, dt: Dtype, lanes: bool) -> Value {
        let cmp = |op: Bin| match op {
            Bin::Eq => Some(FloatCC::Equal),
            Bin::Ne => Some(FloatCC::NotEqual),
            Bin::Lt => Some(FloatCC::LessThan),
            Bin::Le => Some(FloatCC::LessThanOrEqual),
            Bin::Gt => Some(FloatCC::GreaterThan),
            Bin::Ge => Some(FloatCC::GreaterThanOrEqual),
            _ => None,
        };
        if let Some(cc) = cmp(op) {
            if lanes && xt == types::F64 {
                // i32 lanes (the only non-f32 operands `vectorizable` lets through).
                let ic = match op {
                    Bin::Eq => IntCC::Equal,
                    Bin::Ne => IntCC::NotEqual,
                    Bin::Lt => IntCC::SignedLessThan,
                    Bin::Le => IntCC::SignedLessThanOrEqual,
                    Bin::Gt => IntCC::SignedGreaterThan,
                    _ => IntCC::SignedGreaterThanOrEqual,
                };
                return self.b.ins().icmp(ic, x, y);
            }
            let c = self.b.ins().fcmp(cc, x, y);
            if lanes {
                return c;
            }
            let one = self.b.ins().f64const(1.0);
            let z = self.b.ins().f64const(0.0);
            return self.b.ins().select(c, one, z);
        }
        let native = match op {
            Bin::Add => Some(self.b.ins().fadd(x, y)),
            Bin::Sub => Some(self.b.ins().fsub(x, y)),
            Bin::Mul => Some(self.b.ins().fmul(x, y)),
            Bin::Div if float => Some(self.b.ins().fdiv(x, y)),
            Bin::Min => Some(self.b.ins().fmin(x, y)),
            Bin::Max => Some(self.b.ins().fmax(x, y)),
            Bin::And | Bin::Or => {
                let z = self.b.ins().f64const(0.0);
                let a = self.b.ins().fcmp(FloatCC::NotEqual, x, z);
                let b = self.b.ins().fcmp(FloatCC::NotEqual, y, z);
                let c = if op == Bin::And { self.b.ins().band(a, b) } else { self.b.ins().bor(a, b) };
                let one = self.b.ins().f64const(1.0);
                return self.b.ins().select(c, one, z);
            }
            _ => None,
        };
        match native {
            Some(v) if lanes => v,
            Some(v) => match dt {
                Dtype::F32 | Dtype::F64 => v,
                d if is_int(d) && matches!(op, Bin::Min | Bin::Max) => v,
                _ => self.round(dt, v, xt),
            },
            None => {
                let (x, y) = if xt == types::F32 {
                    (self.b.ins().fpromote(types::F64, x), self.b.ins().fpromote(types::F64, y))
                } else {
                    (x, y)
                };
                let c = self.b.ins().iconst(types::I64, code(&BINS, &op));
                let f = self.b.ins().iconst(types::I64, float as i64);
                let r = self.call(
                    rc_bin as *const u8,
                    &[types::I64, types::F64, types::F64, types::I64],
                    types::F64,
                    &[c, x, y, f],
                );
                self.round(dt, r, types::F64)
            }
        }
    }
}

fn ins_operand(i: &Inst) -> &usize {
    match i {
        Inst::Bin(_, x, _, _) => x,
        _ => unreachable!(),
    }
}
