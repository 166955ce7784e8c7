//! The checker: names, dtypes and symbolic shapes of every expression, and the rules of each
//! item kind (optimizer implicit bindings, sparsity masks, model members, recipe fields).
//!
//! Shapes are checked generically: a function's signature dimensions (`N`, `D`) are rigid
//! symbols inside its body and fresh unification variables at each call, so
//! `f32[N, D] @ f32[D, V]^T` errors name both shapes and where each dimension was bound.
//! Integer scalar parameters (`k: i32`) are compile-time constants, like dimensions.

use crate::ast::*;
use crate::builtins;
use crate::diag::Diagnostic;
use crate::resolve::Modules;
use crate::source::{FileId, Span};
use crate::suggest::did_you_mean;
use crate::types::*;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// The checked type of one binding, for `recipec build --emit typed` and editor hovers.
#[derive(Clone, Debug, PartialEq)]
pub struct TypedBinding {
    pub file: FileId,
    pub span: Span,
    pub kind: &'static str,
    pub name: String,
    pub ty: String,
}

/// A resolved parameter of a signature.
#[derive(Clone, Debug)]
pub struct SigParam {
    pub name: String,
    pub ty: Ty,
    pub has_default: bool,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Signature {
    pub params: Vec<SigParam>,
    pub ret: Option<Ty>,
    /// Symbols introduced by the signature, instantiated afresh at every call.
    pub syms: Vec<Sym>,
    pub file: FileId,
}

/// One declaration inside a model, with shapes in terms of the model's parameters.
#[derive(Clone, Debug)]
pub enum MemberDecl {
    Param { name: String, ty: TensorTy, array: Option<Dim>, span: Span, buffer: bool },
    Sub { name: String, model: ModelTy, array: Option<Dim>, span: Span },
    For { var: Sym, start: Dim, end: Dim, members: Vec<MemberDecl> },
}

#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub item: ItemRef,
    pub file: FileId,
    pub config: Signature,
    pub members: Vec<MemberDecl>,
    pub methods: BTreeMap<String, Signature>,
}

/// A parameter of an instantiated model, as the recipe and runtime see it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamPath {
    pub path: Vec<String>,
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    pub file: FileId,
    pub span: Span,
    /// Declared `buffer`: never trained, never selected by a recipe's selectors.
    pub buffer: bool,
}

impl ParamPath {
    pub fn dotted(&self) -> String {
        self.path.join(".")
    }
}

#[derive(Clone, Debug)]
struct Local {
    ty: Ty,
    span: Span,
    kind: LocalKind,
    used: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LocalKind {
    Let,
    Param,
    /// `param`, `grad`, `step`, `mask`: bound by the item kind.
    Implicit,
    State,
    Loop,
    /// `model` and `batch` in a recipe.
    Recipe,
    /// A model's `let`: visible only while checking initializers.
    ModelLet,
}

/// What the code being checked belongs to; decides which statements and names are allowed.
#[derive(Clone, Debug, PartialEq)]
enum Ctx {
    Fn,
    Optimizer,
    Sparsity,
    Recipe,
    Model(ModelTy),
}

pub struct Checker<'m> {
    pub modules: &'m Modules,
    pub diagnostics: Vec<Diagnostic>,
    pub typed: Vec<TypedBinding>,
    pub recipes: Vec<(ItemRef, crate::recipe::CheckedRecipe)>,
    next_sym: u32,
    sym_origin: HashMap<u32, (FileId, Span, String)>,
    /// Loop variables of enclosing `for` members and their end bounds (array extents).
    loop_ends: Vec<(String, Dim)>,
    subst: HashMap<u32, Dim>,
    sigs: HashMap<(ItemRef, Option<String>), Rc<Signature>>,
    models: HashMap<ItemRef, Rc<ModelInfo>>,
    scopes: Vec<HashMap<String, Local>>,
    module: usize,
    file: FileId,
    ctx: Vec<Ctx>,
    /// Set after a syntax error in the current item: unknown names are then not reported.
    poisoned: bool,
    /// The declared shape while checking a `param` initializer (`normal(std = 0.02)`).
    pub(crate) init_target: Option<TensorTy>,
    used_imports: HashMap<(usize, String), bool>,
    /// True while checking a recipe's `optimize`/`sparsify`/`decode` right-hand side.
    recipe_rule: bool,
    /// The current recipe's `let` names, and whether each is a constant (usable in every field
    /// after it): where one is unknown, the error says why.
    recipe_lets: Vec<(String, bool)>,
    /// True while checking a model member's initializer, where other members are not values.
    in_initializer: bool,
}

pub(crate) struct ArgVal<'e> {
    pub ty: Ty,
    pub span: Span,
    pub expr: &'e Expr,
}

impl<'m> Checker<'m> {
    pub fn new(modules: &'m Modules) -> Checker<'m> {
        Checker {
            modules,
            diagnostics: vec![],
            typed: vec![],
            recipes: vec![],
            next_sym: 1,
            sym_origin: HashMap::new(),
            loop_ends: vec![],
            subst: HashMap::new(),
            sigs: HashMap::new(),
            models: HashMap::new(),
            scopes: vec![],
            module: 0,
            file: FileId(0),
            ctx: vec![],
            poisoned: false,
            init_target: None,
            used_imports: HashMap::new(),
            recipe_rule: false,
            recipe_lets: vec![],
            in_initializer: false,
        }
    }

    // ------------------------------------------------------------------ diagnostics helpers

    pub(crate) fn error(
        &mut self,
        code: &'static str,
        span: Span,
        message: String,
        label: impl Into<String>,
    ) -> &mut Diagnostic {
        let d = Diagnostic::error(code, message).label(self.file, span, label);
        self.diagnostics.push(d);
        self.diagnostics.last_mut().unwrap()
    }

    pub(crate) fn file(&self) -> FileId {
        self.file
    }

    // ------------------------------------------------------------------ symbols

    pub(crate) fn fresh_sym(&mut self, name: &str, var: bool, origin: String, span: Span) -> Sym {
        let id = self.next_sym;
        self.next_sym += 1;
        self.sym_origin.insert(id, (self.file, span, origin));
        Sym { id, name: Rc::from(name), var }
    }

    /// Applies the unification substitution.
    pub(crate) fn resolve_dim(&self, d: &Dim) -> Dim {
        let mut cur = d.clone();
        for _ in 0..16 {
            let next = cur.subst(&|s: &Sym| if s.var { self.subst.get(&s.id).cloned() } else { None });
            if next == cur {
                break;
            }
            cur = next;
        }
        cur
    }

    pub(crate) fn resolve_shape(&self, s: &Shape) -> Shape {
        match s {
            Shape::Dims(d) => Shape::Dims(d.iter().map(|x| self.resolve_dim(x)).collect()),
            Shape::Param => Shape::Param,
        }
    }

    pub(crate) fn resolve_ty(&self, t: &Ty) -> Ty {
        match t {
            Ty::Tensor(tt) => Ty::Tensor(TensorTy { shape: self.resolve_shape(&tt.shape), ..tt.clone() }),
            Ty::Dim(d) => Ty::Dim(self.resolve_dim(d)),
            Ty::List(v) => Ty::List(v.iter().map(|x| self.resolve_ty(x)).collect()),
            Ty::TensorArray(tt, n) => {
                Ty::TensorArray(TensorTy { shape: self.resolve_shape(&tt.shape), ..tt.clone() }, self.resolve_dim(n))
            }
            other => other.clone(),
        }
    }

    /// Unifies two dimensions; returns false when they provably differ.
    pub(crate) fn unify(&mut self, a: &Dim, b: &Dim) -> bool {
        let a = self.resolve_dim(a);
        let b = self.resolve_dim(b);
        if a == b {
            return true;
        }
        for (x, y) in [(&a, &b), (&b, &a)] {
            if let Some(s) = x.as_sym() {
                if s.var {
                    let mut occurs = vec![];
                    y.syms(&mut occurs);
                    if !occurs.contains(s) {
                        self.subst.insert(s.id, y.clone());
                        return true;
                    }
                }
            }
        }
        let diff = a.sub(&b);
        let mut syms = vec![];
        diff.syms(&mut syms);
        let vars: Vec<Sym> = syms.into_iter().filter(|s| s.var).collect();
        if vars.is_empty() {
            return false;
        }
        // Solve `c * v + rest = 0` for a single variable appearing linearly.
        if vars.len() == 1 {
            let v = vars[0].clone();
            let zero = Dim::constant(0);
            let vid = v.id;
            let rest = diff.subst(&|s: &Sym| if s.id == vid { Some(zero.clone()) } else { None });
            let with_one = diff.subst(&|s: &Sym| if s.id == vid { Some(Dim::constant(1)) } else { None });
            let coeff = with_one.sub(&rest);
            if let Some(c) = coeff.as_const() {
                let with_two = diff.subst(&|s: &Sym| if s.id == vid { Some(Dim::constant(2)) } else { None });
                let linear = with_two.sub(&rest) == Dim::constant(2 * c);
                if linear && c != 0 {
                    let value = rest.neg().div(&Dim::constant(c));
                    if let (Some(r), Some(_)) = (rest.as_const(), value.as_const()) {
                        if r % c != 0 {
                            return false;
                        }
                    }
                    self.subst.insert(v.id, value);
                    return true;
                }
            }
        }
        // Undecidable here (non-linear in the unknowns): accept rather than guess.
        true
    }

    /// Adds to the last diagnostic a secondary label at the place where each symbolic
    /// dimension of the given shapes was bound ("`D` was bound by parameter `hidden`").
    pub(crate) fn add_origins(&mut self, shapes: &[&Shape]) {
        let mut syms = vec![];
        for s in shapes {
            if let Shape::Dims(d) = self.resolve_shape(s) {
                for x in d {
                    x.syms(&mut syms);
                }
            }
        }
        let mut labels = vec![];
        for s in &syms {
            if let Some((file, span, origin)) = self.sym_origin.get(&s.id) {
                if s.var {
                    // Variables of a callee's signature: name the callee's declaration.
                    labels.push(crate::diag::Label {
                        file: *file,
                        span: *span,
                        message: format!("`{}` {}", s.name, origin),
                    });
                } else {
                    labels.push(crate::diag::Label {
                        file: *file,
                        span: *span,
                        message: format!("`{}` {}", s.name, origin),
                    });
                }
            }
        }
        if let Some(d) = self.diagnostics.last_mut() {
            for l in labels {
                if !d.labels.iter().any(|x| x.span == l.span && x.file == l.file) {
                    d.labels.push(l);
                }
            }
        }
    }

    // ------------------------------------------------------------------ scopes

    fn push_scope(&mut self) {
        self.scopes.push(HashMap::new());
    }

    fn pop_scope(&mut self) {
        if let Some(scope) = self.scopes.pop() {
            let mut unused: Vec<(&String, &Local)> = scope
                .iter()
                .filter(|(n, l)| {
                    matches!(l.kind, LocalKind::Let | LocalKind::ModelLet) && !l.used && !n.starts_with('_')
                })
                .collect();
            unused.sort_by_key(|(_, l)| l.span.start);
            for (name, l) in unused {
                if self.poisoned {
                    continue;
                }
                self.diagnostics.push(
                    Diagnostic::warning("W0001", format!("`{name}` is never used"))
                        .label(self.file, l.span, "bound here and never read")
                        .help(format!("remove it, or rename it to `_{name}` to keep it")),
                );
            }
        }
    }

    fn bind(&mut self, name: &str, ty: Ty, span: Span, kind: LocalKind) {
        if let Some(scope) = self.scopes.last_mut() {
            // Shadowing a `let` in the same scope counts as a use of the old binding: the
            // idiom `let x = f(x)` is common and not a mistake.
            if let Some(prev) = scope.get(name) {
                if prev.kind == LocalKind::Let && !prev.used && kind == LocalKind::Let {
                    if let Some(p) = scope.get_mut(name) {
                        p.used = true;
                    }
                }
            }
            scope.insert(name.to_string(), Local { ty, span, kind, used: false });
        }
    }

    fn lookup_local(&mut self, name: &str) -> Option<&mut Local> {
        let init = self.in_initializer;
        self.scopes.iter_mut().rev().find_map(|s| s.get_mut(name).filter(|l| init || l.kind != LocalKind::ModelLet))
    }

    fn record(&mut self, kind: &'static str, name: &str, span: Span, ty: &Ty) {
        let ty = self.resolve_ty(ty).to_string();
        self.typed.push(TypedBinding { file: self.file, span, kind, name: name.to_string(), ty });
    }

    // ------------------------------------------------------------------ entry points

    /// Checks every item of module `m`.
    pub fn check_module(&mut self, m: usize) {
        self.module = m;
        self.file = self.modules.list[m].file;
        let n = self.modules.list[m].ast.items.len();
        for i in 0..n {
            let r = ItemRef { module: m, item: i };
            self.check_item(r);
        }
        let used = |name: &String| self.used_imports.get(&(m, name.clone())).copied().unwrap_or(false);
        let imports = &self.modules.list[m].imports;
        let mut unused: Vec<(String, Span)> =
            imports.iter().filter(|(name, i)| !i.glob && !used(name)).map(|(n, i)| (n.clone(), i.span)).collect();
        // A glob is unused when none of its names is.
        let mut globs: Vec<Span> = imports.values().filter(|i| i.glob).map(|i| i.span).collect();
        globs.sort_by_key(|s| s.start);
        globs.dedup();
        for g in globs {
            if !imports.iter().any(|(n, i)| i.glob && i.span == g && used(n)) {
                unused.push(("*".to_string(), g));
            }
        }
        unused.sort_by_key(|(_, s)| s.start);
        for (name, span) in unused {
            self.diagnostics.push(
                Diagnostic::warning("W0002", format!("`{name}` is imported but never used"))
                    .label(self.file, span, "unused import")
                    .help("remove the import"),
            );
        }
    }

    fn enter_item(&mut self, r: ItemRef) {
        self.module = r.module;
        self.file = self.modules.list[r.module].file;
        self.scopes.clear();
        self.ctx.clear();
        self.poisoned = false;
    }

    fn check_item(&mut self, r: ItemRef) {
        self.enter_item(r);
        let modules = self.modules;
        let item = modules.item(r);
        match &item.kind {
            ItemKind::Use(_) | ItemKind::Error => {}
            ItemKind::Fn(f) => self.check_fn(r, f),
            ItemKind::Rule(rule) => self.check_rule(r, rule),
            ItemKind::Model(m) => self.check_model(r, m),
            ItemKind::Recipe(rec) => {
                let checked = crate::recipe::check_recipe(self, r, rec);
                self.recipes.push((r, checked));
            }
        }
    }

    fn block_has_error(stmts: &[Stmt]) -> bool {
        stmts.iter().any(|s| match &s.kind {
            StmtKind::Error => true,
            StmtKind::For { body, .. } => Self::block_has_error(body),
            _ => false,
        })
    }

    // ------------------------------------------------------------------ signatures

    /// The signature of a fn-like item, a rule, a model's parameters (`method = None`) or a
    /// model method.
    pub fn signature(&mut self, r: ItemRef, method: Option<&str>) -> Rc<Signature> {
        let key = (r, method.map(|s| s.to_string()));
        if let Some(s) = self.sigs.get(&key) {
            return s.clone();
        }
        // Compute in the item's own module, saving and restoring the current context.
        let saved = (self.module, self.file, std::mem::take(&mut self.scopes));
        self.module = r.module;
        self.file = self.modules.list[r.module].file;
        let modules = self.modules;
        let item = modules.item(r);
        let sig = match (&item.kind, method) {
            (ItemKind::Fn(f), None) => self.make_signature(&f.params, f.ret.as_ref()),
            (ItemKind::Rule(rule), None) => self.make_signature(&rule.params, None),
            (ItemKind::Model(m), None) => self.make_signature(&m.params, None),
            (ItemKind::Model(m), Some(name)) => {
                let info = self.model_info(r);
                let f = find_method(m, name);
                match f {
                    Some(f) => {
                        self.scopes.push(HashMap::new());
                        for (p, sp) in info.config.params.iter().zip(m.params.iter()) {
                            self.bind(&p.name, p.ty.clone(), sp.span, LocalKind::Param);
                        }
                        let s = self.make_signature(&f.params, f.ret.as_ref());
                        self.scopes.pop();
                        s
                    }
                    None => Signature { params: vec![], ret: None, syms: vec![], file: self.file },
                }
            }
            _ => Signature { params: vec![], ret: None, syms: vec![], file: self.file },
        };
        self.module = saved.0;
        self.file = saved.1;
        self.scopes = saved.2;
        let sig = Rc::new(sig);
        self.sigs.insert(key, sig.clone());
        sig
    }

    fn make_signature(&mut self, params: &[Param], ret: Option<&TypeExpr>) -> Signature {
        let mut syms: Vec<Sym> = vec![];
        let mut named: HashMap<String, Sym> = HashMap::new();
        let mut out = vec![];
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for p in params {
            if let Some(prev) = seen.insert(&p.name.name, p.name.span) {
                let file = self.file;
                self.error(
                    "E0205",
                    p.name.span,
                    format!("parameter `{}` is declared twice", p.name.name),
                    "declared again here",
                )
                .labels
                .push(crate::diag::Label { file, span: prev, message: "first declared here".into() });
            }
            let ty = self.type_expr(
                &p.ty,
                &mut named,
                &mut syms,
                &format!("parameter `{}`", p.name.name),
                true,
                Some(&p.name.name),
            );
            out.push(SigParam { name: p.name.name.clone(), ty, has_default: p.default.is_some(), span: p.span });
        }
        let ret = ret.map(|t| {
            let ty = self.type_expr(t, &mut named, &mut syms, "the return type", false, None);
            if let Ty::Dim(_) = ty {
                // A return type `i32` is a runtime scalar, not a constant.
                Ty::scalar(Dtype::parse(&t.dtype.name).unwrap_or(Dtype::I32))
            } else {
                ty
            }
        });
        Signature { params: out, ret, syms, file: self.file }
    }

    /// Converts a type expression. New dimension names become rigid symbols of the
    /// signature; names bound in scope (model parameters) are used as they are. An integer
    /// scalar parameter becomes a compile-time constant symbol named after the parameter.
    fn type_expr(
        &mut self,
        t: &TypeExpr,
        named: &mut HashMap<String, Sym>,
        syms: &mut Vec<Sym>,
        what: &str,
        allow_new: bool,
        param_name: Option<&str>,
    ) -> Ty {
        if t.dtype.name == "str" && t.dims.is_none() {
            return Ty::Str(None);
        }
        let Some(dtype) = Dtype::parse(&t.dtype.name) else {
            let help = did_you_mean(&t.dtype.name, &["f32", "f16", "bf16", "f64", "i32", "i64", "bool", "str"])
                .unwrap_or_else(|| "dtypes are f32, f16, bf16, f64, i32, i64, bool (and str for settings)".into());
            self.error("E0312", t.dtype.span, format!("unknown dtype `{}`", t.dtype.name), "not a dtype").help =
                Some(help);
            return Ty::Unknown;
        };
        match &t.dims {
            None => {
                if dtype.is_int() {
                    if let Some(pn) = param_name {
                        let origin = format!("is the value of {what}");
                        let s = self.fresh_sym(pn, false, origin, t.span);
                        syms.push(s.clone());
                        named.insert(pn.to_string(), s.clone());
                        return Ty::Dim(Dim::sym(s));
                    }
                }
                Ty::scalar(dtype)
            }
            Some(dims) => {
                let mut out = vec![];
                for d in dims {
                    match self.dim_expr(d, named, syms, what, allow_new) {
                        Some(x) => out.push(x),
                        None => return Ty::Unknown,
                    }
                }
                Ty::tensor(dtype, out)
            }
        }
    }

    fn dim_expr(
        &mut self,
        e: &Expr,
        named: &mut HashMap<String, Sym>,
        syms: &mut Vec<Sym>,
        what: &str,
        allow_new: bool,
    ) -> Option<Dim> {
        Some(match &e.kind {
            ExprKind::Int(i) => Dim::constant(*i),
            ExprKind::Paren(x) => self.dim_expr(x, named, syms, what, allow_new)?,
            ExprKind::Unary(UnOp::Neg, x) => self.dim_expr(x, named, syms, what, allow_new)?.neg(),
            ExprKind::Underscore => {
                let s = self.fresh_sym("_", true, format!("was inferred for {what}"), e.span);
                Dim::sym(s)
            }
            ExprKind::Name(n) => {
                if let Some(s) = named.get(n) {
                    return Some(Dim::sym(s.clone()));
                }
                if let Some(l) = self.lookup_local(n) {
                    l.used = true;
                    if let Ty::Dim(d) = &l.ty {
                        return Some(d.clone());
                    }
                }
                if !allow_new {
                    // A return type may only use dimensions the parameters bound.
                    self.error(
                        "E0312",
                        e.span,
                        format!("dimension `{n}` is not bound by any parameter"),
                        "unbound dimension",
                    )
                    .help = Some("use a dimension that appears in a parameter's type, or `_` to infer it".into());
                    return None;
                }
                let origin = format!("was bound by {what}");
                let s = self.fresh_sym(n, false, origin, e.span);
                syms.push(s.clone());
                named.insert(n.clone(), s.clone());
                Dim::sym(s)
            }
            ExprKind::Binary(op, a, b) => {
                let a = self.dim_expr(a, named, syms, what, allow_new)?;
                let b = self.dim_expr(b, named, syms, what, allow_new)?;
                match op {
                    BinOp::Add => a.add(&b),
                    BinOp::Sub => a.sub(&b),
                    BinOp::Mul => a.mul(&b),
                    BinOp::Div => a.div(&b),
                    BinOp::Rem => a.rem(&b),
                    _ => {
                        self.error(
                            "E0312",
                            e.span,
                            format!("`{}` cannot appear in a dimension", op.symbol()),
                            "not dimension arithmetic",
                        )
                        .help = Some("dimensions use integers, names, `+ - * / %` and `_`".into());
                        return None;
                    }
                }
            }
            _ => {
                self.error("E0312", e.span, "invalid dimension".into(), "not a dimension").help =
                    Some("a dimension is an integer, a name, `_` or arithmetic of those".into());
                return None;
            }
        })
    }

    /// Instantiates a signature for one call: its symbols become fresh variables. `pre`
    /// substitutes symbols first (a model's parameters for a method call).
    fn instantiate(&mut self, sig: &Signature, pre: &HashMap<u32, Dim>, call: Span) -> (Vec<SigParam>, Option<Ty>) {
        let mut map: HashMap<u32, Dim> = pre.clone();
        for s in &sig.syms {
            let (file, decl, origin) = self.sym_origin.get(&s.id).cloned().unwrap_or((self.file, call, String::new()));
            let v = self.fresh_sym(&s.name, true, String::new(), call);
            self.sym_origin.insert(v.id, (file, decl, origin));
            map.insert(s.id, Dim::sym(v));
        }
        let f = |s: &Sym| map.get(&s.id).cloned();
        let params = sig.params.iter().map(|p| SigParam { ty: subst_ty(&p.ty, &f), ..p.clone() }).collect();
        let ret = sig.ret.as_ref().map(|t| subst_ty(t, &f));
        (params, ret)
    }

    // ------------------------------------------------------------------ models

    pub fn model_info(&mut self, r: ItemRef) -> Rc<ModelInfo> {
        if let Some(m) = self.models.get(&r) {
            return m.clone();
        }
        let modules = self.modules;
        let ItemKind::Model(m) = &modules.item(r).kind else {
            return Rc::new(ModelInfo {
                item: r,
                file: self.file,
                config: Signature { params: vec![], ret: None, syms: vec![], file: self.file },
                members: vec![],
                methods: BTreeMap::new(),
            });
        };
        // Insert a placeholder first so a model that contains itself does not recurse.
        let config = (*self.signature(r, None)).clone();
        let saved = (self.module, self.file, std::mem::take(&mut self.scopes), self.diagnostics.len());
        self.module = r.module;
        self.file = modules.list[r.module].file;
        self.models.insert(
            r,
            Rc::new(ModelInfo {
                item: r,
                file: self.file,
                config: config.clone(),
                members: vec![],
                methods: BTreeMap::new(),
            }),
        );
        self.scopes.push(HashMap::new());
        for (p, sp) in config.params.iter().zip(m.params.iter()) {
            self.bind(&p.name, p.ty.clone(), sp.span, LocalKind::Param);
        }
        let members = self.member_decls(&m.members);
        self.scopes.pop();
        let mut methods = BTreeMap::new();
        collect_methods(&m.members, &mut |f: &FnDef| {
            methods.insert(f.name.name.clone(), ());
        });
        let info = Rc::new(ModelInfo { item: r, file: self.file, config, members, methods: BTreeMap::new() });
        self.models.insert(r, info);
        // Method signatures are computed lazily by `signature(r, Some(name))`.
        let sigs: BTreeMap<String, Signature> =
            methods.keys().map(|n| (n.clone(), (*self.signature(r, Some(n))).clone())).collect();
        let mut info = (*self.models[&r]).clone();
        info.methods = sigs;
        let info = Rc::new(info);
        self.models.insert(r, info.clone());
        // Diagnostics from building member declarations are reported by `check_model`, so
        // they are not duplicated when another module asks for this model's info.
        self.diagnostics.truncate(saved.3);
        self.module = saved.0;
        self.file = saved.1;
        self.scopes = saved.2;
        info
    }

    fn member_decls(&mut self, members: &[Member]) -> Vec<MemberDecl> {
        let mut out = vec![];
        for m in members {
            match &m.kind {
                MemberKind::Param { name, index, ty, buffer, .. } => {
                    let mut named = HashMap::new();
                    let mut syms = vec![];
                    let t =
                        self.type_expr(ty, &mut named, &mut syms, &format!("parameter `{}`", name.name), false, None);
                    let array = index.as_ref().and_then(|i| self.array_extent(i));
                    let t = match t {
                        Ty::Tensor(t) => t,
                        Ty::Dim(_) => TensorTy::scalar(Dtype::parse(&ty.dtype.name).unwrap_or(Dtype::F32)),
                        _ => TensorTy::scalar(Dtype::F32),
                    };
                    out.push(MemberDecl::Param {
                        name: name.name.clone(),
                        ty: t,
                        array,
                        span: name.span,
                        buffer: *buffer,
                    });
                }
                MemberKind::Sub { name, index, value } => {
                    let array = index.as_ref().and_then(|i| self.array_extent(i));
                    let ty = self.expr(value);
                    if let Ty::Model(mt) = ty {
                        out.push(MemberDecl::Sub { name: name.name.clone(), model: mt, array, span: name.span });
                    }
                }
                MemberKind::For { var, start, end, members } => {
                    let s = self.dim_value(start);
                    let e = self.dim_value(end);
                    let sym =
                        self.fresh_sym(&var.name, false, format!("is the loop variable `{}`", var.name), var.span);
                    self.push_scope();
                    self.bind(&var.name, Ty::Dim(Dim::sym(sym.clone())), var.span, LocalKind::Loop);
                    // The array extent of `x[l]` inside `for l in a..b` is `b`.
                    self.loop_ends.push((var.name.clone(), e.clone().unwrap_or_default()));
                    let inner = self.member_decls(members);
                    self.loop_ends.pop();
                    self.scopes.pop();
                    out.push(MemberDecl::For {
                        var: sym,
                        start: s.unwrap_or_default(),
                        end: e.unwrap_or_default(),
                        members: inner,
                    });
                }
                MemberKind::Fn(_) | MemberKind::Let { .. } | MemberKind::Error => {}
            }
        }
        out
    }

    fn array_extent(&mut self, index: &Expr) -> Option<Dim> {
        if let ExprKind::Name(n) = &index.unparen().kind {
            if let Some((_, end)) = self.loop_ends.iter().rev().find(|(v, _)| v == n) {
                return Some(end.clone());
            }
        }
        self.error(
            "E0315",
            index.span,
            "an array member must be indexed by its loop variable".into(),
            "not a loop variable",
        )
        .help = Some("write `param w[l]: ...` or `sub blocks[l] = ...` inside `for l in 0..L`".into());
        None
    }

    /// A compile-time integer value of an expression, or a diagnostic.
    pub(crate) fn dim_value(&mut self, e: &Expr) -> Option<Dim> {
        match self.expr(e) {
            Ty::Dim(d) => Some(d),
            Ty::Unknown => None,
            other => {
                self.error(
                    "E0310",
                    e.span,
                    format!("expected a compile-time integer, found {}", other.describe()),
                    "must be known at build time",
                )
                .help = Some("use an integer literal, a dimension, or an integer parameter".into());
                None
            }
        }
    }

    fn check_model(&mut self, r: ItemRef, m: &ModelDef) {
        let info = self.model_info(r);
        self.enter_item(r);
        let self_ty = ModelTy { item: r, config: info.config.params.iter().map(|p| p.ty.clone()).collect() };
        self.ctx.push(Ctx::Model(self_ty.clone()));
        self.push_scope();
        for (p, sp) in info.config.params.iter().zip(m.params.iter()) {
            self.bind(&p.name, p.ty.clone(), sp.span, LocalKind::Param);
            self.record("model parameter", &p.name, sp.name.span, &p.ty);
            if let Some(d) = &sp.default {
                self.check_default(&p.ty, d, &p.name);
            }
        }
        // Re-run member declarations here so their diagnostics are reported once, in this
        // module, and check initializers.
        let mut names: HashMap<String, Span> = HashMap::new();
        self.check_members(&m.members, &mut names, &self_ty);
        self.pop_scope();
    }

    fn check_members(&mut self, members: &[Member], names: &mut HashMap<String, Span>, self_ty: &ModelTy) {
        for mem in members {
            let name = match &mem.kind {
                MemberKind::Param { name, .. } | MemberKind::Sub { name, .. } | MemberKind::Let { name, .. } => {
                    Some(name)
                }
                MemberKind::Fn(f) => Some(&f.name),
                _ => None,
            };
            if let Some(n) = name {
                if let Some(prev) = names.insert(n.name.clone(), n.span) {
                    let file = self.file;
                    self.error(
                        "E0205",
                        n.span,
                        format!("member `{}` is declared twice", n.name),
                        "declared again here",
                    )
                    .labels
                    .push(crate::diag::Label {
                        file,
                        span: prev,
                        message: "first declared here".into(),
                    });
                }
            }
            match &mem.kind {
                MemberKind::Param { name, index, ty, init, buffer } => {
                    let mut named = HashMap::new();
                    let mut syms = vec![];
                    let t =
                        self.type_expr(ty, &mut named, &mut syms, &format!("parameter `{}`", name.name), false, None);
                    if let Some(i) = index {
                        self.array_extent(i);
                    }
                    let target = match &t {
                        Ty::Tensor(tt) => Some(tt.clone()),
                        _ => None,
                    };
                    if let Some(tt) = &target {
                        if !tt.dtype.is_float() && !*buffer {
                            self.error(
                                "E0301",
                                ty.span,
                                format!(
                                    "parameter `{}` must have a floating-point dtype, not `{}`",
                                    name.name, tt.dtype
                                ),
                                "trainable parameters are floats",
                            )
                            .help = Some(format!(
                                "model state that is never trained (indices, counts) is a `buffer {}: {}[...] = ...`",
                                name.name, tt.dtype
                            ));
                        }
                    }
                    self.init_target = target;
                    self.in_initializer = true;
                    let it = self.expr(init);
                    self.in_initializer = false;
                    self.init_target = None;
                    self.accept(&t, &it, init.span, &format!("the initializer of `{}`", name.name));
                    self.record(if *buffer { "buffer" } else { "param" }, &name.name, name.span, &t);
                }
                MemberKind::Sub { name, index, value } => {
                    if let Some(i) = index {
                        self.array_extent(i);
                    }
                    self.in_initializer = true;
                    let t = self.expr(value);
                    self.in_initializer = false;
                    match &t {
                        Ty::Model(mt) if mt.item == self_ty.item => {
                            self.error(
                                "E0406",
                                value.span,
                                format!("model `{}` contains itself", name.name),
                                "a model cannot contain itself",
                            );
                        }
                        Ty::Model(_) | Ty::Unknown => {}
                        other => {
                            self.error(
                                "E0406",
                                value.span,
                                format!("`sub {}` must be a model instance, found {}", name.name, other.describe()),
                                "expected a model such as `mlp(I = D, H = 4 * D, O = D)`",
                            );
                        }
                    }
                    self.record("sub", &name.name, name.span, &t);
                }
                MemberKind::Let { name, value } => {
                    self.in_initializer = true;
                    let t = self.expr(value);
                    self.in_initializer = false;
                    self.record("let", &name.name, name.span, &t);
                    self.bind(&name.name, t, name.span, LocalKind::ModelLet);
                }
                MemberKind::Fn(f) => {
                    let sig = self.signature(self_ty.item, Some(&f.name.name));
                    self.check_fn_body(f, &sig);
                }
                MemberKind::For { var, start, end, members } => {
                    self.dim_value(start);
                    let e = self.dim_value(end);
                    let sym =
                        self.fresh_sym(&var.name, false, format!("is the loop variable `{}`", var.name), var.span);
                    self.push_scope();
                    self.bind(&var.name, Ty::Dim(Dim::sym(sym)), var.span, LocalKind::Loop);
                    self.loop_ends.push((var.name.clone(), e.unwrap_or_default()));
                    self.check_members(members, names, self_ty);
                    self.loop_ends.pop();
                    self.pop_scope();
                }
                MemberKind::Error => self.poisoned = true,
            }
        }
    }

    /// Every parameter of an instantiated model with constant dimensions, in declaration order.
    pub fn enumerate_params(&mut self, mt: &ModelTy) -> Result<Vec<ParamPath>, String> {
        let mut out = vec![];
        self.enumerate_into(mt, &mut vec![], &mut out, 0)?;
        Ok(out)
    }

    fn enumerate_into(
        &mut self,
        mt: &ModelTy,
        prefix: &mut Vec<String>,
        out: &mut Vec<ParamPath>,
        depth: usize,
    ) -> Result<(), String> {
        if depth > 32 {
            return Err("the model nests more than 32 levels deep (does it contain itself?)".into());
        }
        let info = self.model_info(mt.item);
        let mut env: HashMap<u32, Dim> = HashMap::new();
        for (p, v) in info.config.params.iter().zip(mt.config.iter()) {
            if let (Ty::Dim(d), Ty::Dim(val)) = (&p.ty, v) {
                if let Some(s) = d.as_sym() {
                    env.insert(s.id, val.clone());
                }
            }
        }
        let members = info.members.clone();
        self.enumerate_members(&members, &mut env, prefix, out, info.file, depth)
    }

    fn enumerate_members(
        &mut self,
        members: &[MemberDecl],
        env: &mut HashMap<u32, Dim>,
        prefix: &mut Vec<String>,
        out: &mut Vec<ParamPath>,
        file: FileId,
        depth: usize,
    ) -> Result<(), String> {
        let eval = |d: &Dim, env: &HashMap<u32, Dim>| -> Option<i64> {
            d.subst(&|s: &Sym| env.get(&s.id).cloned()).as_const()
        };
        for m in members {
            match m {
                MemberDecl::Param { name, ty, span, buffer, .. } => {
                    let mut shape = vec![];
                    if let Shape::Dims(dims) = &ty.shape {
                        for d in dims {
                            match eval(d, env) {
                                Some(v) if v >= 0 => shape.push(v),
                                Some(v) => return Err(format!("parameter `{name}` gets a negative dimension {v}")),
                                None => return Err(format!("the shape of parameter `{name}` is not a constant")),
                            }
                        }
                    }
                    let mut path = prefix.clone();
                    path.push(name.clone());
                    if let Some(idx) = loop_index(env) {
                        // Array members are named `name.i`.
                        path.push(idx.to_string());
                    }
                    out.push(ParamPath { path, dtype: ty.dtype, shape, file, span: *span, buffer: *buffer });
                }
                MemberDecl::Sub { name, model, array, .. } => {
                    let config: Vec<Ty> = model
                        .config
                        .iter()
                        .map(|t| match t {
                            Ty::Dim(d) => Ty::Dim(d.subst(&|s: &Sym| env.get(&s.id).cloned())),
                            other => other.clone(),
                        })
                        .collect();
                    prefix.push(name.clone());
                    if array.is_some() {
                        if let Some(idx) = loop_index(env) {
                            prefix.push(idx.to_string());
                        }
                    }
                    let inner = ModelTy { item: model.item, config };
                    let r = self.enumerate_into(&inner, prefix, out, depth + 1);
                    if array.is_some() && loop_index(env).is_some() {
                        prefix.pop();
                    }
                    prefix.pop();
                    r?;
                }
                MemberDecl::For { var, start, end, members } => {
                    let (Some(s), Some(e)) = (eval(start, env), eval(end, env)) else {
                        return Err(format!("the bounds of `for {}` are not constants", var.name));
                    };
                    if e - s > 100_000 {
                        return Err(format!("`for {}` unrolls {} times (limit 100000)", var.name, e - s));
                    }
                    for i in s..e {
                        if out.len() > MAX_PARAMS {
                            return Err(format!("the model has more than {MAX_PARAMS} parameter tensors"));
                        }
                        env.insert(var.id, Dim::constant(i));
                        env.insert(LOOP_MARK, Dim::constant(i));
                        self.enumerate_members(members, env, prefix, out, file, depth)?;
                    }
                    env.remove(&var.id);
                    env.remove(&LOOP_MARK);
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ fn-like items

    fn check_fn(&mut self, r: ItemRef, f: &FnDef) {
        let sig = self.signature(r, None);
        self.enter_item(r);
        self.ctx.push(Ctx::Fn);
        self.check_fn_body(f, &sig);
    }

    fn check_fn_body(&mut self, f: &FnDef, sig: &Signature) {
        let saved_poison = self.poisoned;
        self.poisoned = Self::block_has_error(&f.body.stmts);
        self.push_scope();
        if f.kind == FnKind::Schedule {
            self.bind("step", Ty::scalar(Dtype::I32), f.name.span, LocalKind::Implicit);
        }
        self.bind_sig_dims(sig);
        for (p, sp) in sig.params.iter().zip(f.params.iter()) {
            self.bind(&p.name, p.ty.clone(), sp.name.span, LocalKind::Param);
            self.record("param", &p.name, sp.name.span, &p.ty);
            if let Some(d) = &sp.default {
                self.check_default(&p.ty, d, &p.name);
            }
        }
        let body = self.block(&f.body);
        let needs_scalar = matches!(f.kind, FnKind::Loss | FnKind::Schedule);
        match (&f.body.value, &body) {
            (None, _) if self.poisoned => {}
            (None, _) => {
                let span = Span::new(f.body.span.end.saturating_sub(1) as usize, f.body.span.end as usize);
                self.error(
                    "E0320",
                    span,
                    format!("`{}` does not end with a value", f.name.name),
                    "the block ends without an expression",
                )
                .help = Some("end the block with the expression to return".into());
            }
            (Some(v), t) => {
                if needs_scalar {
                    if let Ty::Tensor(tt) = self.resolve_ty(t) {
                        if !tt.shape.is_scalar() || !tt.dtype.is_float() {
                            let kind = f.kind.keyword();
                            self.error(
                                "E0317",
                                v.span,
                                format!("a `{kind}` must return a floating-point scalar, found `{tt}`"),
                                "not a scalar",
                            )
                            .help = Some("reduce the value, for example with `mean(...)` or `sum(...)`".into());
                            self.pop_scope();
                            self.poisoned = saved_poison;
                            return;
                        }
                    }
                }
                if let Some(declared) = &sig.ret {
                    self.accept(declared, t, v.span, "the returned value");
                }
            }
        }
        self.pop_scope();
        self.poisoned = saved_poison;
    }

    fn check_rule(&mut self, r: ItemRef, rule: &RuleDef) {
        let sig = self.signature(r, None);
        self.enter_item(r);
        self.poisoned = Self::block_has_error(&rule.body);
        let ctx = match rule.kind {
            RuleKind::Optimizer => Ctx::Optimizer,
            RuleKind::Sparsity => Ctx::Sparsity,
        };
        self.ctx.push(ctx);
        self.push_scope();
        // An explicit `param: f32[M, N]` constrains the parameters the rule applies to.
        let explicit = sig.params.iter().find(|p| p.name == "param").map(|p| p.ty.clone());
        let param_ty = explicit.clone().unwrap_or(Ty::Tensor(TensorTy::new(Dtype::F32, Shape::Param)));
        self.bind("param", param_ty.clone(), rule.name.span, LocalKind::Implicit);
        self.bind("grad", param_ty.clone(), rule.name.span, LocalKind::Implicit);
        self.bind("step", Ty::scalar(Dtype::I32), rule.name.span, LocalKind::Implicit);
        self.bind_sig_dims(&sig);
        for (p, sp) in sig.params.iter().zip(rule.params.iter()) {
            if p.name == "param" {
                continue;
            }
            self.bind(&p.name, p.ty.clone(), sp.name.span, LocalKind::Param);
            self.record("param", &p.name, sp.name.span, &p.ty);
            if let Some(d) = &sp.default {
                self.check_default(&p.ty, d, &p.name);
            }
        }
        if rule.kind == RuleKind::Sparsity {
            let mask_ty = match &param_ty {
                Ty::Tensor(t) => Ty::Tensor(TensorTy { dtype: Dtype::Bool, ..t.clone() }),
                other => other.clone(),
            };
            self.bind("mask", mask_ty, rule.name.span, LocalKind::Implicit);
        }
        self.stmts(&rule.body);
        let assigned = |name: &str| assigns(&rule.body, name);
        match rule.kind {
            RuleKind::Optimizer if !assigned("param") && !self.poisoned => {
                self.error(
                    "E0320",
                    rule.name.span,
                    format!("optimizer `{}` never assigns `param`", rule.name.name),
                    "this optimizer has no effect",
                )
                .help = Some("assign the updated parameter, for example `param = param - lr * grad`".into());
            }
            RuleKind::Sparsity if !assigned("mask") && !self.poisoned => {
                self.error(
                    "E0320",
                    rule.name.span,
                    format!("sparsity rule `{}` never assigns `mask`", rule.name.name),
                    "this rule has no mask",
                )
                .help = Some("assign the mask, for example `mask = abs(param) >= 0.01`".into());
            }
            _ => {}
        }
        self.pop_scope();
    }

    // ------------------------------------------------------------------ statements

    fn block(&mut self, b: &Block) -> Ty {
        self.push_scope();
        self.stmts(&b.stmts);
        let t = match &b.value {
            Some(v) => self.expr(v),
            None => Ty::Unknown,
        };
        self.pop_scope();
        t
    }

    fn stmts(&mut self, stmts: &[Stmt]) {
        for s in stmts {
            self.stmt(s);
        }
    }

    fn current_ctx(&self) -> Ctx {
        self.ctx.last().cloned().unwrap_or(Ctx::Fn)
    }

    fn stmt(&mut self, s: &Stmt) {
        match &s.kind {
            StmtKind::Error => self.poisoned = true,
            StmtKind::Expr(e) => {
                self.expr(e);
            }
            StmtKind::Let { name, indices: None, ty, value } => {
                let t = self.expr(value);
                let t = match ty {
                    Some(te) => {
                        let mut named = HashMap::new();
                        let mut syms = vec![];
                        let declared = self.type_expr(
                            te,
                            &mut named,
                            &mut syms,
                            &format!("the type of `{}`", name.name),
                            true,
                            None,
                        );
                        self.accept(&declared, &t, value.span, &format!("the value of `{}`", name.name));
                        declared
                    }
                    None => t,
                };
                self.record("let", &name.name, name.span, &t);
                self.bind(&name.name, t, name.span, LocalKind::Let);
            }
            StmtKind::Let { name, indices: Some(idx), value, .. } => {
                let mut dims = vec![];
                self.push_scope();
                for iv in idx {
                    let d = self.dim_value(&iv.extent);
                    dims.push(d.unwrap_or_default());
                    self.bind(&iv.name.name, Ty::scalar(Dtype::I32), iv.name.span, LocalKind::Loop);
                }
                let t = self.expr(value);
                self.pop_scope();
                let dtype = match self.resolve_ty(&t) {
                    Ty::Tensor(tt) if tt.shape.is_scalar() => Some(tt.dtype),
                    Ty::Dim(_) => Some(Dtype::I32),
                    Ty::Unknown => None,
                    other => {
                        self.error(
                            "E0304",
                            value.span,
                            format!("the body of an index definition must be a scalar, found {}", other.describe()),
                            "evaluated at every index",
                        )
                        .help = Some("index tensors in the body with the index variables, e.g. `x[q, k]`".into());
                        None
                    }
                };
                let t = match dtype {
                    Some(d) => Ty::tensor(d, dims),
                    None => Ty::Unknown,
                };
                self.record("let", &name.name, name.span, &t);
                self.bind(&name.name, t, name.span, LocalKind::Let);
            }
            StmtKind::Assign { target, value, every } => {
                let t = self.expr(value);
                let ctx = self.current_ctx();
                let name = target.name.as_str();
                let Some(local) = self.lookup_local(name).cloned() else {
                    if !self.poisoned {
                        self.error(
                            "E0314",
                            target.span,
                            format!("cannot assign to `{name}`: it is not bound"),
                            "not a binding",
                        )
                        .help = Some(format!("introduce it with `let {name} = ...`"));
                    }
                    return;
                };
                let assignable = match local.kind {
                    LocalKind::Let | LocalKind::State => true,
                    LocalKind::Implicit => match ctx {
                        Ctx::Optimizer => name == "param",
                        Ctx::Sparsity => name == "mask" || name == "grad",
                        _ => false,
                    },
                    _ => false,
                };
                if !assignable {
                    let what = match local.kind {
                        LocalKind::Param => "a parameter",
                        LocalKind::Loop => "a loop variable",
                        LocalKind::Implicit => "an implicit binding that this item kind cannot change",
                        _ => "not assignable",
                    };
                    self.error("E0314", target.span, format!("cannot assign to `{name}`: it is {what}"), "immutable")
                        .help = Some(format!("introduce a new binding with `let {name} = ...`"));
                    return;
                }
                if let Some(l) = self.lookup_local(name) {
                    l.used = true;
                }
                if name == "mask" && ctx == Ctx::Sparsity {
                    // A mask may be boolean or a float multiplier of the parameter's shape.
                    let expected = match &local.ty {
                        Ty::Tensor(tt) => Ty::Tensor(TensorTy { dtype: Dtype::Bool, ..tt.clone() }),
                        o => o.clone(),
                    };
                    if let Some(tt) = t.as_tensor() {
                        if tt.dtype.is_float() {
                            let as_float = match &expected {
                                Ty::Tensor(e) => Ty::Tensor(TensorTy { dtype: tt.dtype, ..e.clone() }),
                                o => o.clone(),
                            };
                            self.accept_shape_broadcast(&as_float, &t, value.span, "`mask`");
                        } else {
                            self.accept(&expected, &t, value.span, "`mask`");
                        }
                    } else {
                        self.accept(&expected, &t, value.span, "`mask`");
                    }
                } else if local.kind == LocalKind::Implicit || local.kind == LocalKind::State {
                    self.accept_shape_broadcast(&local.ty, &t, value.span, &format!("`{name}`"));
                } else {
                    self.accept(&local.ty, &t, value.span, &format!("`{name}`"));
                }
                if let Some(k) = every {
                    if !(ctx == Ctx::Sparsity && name == "mask") {
                        self.error(
                            "E0319",
                            k.span,
                            "`every` applies only to `state` and to a sparsity rule's `mask`".into(),
                            "not allowed here",
                        );
                    } else {
                        self.every(k);
                    }
                }
            }
            StmtKind::State { name, init, every } => {
                if self.current_ctx() != Ctx::Optimizer {
                    self.error(
                        "E0319",
                        s.span,
                        "`state` is only allowed in an optimizer".into(),
                        "not inside an optimizer",
                    )
                    .help = Some("use `let` for a local value".into());
                }
                let t = self.expr(init);
                if let Some(k) = every {
                    self.every(k);
                }
                self.record("state", &name.name, name.span, &t);
                self.bind(&name.name, t, name.span, LocalKind::State);
            }
            StmtKind::For { var, start, end, body } => {
                self.dim_value(start);
                self.dim_value(end);
                let sym = self.fresh_sym(&var.name, false, format!("is the loop variable `{}`", var.name), var.span);
                self.push_scope();
                self.bind(&var.name, Ty::Dim(Dim::sym(sym)), var.span, LocalKind::Loop);
                self.stmts(body);
                self.pop_scope();
            }
        }
    }

    /// A default value must fit its parameter; an integer parameter's default must be a
    /// compile-time integer (the parameter's symbol stands for whatever the caller passes).
    fn check_default(&mut self, ty: &Ty, d: &Expr, name: &str) {
        let t = self.expr(d);
        match ty {
            Ty::Dim(_) => match &t {
                Ty::Dim(_) | Ty::Unknown => {}
                other => {
                    self.error(
                        "E0310",
                        d.span,
                        format!("the default of `{name}` must be a compile-time integer, found {}", other.describe()),
                        "not an integer constant",
                    );
                }
            },
            _ => {
                self.accept(ty, &t, d.span, &format!("the default of `{name}`"));
            }
        }
    }

    /// Binds the dimension symbols of a signature by name, so the body can use them as
    /// values (`reshape(x, [B * S, D])`).
    fn bind_sig_dims(&mut self, sig: &Signature) {
        for s in &sig.syms {
            if self.lookup_local(&s.name).is_none() {
                self.bind(&s.name.to_string(), Ty::Dim(Dim::sym(s.clone())), Span::default(), LocalKind::Loop);
            }
        }
    }

    fn every(&mut self, k: &Expr) {
        let t = self.expr(k);
        match &t {
            Ty::Dim(_) | Ty::Unknown => {}
            other => {
                self.error(
                    "E0310",
                    k.span,
                    format!("`every` needs a compile-time integer, found {}", other.describe()),
                    "must be known at build time",
                );
            }
        }
    }

    // ------------------------------------------------------------------ acceptance

    /// Checks that `actual` can be passed where `expected` is declared: same dtype (a weak
    /// literal adapts), same rank, unifiable dimensions.
    pub(crate) fn accept(&mut self, expected: &Ty, actual: &Ty, span: Span, what: &str) -> bool {
        let expected = self.resolve_ty(expected);
        let actual = self.resolve_ty(actual);
        match (&expected, &actual) {
            (Ty::Unknown, _) | (_, Ty::Unknown) => true,
            (Ty::Dim(e), Ty::Dim(a)) => {
                if !self.unify(e, a) {
                    let e2 = self.resolve_dim(e);
                    self.error("E0302", span, format!("{what} must be `{e2}`, found `{a}`"), format!("this is `{a}`"));
                    return false;
                }
                true
            }
            (Ty::Dim(_), other) => {
                self.error(
                    "E0310",
                    span,
                    format!("{what} must be a compile-time integer, found {}", other.describe()),
                    "must be known at build time",
                )
                .help = Some("pass an integer literal or a dimension".into());
                false
            }
            (Ty::Str(_), Ty::Str(_)) => true,
            (Ty::Tensor(e), a) if a.as_tensor().is_some() => {
                let a = a.as_tensor().unwrap_or_else(|| TensorTy::scalar(Dtype::F32));
                if e.dtype != a.dtype {
                    let ok_weak = a.weak && (e.dtype.is_float() || (e.dtype.is_int() && a.dtype.is_int()));
                    if !ok_weak {
                        let help = format!("convert explicitly, e.g. `{}(...)`", e.dtype);
                        self.error(
                            "E0301",
                            span,
                            format!("{what} must be `{}`, found `{}`", e.dtype, a.dtype),
                            format!("this is `{a}`"),
                        )
                        .help = Some(help);
                        return false;
                    }
                }
                self.unify_shapes(&e.shape, &a.shape, span, what)
            }
            (e, a) => {
                if std::mem::discriminant(e) == std::mem::discriminant(a) {
                    return true;
                }
                self.error(
                    "E0318",
                    span,
                    format!("{what} must be {}, found {}", e.describe(), a.describe()),
                    format!("this is {}", a.describe()),
                );
                false
            }
        }
    }

    /// Like `accept` but the value may broadcast to the expected shape (assignments to
    /// optimizer states and `param`, which keep their shape).
    fn accept_shape_broadcast(&mut self, expected: &Ty, actual: &Ty, span: Span, what: &str) -> bool {
        let (Some(e), Some(a)) = (expected.as_tensor(), actual.as_tensor()) else {
            return self.accept(expected, actual, span, what);
        };
        if e.dtype != a.dtype && !a.weak && !(e.dtype.is_float() && a.dtype.is_float()) {
            self.error(
                "E0301",
                span,
                format!("{what} must be `{}`, found `{}`", e.dtype, a.dtype),
                format!("this is `{a}`"),
            );
            return false;
        }
        match builtins::broadcast(self, &e.shape, &a.shape) {
            Ok(s) => {
                if s != self.resolve_shape(&e.shape) {
                    self.error(
                        "E0302",
                        span,
                        format!("{what} has shape {}, but the value has shape {}", e.shape, a.shape),
                        "would change the shape",
                    );
                    return false;
                }
                true
            }
            Err(msg) => {
                self.error("E0302", span, format!("{what}: {msg}"), "shape mismatch");
                false
            }
        }
    }

    pub(crate) fn unify_shapes(&mut self, e: &Shape, a: &Shape, span: Span, what: &str) -> bool {
        // On a mismatch, bindings made by this same comparison are rolled back so the
        // message shows the declared shape, not one half-bound to the wrong argument.
        let before = self.subst.clone();
        let ok = self.unify_shapes_inner(e, a, span, what, &before);
        ok
    }

    fn unify_shapes_inner(&mut self, e: &Shape, a: &Shape, span: Span, what: &str, before: &HashMap<u32, Dim>) -> bool {
        match (e, a) {
            (Shape::Param, Shape::Param) => true,
            (Shape::Dims(ed), Shape::Dims(ad)) => {
                if ed.len() != ad.len() {
                    self.error(
                        "E0304",
                        span,
                        format!("{what} must have shape {e} (rank {}), found {a} (rank {})", ed.len(), ad.len()),
                        format!("this has rank {}", ad.len()),
                    );
                    self.add_origins(&[e, a]);
                    return false;
                }
                for (x, y) in ed.iter().zip(ad.iter()) {
                    if !self.unify(x, y) {
                        self.subst = before.clone();
                        let es = self.resolve_shape(e);
                        let as_ = self.resolve_shape(a);
                        self.error(
                            "E0302",
                            span,
                            format!("{what} must have shape {es}, found {as_}"),
                            format!("this has shape {as_}"),
                        );
                        self.add_origins(&[e, a]);
                        return false;
                    }
                }
                true
            }
            (Shape::Param, Shape::Dims(d)) if d.is_empty() => true,
            _ => {
                self.error("E0302", span, format!("{what} must have shape {e}, found {a}"), "shape mismatch");
                false
            }
        }
    }

    // ------------------------------------------------------------------ expressions

    pub(crate) fn expr(&mut self, e: &Expr) -> Ty {
        let t = self.expr_inner(e);
        self.resolve_ty(&t)
    }

    fn expr_inner(&mut self, e: &Expr) -> Ty {
        match &e.kind {
            ExprKind::Int(i) => Ty::Dim(Dim::constant(*i)),
            ExprKind::Float { .. } => Ty::weak_float(),
            ExprKind::Bool(_) => Ty::scalar(Dtype::Bool),
            ExprKind::Str(s) => Ty::Str(Some(s.clone())),
            ExprKind::Underscore => {
                self.error("E0310", e.span, "`_` is only allowed in dimensions".into(), "not a value");
                Ty::Unknown
            }
            ExprKind::Error => Ty::Unknown,
            ExprKind::Paren(x) => self.expr(x),
            ExprKind::Name(n) => self.name(n, e.span),
            ExprKind::Unary(op, x) => {
                let t = self.expr(x);
                builtins::unary(self, *op, t, e.span)
            }
            ExprKind::Binary(op, a, b) => {
                let ta = self.expr(a);
                let tb = self.expr(b);
                builtins::binary(self, *op, ta, tb, a.span, b.span, e.span)
            }
            ExprKind::Transpose(x) => {
                let t = self.expr(x);
                builtins::transpose_last_two(self, t, e.span)
            }
            ExprKind::Ternary { cond, then, otherwise } => {
                let c = self.expr(cond);
                self.condition(&c, cond.span);
                let a = self.expr(then);
                let b = self.expr(otherwise);
                builtins::join(self, a, b, then.span, otherwise.span)
            }
            ExprKind::If { cond, then, otherwise } => {
                let c = self.expr(cond);
                self.condition(&c, cond.span);
                let a = self.block(then);
                let b = self.block(otherwise);
                let (sa, sb) = (
                    then.value.as_ref().map(|v| v.span).unwrap_or(then.span),
                    otherwise.value.as_ref().map(|v| v.span).unwrap_or(otherwise.span),
                );
                if then.value.is_none() || otherwise.value.is_none() {
                    self.error(
                        "E0320",
                        if then.value.is_none() { then.span } else { otherwise.span },
                        "both branches of `if` must end with a value".into(),
                        "this branch has no value",
                    );
                    return Ty::Unknown;
                }
                builtins::join(self, a, b, sa, sb)
            }
            ExprKind::List(items) => Ty::List(items.iter().map(|x| self.expr(x)).collect()),
            ExprKind::Field { base, name } => {
                let t = self.expr(base);
                self.field(t, name, e.span)
            }
            ExprKind::Index { base, indices } => {
                let t = self.expr(base);
                builtins::index(self, t, indices, e.span)
            }
            ExprKind::Call { callee, args } => self.call(callee, args, e.span),
        }
    }

    pub(crate) fn condition(&mut self, t: &Ty, span: Span) {
        match t.as_tensor() {
            Some(tt) if tt.dtype == Dtype::Bool => {
                if !tt.shape.is_scalar() {
                    self.error(
                        "E0311",
                        span,
                        format!("an `if` condition must be a scalar `bool`, found `{tt}`"),
                        "not a scalar",
                    )
                    .help = Some("use `where(cond, a, b)` to choose elementwise".into());
                }
            }
            Some(tt) => {
                self.error("E0311", span, format!("condition must be `bool`, found `{tt}`"), "not a boolean").help =
                    Some("compare explicitly, for example `x > 0.0`".into());
            }
            None if t.is_unknown() => {}
            None => {
                self.error("E0311", span, format!("condition must be `bool`, found {}", t.describe()), "not a boolean");
            }
        }
    }

    fn name(&mut self, n: &str, span: Span) -> Ty {
        if let Some(l) = self.lookup_local(n) {
            l.used = true;
            return l.ty.clone();
        }
        // Members of the model whose method is being checked.
        let model_ctx = if self.in_initializer {
            None
        } else {
            self.ctx.iter().rev().find(|c| matches!(c, Ctx::Model(_))).cloned()
        };
        if let Some(Ctx::Model(mt)) = model_ctx {
            if let Some(t) = self.member(&mt, n) {
                return t;
            }
        }
        if let Some(r) = self.modules.find_item(self.module, n) {
            if self.modules.list[self.module].imports.contains_key(n) {
                self.used_imports.insert((self.module, n.to_string()), true);
            }
            return Ty::Callable(Callee::Item(r));
        }
        if let Some(t) = builtins::constant(n) {
            return t;
        }
        if builtins::is_builtin(n) {
            return Ty::Callable(Callee::Builtin(builtins::canonical(n)));
        }
        if self.poisoned {
            return Ty::Unknown;
        }
        let mut candidates: Vec<String> = self.scopes.iter().flat_map(|s| s.keys().cloned()).collect();
        candidates.extend(self.modules.list[self.module].items.keys().cloned());
        candidates.extend(self.modules.list[self.module].imports.keys().cloned());
        candidates.extend(builtins::names().iter().map(|s| s.to_string()));
        let refs: Vec<&str> = candidates.iter().map(|s| s.as_str()).collect();
        let model_let = self.scopes.iter().any(|s| s.get(n).is_some_and(|l| l.kind == LocalKind::ModelLet));
        let help = if model_let {
            Some(format!(
                "the model's `let {n}` is computed once, at initialization: it is in scope in the initializers after it, not in methods; keep what a method needs in a `param` (`freeze` it in the recipe if it must not train)"
            ))
        } else if let Some((_, constant)) = self.recipe_lets.iter().find(|l| l.0 == n) {
            Some(if *constant {
                format!("the recipe's `let {n}` is declared after this line; move it above the first line that uses it")
            } else {
                format!(
                    "the recipe's `let {n}` is not a constant (it reads `model`, `batch` or another such `let`), so it is in scope only in `loss` and in the `let`s after it; write the value here"
                )
            })
        } else {
            did_you_mean(n, &refs)
                .or_else(|| self.modules.std_module_of(n).map(|m| format!("`{n}` is in `{m}`: add `use {m}.{n}`")))
        };
        self.error("E0204", span, format!("unknown name `{n}`"), "not found in this scope").help = help;
        Ty::Unknown
    }

    /// The type of member `n` of a model instance, if it has one.
    fn member(&mut self, mt: &ModelTy, n: &str) -> Option<Ty> {
        let info = self.model_info(mt.item);
        let map = config_map(&info, mt);
        let f = |s: &Sym| map.get(&s.id).cloned();
        fn find(members: &[MemberDecl], n: &str) -> Option<MemberDecl> {
            for m in members {
                match m {
                    MemberDecl::Param { name, .. } | MemberDecl::Sub { name, .. } if name == n => {
                        return Some(m.clone())
                    }
                    MemberDecl::For { members, .. } => {
                        if let Some(x) = find(members, n) {
                            return Some(x);
                        }
                    }
                    _ => {}
                }
            }
            None
        }
        if let Some(m) = find(&info.members, n) {
            return Some(match m {
                MemberDecl::Param { ty, array: None, .. } => Ty::Tensor(subst_tensor(&ty, &f)),
                MemberDecl::Param { ty, array: Some(len), .. } => Ty::TensorArray(subst_tensor(&ty, &f), len.subst(&f)),
                MemberDecl::Sub { model, array: None, .. } => Ty::Model(subst_model(&model, &f)),
                MemberDecl::Sub { model, array: Some(len), .. } => {
                    Ty::ModelArray(subst_model(&model, &f), len.subst(&f))
                }
                MemberDecl::For { .. } => Ty::Unknown,
            });
        }
        if info.methods.contains_key(n) {
            return Some(Ty::Callable(Callee::Method(mt.clone(), n.to_string())));
        }
        None
    }

    fn field(&mut self, t: Ty, name: &Ident, _span: Span) -> Ty {
        match &t {
            Ty::Unknown => Ty::Unknown,
            Ty::Model(mt) => match self.member(mt, &name.name) {
                Some(t) => t,
                None => {
                    let info = self.model_info(mt.item);
                    let mut names: Vec<String> = info.methods.keys().cloned().collect();
                    collect_member_names(&info.members, &mut names);
                    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
                    let model_name = self.modules.item(mt.item).name().map(|n| n.name.clone()).unwrap_or_default();
                    let help = did_you_mean(&name.name, &refs)
                        .unwrap_or_else(|| format!("`{model_name}` has: {}", names.join(", ")));
                    self.error(
                        "E0313",
                        name.span,
                        format!("model `{model_name}` has no member `{}`", name.name),
                        "unknown member",
                    )
                    .help = Some(help);
                    Ty::Unknown
                }
            },
            Ty::Batch { batch, context } => match name.name.as_str() {
                "inputs" | "targets" => Ty::tensor(Dtype::I32, vec![batch.clone(), context.clone()]),
                _ => {
                    self.error("E0313", name.span, format!("a batch has no field `{}`", name.name), "unknown field")
                        .help = Some(
                        did_you_mean(&name.name, &["inputs", "targets"])
                            .unwrap_or_else(|| "a batch has `inputs` and `targets`".into()),
                    );
                    Ty::Unknown
                }
            },
            other => {
                self.error(
                    "E0313",
                    name.span,
                    format!("{} has no field `{}`", other.describe(), name.name),
                    "no such field",
                );
                Ty::Unknown
            }
        }
    }

    // ------------------------------------------------------------------ calls

    fn call(&mut self, callee: &Expr, args: &[Arg], span: Span) -> Ty {
        let ct = self.expr(callee);
        match ct {
            Ty::Unknown => {
                for a in args {
                    self.expr(&a.value);
                }
                Ty::Unknown
            }
            Ty::Callable(Callee::Builtin(name)) => builtins::call(self, name, args, span),
            Ty::Callable(Callee::Item(r)) => self.call_item(r, args, span, callee.span),
            Ty::Callable(Callee::Method(mt, name)) => {
                let info = self.model_info(mt.item);
                let Some(sig) = info.methods.get(&name).cloned() else { return Ty::Unknown };
                let pre = config_map(&info, &mt);
                let (params, ret) = self.instantiate(&sig, &pre, span);
                let vals = self.apply(&params, args, span, &name);
                self.fill_defaults(mt.item, Some(&name), &params, &vals);
                ret.unwrap_or(Ty::Unknown)
            }
            other => {
                for a in args {
                    self.expr(&a.value);
                }
                self.error("E0308", callee.span, format!("{} is not callable", other.describe()), "not a function")
                    .help = Some("only functions, items, built-ins and model methods can be called".into());
                Ty::Unknown
            }
        }
    }

    fn call_item(&mut self, r: ItemRef, args: &[Arg], span: Span, callee_span: Span) -> Ty {
        let modules = self.modules;
        let item = modules.item(r);
        let name = item.name().map(|n| n.name.clone()).unwrap_or_default();
        let sig = self.signature(r, None);
        match &item.kind {
            ItemKind::Fn(f) if self.recipe_rule && matches!(f.kind, FnKind::Fn | FnKind::Loss) => {
                // The recipe reports the wrong kind (E0406); the arguments are not checked
                // against a signature that was never meant to take them.
                for a in args {
                    self.expr(&a.value);
                }
                Ty::Applied(r)
            }
            ItemKind::Fn(f) if f.kind == FnKind::Decode && self.recipe_rule => {
                // `decode = top_k(k = 40)`: the first parameter receives the logits.
                let (params, _) = self.instantiate(&sig, &HashMap::new(), span);
                let rest: Vec<SigParam> = params.into_iter().skip(1).collect();
                self.apply_hyper(&rest, args, span, &name);
                Ty::Applied(r)
            }
            ItemKind::Fn(f) if f.kind == FnKind::Schedule => {
                let (params, _) = self.instantiate(&sig, &HashMap::new(), span);
                self.apply(&params, args, span, &name);
                if self.recipe_rule {
                    Ty::Schedule(r)
                } else {
                    // Inside code, a schedule is evaluated at the current `step`.
                    if self.lookup_local("step").is_none() {
                        self.error("E0318", callee_span, format!("schedule `{name}` needs a `step`"), "no `step` in scope")
                            .help = Some("schedules are applied to optimizer hyperparameters in a recipe, or called from an optimizer or schedule".into());
                    }
                    Ty::scalar(Dtype::F32)
                }
            }
            ItemKind::Fn(_) => {
                let (params, ret) = self.instantiate(&sig, &HashMap::new(), span);
                let vals = self.apply(&params, args, span, &name);
                self.fill_defaults(r, None, &params, &vals);
                ret.unwrap_or(Ty::scalar(Dtype::F32))
            }
            ItemKind::Rule(_) => {
                let params: Vec<SigParam> = sig.params.iter().filter(|p| p.name != "param").cloned().collect();
                let (params, _) = self.instantiate(&Signature { params, ..(*sig).clone() }, &HashMap::new(), span);
                self.apply_hyper(&params, args, span, &name);
                if !self.recipe_rule {
                    self.error(
                        "E0406",
                        callee_span,
                        format!("`{name}` is a {} and can only be used in a recipe", item.kind_name()),
                        "not a function",
                    )
                    .help = Some(format!("write `optimize <params> with {name}(...)` in a recipe"));
                }
                Ty::Applied(r)
            }
            ItemKind::Model(_) => {
                let (params, _) = self.instantiate(&sig, &HashMap::new(), span);
                let vals = self.apply(&params, args, span, &name);
                self.fill_defaults(r, None, &params, &vals);
                let config: Vec<Ty> = params
                    .iter()
                    .zip(vals)
                    .map(|(p, v)| match (&p.ty, v) {
                        (Ty::Dim(d), _) => Ty::Dim(self.resolve_dim(d)),
                        (_, Some(t)) => t,
                        (t, None) => t.clone(),
                    })
                    .collect();
                Ty::Model(ModelTy { item: r, config })
            }
            ItemKind::Recipe(_) => {
                self.error(
                    "E0308",
                    callee_span,
                    format!("recipe `{name}` cannot be called"),
                    "a recipe is not a function",
                );
                Ty::Unknown
            }
            ItemKind::Use(_) | ItemKind::Error => Ty::Unknown,
        }
    }

    /// Binds integer parameters left to their defaults: the default is evaluated in the
    /// callee's module with the earlier parameters' values in scope.
    fn fill_defaults(&mut self, r: ItemRef, method: Option<&str>, params: &[SigParam], vals: &[Option<Ty>]) {
        let modules = self.modules;
        let ast_params: &[Param] = match (&modules.item(r).kind, method) {
            (ItemKind::Fn(f), None) => &f.params,
            (ItemKind::Rule(rd), None) => &rd.params,
            (ItemKind::Model(m), None) => &m.params,
            (ItemKind::Model(m), Some(n)) => match find_method(m, n) {
                Some(f) => &f.params,
                None => return,
            },
            _ => return,
        };
        let needs = params
            .iter()
            .zip(vals)
            .any(|(p, v)| v.is_none() && matches!(&p.ty, Ty::Dim(d) if self.resolve_dim(d).has_vars()));
        if !needs {
            return;
        }
        let saved = (self.module, self.file, std::mem::take(&mut self.scopes), self.poisoned);
        self.module = r.module;
        self.file = modules.list[r.module].file;
        self.scopes.push(HashMap::new());
        // Diagnostics in a callee's default belong to the callee, which is checked on its own.
        let n_diags = self.diagnostics.len();
        for (i, (p, ap)) in params.iter().zip(ast_params.iter()).enumerate() {
            let value = match &vals[i] {
                Some(t) => t.clone(),
                None => match &ap.default {
                    Some(d) => {
                        let t = self.expr(d);
                        if let (Ty::Dim(expected), Ty::Dim(got)) = (&p.ty, &t) {
                            self.unify(expected, got);
                        }
                        t
                    }
                    None => p.ty.clone(),
                },
            };
            let value = if let Ty::Dim(d) = &p.ty { Ty::Dim(self.resolve_dim(d)) } else { value };
            self.bind(&p.name, value, ap.name.span, LocalKind::Param);
        }
        self.diagnostics.truncate(n_diags);
        self.module = saved.0;
        self.file = saved.1;
        self.scopes = saved.2;
        self.poisoned = saved.3;
    }

    /// Binds call arguments to parameters; checks each against its declared type; returns
    /// the argument type per parameter (None when defaulted).
    fn apply(&mut self, params: &[SigParam], args: &[Arg], span: Span, callee: &str) -> Vec<Option<Ty>> {
        let names: Vec<(&str, bool)> = params.iter().map(|p| (p.name.as_str(), p.has_default)).collect();
        let bound = self.bind_args(&names, args, span, callee);
        let mut out = vec![None; params.len()];
        for (i, p) in params.iter().enumerate() {
            if let Some(a) = &bound[i] {
                let t = self.expr(&args[*a].value);
                let what = format!("argument `{}` of `{callee}`", p.name);
                self.accept(&p.ty, &t, args[*a].value.span, &what);
                out[i] = Some(t);
            }
        }
        // Arguments that matched no parameter are still checked for their own errors.
        for (j, a) in args.iter().enumerate() {
            if !bound.iter().any(|b| *b == Some(j)) {
                self.expr(&a.value);
            }
        }
        out
    }

    /// Like `apply`, for recipe hyperparameters: a float scalar may also be a schedule.
    fn apply_hyper(&mut self, params: &[SigParam], args: &[Arg], span: Span, callee: &str) {
        let names: Vec<(&str, bool)> = params.iter().map(|p| (p.name.as_str(), p.has_default)).collect();
        let bound = self.bind_args(&names, args, span, callee);
        for (i, p) in params.iter().enumerate() {
            if let Some(a) = &bound[i] {
                let value = &args[*a].value;
                let t = self.expr(value);
                let what = format!("hyperparameter `{}` of `{callee}`", p.name);
                match (&p.ty, &t) {
                    (Ty::Tensor(tt), Ty::Schedule(_)) if tt.shape.is_scalar() && tt.dtype.is_float() => {}
                    (_, Ty::Tensor(at)) if !at.shape.is_scalar() => {
                        self.error(
                            "E0404",
                            value.span,
                            format!("{what} must be a scalar or a schedule, found `{at}`"),
                            "not a scalar",
                        )
                        .help = Some("pass a number, or a schedule such as `cosine(peak = 1e-3, total = 1000)`".into());
                    }
                    (
                        _,
                        Ty::Model(_)
                        | Ty::Callable(_)
                        | Ty::Applied(_)
                        | Ty::Data { .. }
                        | Ty::Batch { .. }
                        | Ty::List(_),
                    ) => {
                        self.error(
                            "E0404",
                            value.span,
                            format!("{what} must be a scalar or a schedule, found {}", t.describe()),
                            "not a scalar",
                        )
                        .help = Some("pass a number, or a schedule such as `cosine(peak = 1e-3, total = 1000)`".into());
                    }
                    (_, Ty::Schedule(_)) => {
                        self.error(
                            "E0404",
                            value.span,
                            format!("{what} cannot be a schedule: it is not a float scalar"),
                            "schedules give float values",
                        );
                    }
                    _ => {
                        self.accept(&p.ty, &t, value.span, &what);
                    }
                }
            }
        }
        for (j, a) in args.iter().enumerate() {
            if !bound.iter().any(|b| *b == Some(j)) {
                self.expr(&a.value);
            }
        }
    }

    /// Matches arguments to parameter names: positional first, then `name = value`.
    /// Reports E0305, E0306 and E0307. Returns, per parameter, the index of its argument.
    pub(crate) fn bind_args(
        &mut self,
        params: &[(&str, bool)],
        args: &[Arg],
        span: Span,
        callee: &str,
    ) -> Vec<Option<usize>> {
        let mut bound: Vec<Option<usize>> = vec![None; params.len()];
        let mut positional = 0;
        for (j, a) in args.iter().enumerate() {
            match &a.name {
                None => {
                    if positional < params.len() {
                        bound[positional] = Some(j);
                        positional += 1;
                    } else {
                        self.error(
                            "E0305",
                            a.value.span,
                            format!("`{callee}` takes at most {} arguments", params.len()),
                            "one argument too many",
                        )
                        .help = Some(format!(
                            "the parameters are: {}",
                            params.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
                Some(n) => match params.iter().position(|p| p.0 == n.name) {
                    Some(i) => {
                        if bound[i].is_some() {
                            self.error(
                                "E0307",
                                n.span,
                                format!("argument `{}` of `{callee}` is given twice", n.name),
                                "given again here",
                            );
                        } else {
                            bound[i] = Some(j);
                        }
                    }
                    None => {
                        let refs: Vec<&str> = params.iter().map(|p| p.0).collect();
                        let help = did_you_mean(&n.name, &refs)
                            .unwrap_or_else(|| format!("`{callee}` takes: {}", refs.join(", ")));
                        self.error(
                            "E0306",
                            n.span,
                            format!("`{callee}` has no parameter `{}`", n.name),
                            "unknown parameter",
                        )
                        .help = Some(help);
                    }
                },
            }
        }
        let missing: Vec<&str> =
            params.iter().zip(bound.iter()).filter(|(p, b)| !p.1 && b.is_none()).map(|(p, _)| p.0).collect();
        if !missing.is_empty() {
            let list = missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ");
            self.error(
                "E0305",
                span,
                format!("`{callee}` is missing {} {list}", if missing.len() == 1 { "argument" } else { "arguments" }),
                "missing arguments",
            )
            .help = Some(format!("pass {list}, positionally or as `name = value`"));
        }
        bound
    }

    pub(crate) fn set_recipe_rule(&mut self, on: bool) -> bool {
        std::mem::replace(&mut self.recipe_rule, on)
    }

    pub(crate) fn enter_recipe(&mut self, r: ItemRef) {
        self.enter_item(r);
        self.recipe_lets = match &self.modules.item(r).kind {
            ItemKind::Recipe(rec) => {
                let consts = crate::recipe::constant_lets(rec);
                rec.members
                    .iter()
                    .filter_map(|m| match &m.kind {
                        crate::ast::RecipeMemberKind::Let { name, .. } => {
                            Some((name.name.clone(), consts.iter().any(|c| c.1 == name.span)))
                        }
                        _ => None,
                    })
                    .collect()
            }
            _ => vec![],
        };
        self.ctx.push(Ctx::Recipe);
        self.push_scope();
    }

    pub(crate) fn leave_recipe(&mut self) {
        self.recipe_lets.clear();
        self.pop_scope();
    }

    pub(crate) fn bind_recipe(&mut self, name: &str, ty: Ty, span: Span) {
        self.bind(name, ty, span, LocalKind::Recipe);
    }

    /// Opens the scope of a recipe's `loss`: its `let` members, checked and bound in order.
    /// [`Checker::leave_recipe_lets`] closes it (and warns about the unused ones).
    pub(crate) fn enter_recipe_lets(&mut self, rec: &crate::ast::RecipeDef) {
        self.push_scope();
        for m in &rec.members {
            if let crate::ast::RecipeMemberKind::Let { name, value } = &m.kind {
                let t = self.expr(value);
                self.record("let", &name.name, name.span, &t);
                self.bind(&name.name, t, name.span, LocalKind::Let);
                if self.modules.list[self.module].inlined_lets.contains(&name.span) {
                    if let Some(l) = self.lookup_local(&name.name) {
                        l.used = true;
                    }
                }
            }
        }
    }

    pub(crate) fn leave_recipe_lets(&mut self) {
        self.pop_scope();
    }
}

/// The most parameter tensors a model may have (a guard against runaway `for` bounds).
const MAX_PARAMS: usize = 1_000_000;

/// A marker id in enumeration environments holding the innermost loop index.
const LOOP_MARK: u32 = u32::MAX;

fn loop_index(env: &HashMap<u32, Dim>) -> Option<i64> {
    env.get(&LOOP_MARK).and_then(|d| d.as_const())
}

fn find_method<'a>(m: &'a ModelDef, name: &str) -> Option<&'a FnDef> {
    fn go<'a>(members: &'a [Member], name: &str) -> Option<&'a FnDef> {
        for mem in members {
            match &mem.kind {
                MemberKind::Fn(f) if f.name.name == name => return Some(f),
                MemberKind::For { members, .. } => {
                    if let Some(f) = go(members, name) {
                        return Some(f);
                    }
                }
                _ => {}
            }
        }
        None
    }
    go(&m.members, name)
}

fn collect_methods(members: &[Member], f: &mut dyn FnMut(&FnDef)) {
    for m in members {
        match &m.kind {
            MemberKind::Fn(d) => f(d),
            MemberKind::For { members, .. } => collect_methods(members, f),
            _ => {}
        }
    }
}

fn collect_member_names(members: &[MemberDecl], out: &mut Vec<String>) {
    for m in members {
        match m {
            MemberDecl::Param { name, .. } | MemberDecl::Sub { name, .. } => out.push(name.clone()),
            MemberDecl::For { members, .. } => collect_member_names(members, out),
        }
    }
}

fn assigns(stmts: &[Stmt], name: &str) -> bool {
    stmts.iter().any(|s| match &s.kind {
        StmtKind::Assign { target, .. } => target.name == name,
        StmtKind::For { body, .. } => assigns(body, name),
        _ => false,
    })
}

/// Maps a model's parameter symbols to an instance's values.
fn config_map(info: &ModelInfo, mt: &ModelTy) -> HashMap<u32, Dim> {
    let mut map = HashMap::new();
    for (p, v) in info.config.params.iter().zip(mt.config.iter()) {
        if let (Ty::Dim(d), Ty::Dim(val)) = (&p.ty, v) {
            if let Some(s) = d.as_sym() {
                map.insert(s.id, val.clone());
            }
        }
    }
    map
}

fn subst_tensor(t: &TensorTy, f: &dyn Fn(&Sym) -> Option<Dim>) -> TensorTy {
    TensorTy { shape: t.shape.subst(f), ..t.clone() }
}

fn subst_model(m: &ModelTy, f: &dyn Fn(&Sym) -> Option<Dim>) -> ModelTy {
    ModelTy { item: m.item, config: m.config.iter().map(|t| subst_ty(t, f)).collect() }
}

pub(crate) fn subst_ty(t: &Ty, f: &dyn Fn(&Sym) -> Option<Dim>) -> Ty {
    match t {
        Ty::Tensor(tt) => Ty::Tensor(subst_tensor(tt, f)),
        Ty::Dim(d) => Ty::Dim(d.subst(f)),
        Ty::List(v) => Ty::List(v.iter().map(|x| subst_ty(x, f)).collect()),
        Ty::Model(m) => Ty::Model(subst_model(m, f)),
        Ty::ModelArray(m, n) => Ty::ModelArray(subst_model(m, f), n.subst(f)),
        Ty::TensorArray(tt, n) => Ty::TensorArray(subst_tensor(tt, f), n.subst(f)),
        Ty::Data { batch, context } => Ty::Data { batch: batch.subst(f), context: context.subst(f) },
        Ty::Batch { batch, context } => Ty::Batch { batch: batch.subst(f), context: context.subst(f) },
        other => other.clone(),
    }
}

/// The typed form printed by `recipec build --emit typed`: every parameter, `let`, state and
/// model member of `file`, with its dtype and shape, in source order.
pub fn typed_text(db: &crate::source::SourceDb, analysis: &crate::Analysis, file: FileId) -> String {
    let src = db.file(file);
    let mut rows: Vec<&TypedBinding> = analysis.typed.iter().filter(|t| t.file == file).collect();
    rows.sort_by_key(|t| t.span.start);
    let mut out = String::new();
    for m in &analysis.modules.list {
        if m.file != file {
            continue;
        }
        for item in &m.ast.items {
            let Some(name) = item.name() else { continue };
            out.push_str(&format!("{} {}\n", item.kind_name(), name.name));
            for t in rows.iter().filter(|t| t.span.start >= item.span.start && t.span.end <= item.span.end) {
                let (line, col) = src.line_col(t.span.start);
                out.push_str(&format!("  {line:>4}:{col:<3} {:<15} {:<16} : {}\n", t.kind, t.name, t.ty));
            }
        }
    }
    for (_, r) in &analysis.recipes {
        out.push_str(&format!(
            "recipe {} parameters ({} tensors, {} values)\n",
            r.name,
            r.params.len(),
            r.params.iter().map(|p| p.shape.iter().product::<i64>()).sum::<i64>()
        ));
        for p in &r.params {
            let shape: Vec<String> = p.shape.iter().map(|d| d.to_string()).collect();
            out.push_str(&format!("  model.{:<28} : {}[{}]\n", p.dotted(), p.dtype, shape.join(", ")));
        }
        for (sel, _, matched) in &r.optimize {
            out.push_str(&format!("  optimize {sel}: {} parameters\n", matched.len()));
        }
        for (sel, _, matched) in &r.sparsify {
            out.push_str(&format!("  sparsify {sel}: {} parameters\n", matched.len()));
        }
        for (sel, matched) in &r.freeze {
            out.push_str(&format!("  freeze {sel}: {} parameters\n", matched.len()));
        }
    }
    out
}
