//! The syntax tree, with a span on every node. Produced by the parser, read by the resolver,
//! the checker, the formatter and (later) the lowering to graph IR.

use crate::source::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Module {
    /// `//!` lines at the top of the file.
    pub docs: Vec<String>,
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub docs: Vec<String>,
    pub public: bool,
    pub kind: ItemKind,
    pub span: Span,
}

impl Item {
    /// The name the item binds (imports bind several, errors none).
    pub fn name(&self) -> Option<&Ident> {
        match &self.kind {
            ItemKind::Fn(f) => Some(&f.name),
            ItemKind::Rule(r) => Some(&r.name),
            ItemKind::Model(m) => Some(&m.name),
            ItemKind::Recipe(r) => Some(&r.name),
            ItemKind::Use(_) | ItemKind::Error => None,
        }
    }
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            ItemKind::Fn(f) => f.kind.keyword(),
            ItemKind::Rule(r) => r.kind.keyword(),
            ItemKind::Model(_) => "model",
            ItemKind::Recipe(_) => "recipe",
            ItemKind::Use(_) => "use",
            ItemKind::Error => "item",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ItemKind {
    Use(UseItem),
    Fn(FnDef),
    Rule(RuleDef),
    Model(ModelDef),
    Recipe(RecipeDef),
    /// An item that failed to parse; its diagnostic has been reported.
    Error,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UseItem {
    /// The module path and, for single imports, the item: `std.optim.adamw`.
    pub path: Vec<Ident>,
    pub tree: UseTree,
}

#[derive(Clone, Debug, PartialEq)]
pub enum UseTree {
    /// `use std.optim.adamw`: the last path segment is the item.
    Single,
    /// `use std.loss.{a, b}`.
    Group(Vec<Ident>),
    /// `use std.loss.*`.
    Glob(Span),
}

/// The function-like item kinds: they have parameters and a block with a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FnKind {
    Fn,
    Loss,
    Schedule,
    Decode,
}

impl FnKind {
    pub fn keyword(self) -> &'static str {
        match self {
            FnKind::Fn => "fn",
            FnKind::Loss => "loss",
            FnKind::Schedule => "schedule",
            FnKind::Decode => "decode",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FnDef {
    pub kind: FnKind,
    pub name: Ident,
    pub params: Vec<Param>,
    pub ret: Option<TypeExpr>,
    pub body: Block,
}

/// Rule items: statements with effects on implicit bindings, no value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKind {
    Optimizer,
    Sparsity,
}

impl RuleKind {
    pub fn keyword(self) -> &'static str {
        match self {
            RuleKind::Optimizer => "optimizer",
            RuleKind::Sparsity => "sparsity",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RuleDef {
    pub kind: RuleKind,
    pub name: Ident,
    pub params: Vec<Param>,
    pub body: Vec<Stmt>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub docs: Vec<String>,
    pub name: Ident,
    pub ty: TypeExpr,
    pub default: Option<Expr>,
    pub span: Span,
}

/// `f32`, `f32[]`, `f32[N, D]`, `i32[B, T - 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TypeExpr {
    pub dtype: Ident,
    /// `None` for a bare dtype (a scalar), `Some(vec![])` for `f32[]`.
    pub dims: Option<Vec<Expr>>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    pub value: Option<Box<Expr>>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StmtKind {
    /// `let x = e`, `let x: f32[N] = e`, or an index definition `let m[q: Q, k: K] = e`.
    Let {
        name: Ident,
        indices: Option<Vec<IndexVar>>,
        ty: Option<TypeExpr>,
        value: Expr,
    },
    /// `x = e`, `param = e`, `mask = e every K`.
    Assign {
        target: Ident,
        value: Expr,
        every: Option<Expr>,
    },
    /// `state m = init [every K]` (optimizers).
    State {
        name: Ident,
        init: Expr,
        every: Option<Expr>,
    },
    /// `for l in 0..L { ... }`: unrolled at compile time.
    For {
        var: Ident,
        start: Expr,
        end: Expr,
        body: Vec<Stmt>,
    },
    /// An expression evaluated for nothing; only allowed as a block's value.
    Expr(Expr),
    Error,
}

/// `q: Q` in an index definition.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexVar {
    pub name: Ident,
    pub extent: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelDef {
    pub name: Ident,
    pub params: Vec<Param>,
    pub members: Vec<Member>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub docs: Vec<String>,
    pub kind: MemberKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MemberKind {
    /// `param w: f32[D, V] = normal(std = 0.02)`; `param w[l]: ...` inside a `for`.
    /// `buffer idx: i32[C] = ...` (`buffer: true`): model state set by its initializer (or
    /// `init_from`) and never trained, of any dtype; no selector picks it.
    Param {
        name: Ident,
        index: Option<Expr>,
        ty: TypeExpr,
        init: Expr,
        buffer: bool,
    },
    /// `sub mlp = mlp(D = D)`; `sub blocks[l] = block(...)` inside a `for`.
    Sub {
        name: Ident,
        index: Option<Expr>,
        value: Expr,
    },
    /// `let w0 = normal(shape = [O, I])`: a value computed once per instance at
    /// initialization, in scope in the initializers (and `let`s) after it, not in methods.
    Let {
        name: Ident,
        value: Expr,
    },
    Fn(FnDef),
    For {
        var: Ident,
        start: Expr,
        end: Expr,
        members: Vec<Member>,
    },
    Error,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RecipeDef {
    pub name: Ident,
    pub members: Vec<RecipeMember>,
    pub span: Span,
}

impl RecipeDef {
    /// The value of field `name` (`model = ...`), if the recipe sets it.
    pub fn field(&self, name: &str) -> Option<&Expr> {
        self.members.iter().find_map(|m| match &m.kind {
            RecipeMemberKind::Field { name: n, value } if n.name == name => Some(value),
            _ => None,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RecipeMember {
    pub docs: Vec<String>,
    pub kind: RecipeMemberKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RecipeMemberKind {
    Field {
        name: Ident,
        value: Expr,
    },
    /// `let name = expr`: a name for a subexpression, in scope in `loss` (bound in order).
    Let {
        name: Ident,
        value: Expr,
    },
    Optimize {
        selector: Selector,
        rule: Expr,
    },
    Sparsify {
        selector: Selector,
        rule: Expr,
    },
    /// `freeze model.wte`: the selected parameters stay at their initial (or `init_from`)
    /// values on purpose (no optimizer, no `W0003`).
    Freeze {
        selector: Selector,
    },
    Error,
}

/// `model.blocks.*.mlp.*`
#[derive(Clone, Debug, PartialEq)]
pub struct Selector {
    pub segments: Vec<SelectorSegment>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SelectorSegment {
    Name(String),
    Index(i64),
    /// `*`: exactly one segment.
    Star,
    /// `**`: any number of segments, including none.
    StarStar,
    /// `{wte, wpe}`: any one of the names.
    Alt(Vec<String>),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, s) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match s {
                SelectorSegment::Name(n) => f.write_str(n)?,
                SelectorSegment::Index(i) => write!(f, "{i}")?,
                SelectorSegment::Star => f.write_str("*")?,
                SelectorSegment::StarStar => f.write_str("**")?,
                SelectorSegment::Alt(names) => write!(f, "{{{}}}", names.join(", "))?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Pow,
    MatMul,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Pow => "^",
            BinOp::MatMul => "@",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }
    /// Binding strength, higher binds tighter; used by the formatter.
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 3,
            BinOp::Add | BinOp::Sub => 4,
            BinOp::Mul | BinOp::Div | BinOp::Rem | BinOp::MatMul => 5,
            BinOp::Pow => 7,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    /// A float literal; `text` is kept as written so the formatter does not rewrite numbers.
    Float {
        value: f64,
        text: String,
    },
    Bool(bool),
    Str(String),
    Name(String),
    /// `_` (an inferred dimension).
    Underscore,
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `x^T`: transpose of the last two axes.
    Transpose(Box<Expr>),
    Call {
        callee: Box<Expr>,
        args: Vec<Arg>,
    },
    Index {
        base: Box<Expr>,
        indices: Vec<IndexArg>,
    },
    Field {
        base: Box<Expr>,
        name: Ident,
    },
    If {
        cond: Box<Expr>,
        then: Block,
        otherwise: Block,
    },
    Ternary {
        cond: Box<Expr>,
        then: Box<Expr>,
        otherwise: Box<Expr>,
    },
    List(Vec<Expr>),
    Paren(Box<Expr>),
    Error,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub enum IndexArg {
    Expr(Expr),
    /// `a:b`, `a:`, `:b`, `:`.
    Slice {
        start: Option<Expr>,
        end: Option<Expr>,
        span: Span,
    },
}

impl Expr {
    pub fn new(kind: ExprKind, span: Span) -> Expr {
        Expr { kind, span }
    }
    /// Strips parentheses.
    pub fn unparen(&self) -> &Expr {
        match &self.kind {
            ExprKind::Paren(e) => e.unparen(),
            _ => self,
        }
    }
}
