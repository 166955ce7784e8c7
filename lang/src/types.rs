//! Dtypes, symbolic dimensions and the types the checker assigns to expressions.
//!
//! A dimension is a polynomial with integer coefficients over symbols (`B * T`, `D / H` when
//! `H` divides `D` is kept as an opaque quotient atom), so `B * T` and `T * B` compare equal.
//! Symbols are either *rigid* (a dimension named in the signature being checked) or
//! *variables* (a dimension of a callee's signature, bound by unification at a call).

use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    Bool,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "bool" => Dtype::Bool,
            "i32" => Dtype::I32,
            "i64" => Dtype::I64,
            "f16" => Dtype::F16,
            "bf16" => Dtype::BF16,
            "f32" => Dtype::F32,
            "f64" => Dtype::F64,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "bool",
            Dtype::I32 => "i32",
            Dtype::I64 => "i64",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }
    pub fn is_int(self) -> bool {
        matches!(self, Dtype::I32 | Dtype::I64)
    }
    /// JAX-style promotion of two strong dtypes: bool < integers < floats; f16 with bf16
    /// gives f32.
    pub fn promote(a: Dtype, b: Dtype) -> Dtype {
        use Dtype::*;
        if a == b {
            return a;
        }
        match (a, b) {
            (Bool, x) | (x, Bool) => x,
            (I32, I64) | (I64, I32) => I64,
            (x, y) if x.is_int() && y.is_float() => y,
            (x, y) if x.is_float() && y.is_int() => x,
            (F16, BF16) | (BF16, F16) => F32,
            (F64, _) | (_, F64) => F64,
            (F32, _) | (_, F32) => F32,
            _ => F32,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A symbol in a dimension. Ordered by id so that polynomials have a canonical form.
#[derive(Clone, Debug)]
pub struct Sym {
    pub id: u32,
    pub name: Rc<str>,
    pub var: bool,
}

impl PartialEq for Sym {
    fn eq(&self, o: &Self) -> bool {
        self.id == o.id
    }
}
impl Eq for Sym {}
impl PartialOrd for Sym {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sym {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.id.cmp(&o.id)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Atom {
    Sym(Sym),
    /// A quotient by a sum (`a / (b + c)`) or a remainder, kept symbolically.
    Quot(Box<Dim>, Box<Dim>),
    Rem(Box<Dim>, Box<Dim>),
}

/// A monomial: atoms with integer exponents, sorted. Negative exponents come from division
/// by a monomial (`D / H`), which a shape asserts to be exact.
type Mono = Vec<(Atom, i32)>;

fn mono_mul(a: &Mono, b: &Mono) -> Mono {
    let mut out: Vec<(Atom, i32)> = a.clone();
    for (atom, e) in b {
        match out.iter_mut().find(|(x, _)| x == atom) {
            Some(slot) => slot.1 = slot.1.saturating_add(*e),
            None => out.push((atom.clone(), *e)),
        }
    }
    out.retain(|(_, e)| *e != 0);
    out.sort();
    out
}

/// A symbolic dimension: a sum of monomials with integer coefficients.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dim {
    terms: BTreeMap<Mono, i64>,
}

impl Dim {
    pub fn constant(c: i64) -> Dim {
        let mut terms = BTreeMap::new();
        if c != 0 {
            terms.insert(vec![], c);
        }
        Dim { terms }
    }
    pub fn sym(s: Sym) -> Dim {
        Dim::atom(Atom::Sym(s))
    }
    fn atom(a: Atom) -> Dim {
        let mut terms = BTreeMap::new();
        terms.insert(vec![(a, 1)], 1);
        Dim { terms }
    }
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&vec![]).copied(),
            _ => None,
        }
    }
    /// The symbol, if this dimension is exactly one symbol.
    pub fn as_sym(&self) -> Option<&Sym> {
        if self.terms.len() != 1 {
            return None;
        }
        let (mono, c) = self.terms.iter().next()?;
        match (mono.as_slice(), c) {
            ([(Atom::Sym(s), 1)], 1) => Some(s),
            _ => None,
        }
    }
    pub fn add(&self, o: &Dim) -> Dim {
        self.add_terms(o).cancel_quotients()
    }
    fn add_terms(&self, o: &Dim) -> Dim {
        let mut terms = self.terms.clone();
        for (m, c) in &o.terms {
            let e = terms.entry(m.clone()).or_insert(0);
            *e = e.saturating_add(*c);
            if *e == 0 {
                terms.remove(m);
            }
        }
        Dim { terms }
    }
    /// `k·c·(x / c)` is `k·x` for a constant `c` and a symbolic `x`: the quotient asserts that
    /// `c` divides `x` (as `D / H` does), so `2 * (E / 2)` equals `E`. A constant `x` keeps its
    /// quotient, which marks an inexact division (`is_inexact`).
    fn cancel_quotients(self) -> Dim {
        let cancels = |m: &Mono, coef: i64| {
            m.iter().position(|(a, e)| {
                *e == 1
                    && matches!(a, Atom::Quot(x, y) if x.as_const().is_none()
                        && y.as_const().is_some_and(|c| c != 0 && coef.checked_rem(c) == Some(0)))
            })
        };
        if !self.terms.iter().any(|(m, c)| cancels(m, *c).is_some()) {
            return self;
        }
        let mut out = Dim::default();
        for (m, coef) in &self.terms {
            let mut one = BTreeMap::new();
            match cancels(m, *coef) {
                Some(i) => {
                    let Atom::Quot(x, y) = &m[i].0 else { unreachable!() };
                    let c = y.as_const().unwrap_or(1);
                    let mut rest = m.clone();
                    rest.remove(i);
                    one.insert(rest, coef / c);
                    out = out.add_terms(&x.mul(&Dim { terms: one }));
                }
                None => {
                    one.insert(m.clone(), *coef);
                    out = out.add_terms(&Dim { terms: one });
                }
            }
        }
        out.cancel_quotients()
    }
    pub fn neg(&self) -> Dim {
        Dim { terms: self.terms.iter().map(|(m, c)| (m.clone(), c.saturating_neg())).collect() }
    }
    pub fn sub(&self, o: &Dim) -> Dim {
        self.add(&o.neg())
    }
    pub fn mul(&self, o: &Dim) -> Dim {
        let mut out = Dim::default();
        for (m1, c1) in &self.terms {
            for (m2, c2) in &o.terms {
                let mut t = BTreeMap::new();
                t.insert(mono_mul(m1, m2), c1.saturating_mul(*c2));
                out = out.add(&Dim { terms: t });
            }
        }
        out
    }
    /// Division. Constants divide exactly or stay symbolic; division by a monomial is
    /// exact by assumption (a shape `D / H` asserts that `H` divides `D`, and instantiation
    /// with constants checks it); division by a sum stays an opaque quotient.
    pub fn div(&self, o: &Dim) -> Dim {
        if o.terms.len() == 1 {
            let (dm, dc) = o.terms.iter().next().map(|(m, c)| (m.clone(), *c)).unwrap_or_default();
            if dc != 0 && self.terms.values().all(|c| c.checked_rem(dc) == Some(0)) {
                let inv: Mono = dm.iter().map(|(a, e)| (a.clone(), -e)).collect();
                let mut out = Dim::default();
                for (m, c) in &self.terms {
                    let mut t = BTreeMap::new();
                    t.insert(mono_mul(m, &inv), c.checked_div(dc).unwrap_or(0));
                    out = out.add(&Dim { terms: t });
                }
                return out;
            }
        }
        if self == o && !self.terms.is_empty() {
            return Dim::constant(1);
        }
        Dim::atom(Atom::Quot(Box::new(self.clone()), Box::new(o.clone())))
    }
    pub fn rem(&self, o: &Dim) -> Dim {
        if let (Some(a), Some(b)) = (self.as_const(), o.as_const()) {
            if let Some(r) = a.checked_rem_euclid(b) {
                return Dim::constant(r);
            }
        }
        Dim::atom(Atom::Rem(Box::new(self.clone()), Box::new(o.clone())))
    }
    /// Replaces symbols by dimensions.
    pub fn subst(&self, f: &dyn Fn(&Sym) -> Option<Dim>) -> Dim {
        let mut out = Dim::default();
        for (m, c) in &self.terms {
            let mut num = Dim::constant(*c);
            let mut den = Dim::constant(1);
            for (a, e) in m {
                let d = match a {
                    Atom::Sym(s) => f(s).unwrap_or_else(|| Dim::sym(s.clone())),
                    Atom::Quot(x, y) => x.subst(f).div(&y.subst(f)),
                    Atom::Rem(x, y) => x.subst(f).rem(&y.subst(f)),
                };
                for _ in 0..e.unsigned_abs().min(64) {
                    if *e > 0 {
                        num = num.mul(&d);
                    } else {
                        den = den.mul(&d);
                    }
                }
            }
            out = out.add(&num.div(&den));
        }
        out
    }
    /// Every symbol occurring in the dimension.
    pub fn syms(&self, out: &mut Vec<Sym>) {
        for m in self.terms.keys() {
            for (a, _) in m {
                match a {
                    Atom::Sym(s) => {
                        if !out.contains(s) {
                            out.push(s.clone())
                        }
                    }
                    Atom::Quot(x, y) | Atom::Rem(x, y) => {
                        x.syms(out);
                        y.syms(out);
                    }
                }
            }
        }
    }
    pub fn has_vars(&self) -> bool {
        let mut v = vec![];
        self.syms(&mut v);
        v.iter().any(|s| s.var)
    }
    /// True when the dimension is a constant that came from an inexact division.
    pub fn is_inexact(&self) -> bool {
        self.terms.keys().any(|m| m.iter().any(|(a, _)| matches!(a, Atom::Quot(..))))
    }
}

fn fmt_atom(a: &Atom, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match a {
        Atom::Sym(s) => f.write_str(&s.name),
        Atom::Quot(x, y) => write!(f, "({x}) / ({y})"),
        Atom::Rem(x, y) => write!(f, "({x}) % ({y})"),
    }
}

fn fmt_mono(m: &Mono, mag: i64, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let num: Vec<&(Atom, i32)> = m.iter().filter(|(_, e)| *e > 0).collect();
    let den: Vec<&(Atom, i32)> = m.iter().filter(|(_, e)| *e < 0).collect();
    let mut first = true;
    if mag != 1 || num.is_empty() {
        write!(f, "{mag}")?;
        first = false;
    }
    for (a, e) in num {
        for _ in 0..(*e).min(64) {
            if !first {
                f.write_str(" * ")?;
            }
            first = false;
            fmt_atom(a, f)?;
        }
    }
    for (a, e) in den {
        for _ in 0..e.unsigned_abs().min(64) {
            f.write_str(" / ")?;
            fmt_atom(a, f)?;
        }
    }
    Ok(())
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        // Symbolic terms first, the constant last: `T - 1`, `B * T`.
        let empty: Mono = Vec::new();
        let mut ordered: Vec<(&Mono, &i64)> = self.terms.iter().filter(|(m, _)| !m.is_empty()).collect();
        if let Some(c) = self.terms.get(&empty) {
            ordered.push((&empty, c));
        }
        let mut first = true;
        for (m, c) in ordered {
            let (neg, mag) = (*c < 0, c.abs());
            if first {
                if neg {
                    f.write_str("-")?;
                }
            } else {
                f.write_str(if neg { " - " } else { " + " })?;
            }
            first = false;
            fmt_mono(m, mag, f)?;
        }
        Ok(())
    }
}

/// The shape of a tensor: a list of dimensions, or the opaque shape of an optimizer's or
/// sparsity rule's `param` (rank-polymorphic: the rule runs on parameters of every shape).
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    Dims(Vec<Dim>),
    Param,
}

impl Shape {
    pub fn scalar() -> Shape {
        Shape::Dims(vec![])
    }
    pub fn dims(&self) -> Option<&[Dim]> {
        match self {
            Shape::Dims(d) => Some(d),
            Shape::Param => None,
        }
    }
    pub fn is_scalar(&self) -> bool {
        matches!(self, Shape::Dims(d) if d.is_empty())
    }
    pub fn rank(&self) -> Option<usize> {
        self.dims().map(|d| d.len())
    }
    pub fn subst(&self, f: &dyn Fn(&Sym) -> Option<Dim>) -> Shape {
        match self {
            Shape::Dims(d) => Shape::Dims(d.iter().map(|x| x.subst(f)).collect()),
            Shape::Param => Shape::Param,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Param => f.write_str("[...param]"),
            Shape::Dims(d) => {
                f.write_str("[")?;
                for (i, x) in d.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{x}")?;
                }
                f.write_str("]")
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorTy {
    pub dtype: Dtype,
    pub shape: Shape,
    /// A literal-derived scalar whose dtype yields to the other operand (`x * 2`).
    pub weak: bool,
}

impl TensorTy {
    pub fn new(dtype: Dtype, shape: Shape) -> TensorTy {
        TensorTy { dtype, shape, weak: false }
    }
    pub fn scalar(dtype: Dtype) -> TensorTy {
        TensorTy::new(dtype, Shape::scalar())
    }
}

impl fmt::Display for TensorTy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.shape {
            Shape::Dims(d) if d.is_empty() => write!(f, "{}", self.dtype),
            s => write!(f, "{}{}", self.dtype, s),
        }
    }
}

/// A reference to an item: module index and item index within the module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemRef {
    pub module: usize,
    pub item: usize,
}

/// A model instance: the model item and the value of each of its parameters, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelTy {
    pub item: ItemRef,
    pub config: Vec<Ty>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Ty {
    Tensor(TensorTy),
    /// A compile-time integer: a literal, a dimension, an integer hyperparameter.
    Dim(Dim),
    Str(Option<String>),
    List(Vec<Ty>),
    /// A reference to a callable: an item, a built-in or a model method.
    Callable(Callee),
    Model(ModelTy),
    /// `sub blocks[l] = ...` inside a `for`: an array of `len` instances.
    ModelArray(ModelTy, Dim),
    /// `param w[l]: ...` inside a `for`.
    TensorArray(TensorTy, Dim),
    /// A schedule applied to its hyperparameters; a scalar per step.
    Schedule(ItemRef),
    /// An optimizer, sparsity rule or decode policy applied to its hyperparameters (recipes).
    Applied(ItemRef),
    /// A data source: batch size and context length.
    Data {
        batch: Dim,
        context: Dim,
    },
    /// The recipe's `batch`: `inputs` and `targets`, both `i32[batch, context]`.
    Batch {
        batch: Dim,
        context: Dim,
    },
    /// The type of an expression that already produced a diagnostic; accepted everywhere.
    Unknown,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Callee {
    Item(ItemRef),
    Builtin(&'static str),
    Method(ModelTy, String),
}

impl Ty {
    pub fn tensor(dtype: Dtype, dims: Vec<Dim>) -> Ty {
        Ty::Tensor(TensorTy::new(dtype, Shape::Dims(dims)))
    }
    pub fn scalar(dtype: Dtype) -> Ty {
        Ty::Tensor(TensorTy::scalar(dtype))
    }
    pub fn weak_float() -> Ty {
        Ty::Tensor(TensorTy { dtype: Dtype::F32, shape: Shape::scalar(), weak: true })
    }
    /// The value as a tensor, if it is one (a compile-time integer is a weak `i64` scalar).
    pub fn as_tensor(&self) -> Option<TensorTy> {
        match self {
            Ty::Tensor(t) => Some(t.clone()),
            Ty::Dim(_) => Some(TensorTy { dtype: Dtype::I64, shape: Shape::scalar(), weak: true }),
            _ => None,
        }
    }
    pub fn is_unknown(&self) -> bool {
        matches!(self, Ty::Unknown)
    }
    pub fn describe(&self) -> String {
        match self {
            Ty::Tensor(t) => format!("`{t}`"),
            Ty::Dim(d) => format!("the constant `{d}`"),
            Ty::Str(_) => "a string".into(),
            Ty::List(_) => "a list".into(),
            Ty::Callable(_) => "a function".into(),
            Ty::Model(_) => "a model".into(),
            Ty::ModelArray(..) => "an array of models".into(),
            Ty::TensorArray(t, _) => format!("an array of `{t}`"),
            Ty::Schedule(_) => "a schedule".into(),
            Ty::Applied(_) => "an applied rule".into(),
            Ty::Data { .. } => "a data source".into(),
            Ty::Batch { .. } => "a batch".into(),
            Ty::Unknown => "an unknown value".into(),
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::Tensor(t) => write!(f, "{t}"),
            Ty::Dim(d) => write!(f, "const {d}"),
            Ty::Str(Some(s)) => write!(f, "str {s:?}"),
            Ty::Str(None) => f.write_str("str"),
            Ty::List(items) => {
                f.write_str("[")?;
                for (i, t) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{t}")?;
                }
                f.write_str("]")
            }
            Ty::Callable(_) => f.write_str("fn"),
            Ty::Model(_) => f.write_str("model"),
            Ty::ModelArray(_, n) => write!(f, "model[{n}]"),
            Ty::TensorArray(t, n) => write!(f, "{t} x {n}"),
            Ty::Schedule(_) => f.write_str("schedule"),
            Ty::Applied(_) => f.write_str("rule"),
            Ty::Data { batch, context } => write!(f, "data[batch = {batch}, context = {context}]"),
            Ty::Batch { batch, context } => write!(f, "batch[{batch}, {context}]"),
            Ty::Unknown => f.write_str("?"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn s(id: u32, n: &str) -> Dim {
        Dim::sym(Sym { id, name: n.into(), var: false })
    }
    #[test]
    fn polynomial_dims_normalize() {
        let (b, t) = (s(1, "B"), s(2, "T"));
        assert_eq!(b.mul(&t), t.mul(&b));
        assert_eq!(b.mul(&t).to_string(), "B * T");
        assert_eq!(t.sub(&Dim::constant(1)).to_string(), "T - 1");
        assert_eq!(b.mul(&t).div(&t), b);
        assert_eq!(Dim::constant(4).mul(&b).div(&Dim::constant(2)).to_string(), "2 * B");
        assert_eq!(b.div(&t).mul(&t), b);
        assert_eq!(b.div(&t).to_string(), "B / T");
        let eight = b.div(&t).subst(&|s: &Sym| Some(Dim::constant(if s.id == 1 { 16 } else { 2 })));
        assert_eq!(eight.as_const(), Some(8));
        assert_eq!(b.add(&b).sub(&b), b);
        // A quotient by a constant cancels against a multiple of it.
        let two = Dim::constant(2);
        let half = t.div(&two);
        assert_eq!(half.to_string(), "(T) / (2)");
        assert_eq!(two.mul(&half), t);
        assert_eq!(half.add(&half), t);
        assert_eq!(Dim::constant(6).mul(&half).mul(&b), Dim::constant(3).mul(&t).mul(&b));
        assert_eq!(half.mul(&Dim::constant(3)).to_string(), "3 * (T) / (2)");
        // A constant quotient stays: it marks an inexact division.
        let inexact = Dim::constant(7).div(&two);
        assert!(two.mul(&inexact).is_inexact());
    }
}
