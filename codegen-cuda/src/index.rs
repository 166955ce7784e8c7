//! Device code for kernels the CPU runs through its library: `gather`, `scatter_add`,
//! `take`, `take_add`, `pad`, `concat`, `argmax`/`argmin` reductions, the counter-based
//! RNG's `uniform` and `normal`.
//! Each gives the interpreter's bits: copies move stored values unchanged; the scatters add
//! every contribution to an output element in `double`, in the interpreter's order (the
//! order of the values' flat positions), and round once; the arg-reductions compare in the
//! interpreter's order with its NaN rule (a NaN wins over a number; ties keep the first);
//! `uniform` is Philox-4x32-10 on the same counter, bit for bit; `normal` is the same
//! Box–Muller formula with CUDA's double `log`, `sqrt`, `cos` (within their documented 1–2 ulp
//! of the host's, before the rounding to the node's dtype). The run's seed is the word after
//! the last buffer address in the program's words (an entry of the kernel's own table).
//!
//! Launches: `index` kernels, 256 threads per block, a grid-stride loop over the output
//! elements (`take_add`: a block-stride loop over (outer, row, 256-column chunk) triples).

use crate::{round, Launch, LOOP_BLOCK};
use compiler::interp::strides;
use compiler::ir::{Op, Red};
use compiler::kernel::{Kernel, Program};
use lang::types::Dtype;
use std::fmt::Write;

/// `long long {prefix}{i} = ...;` for the coordinates of flat position `flat` in `shape`.
fn unravel(out: &mut String, flat: &str, shape: &[usize], prefix: &str, indent: &str) {
    let st = strides(shape);
    for (i, d) in shape.iter().enumerate() {
        let _ = writeln!(out, "{indent}const long long {prefix}{i} = ({flat} / {}LL) % {d}LL;", st[i]);
    }
}

/// `c0 * s0 + c1 * s1 + ...` over `terms` (coordinate expression, stride).
fn dot(terms: &[(String, usize)]) -> String {
    if terms.is_empty() {
        return "0LL".into();
    }
    terms.iter().map(|(c, s)| format!("{c} * {s}LL")).collect::<Vec<_>>().join(" + ")
}

fn ld(d: Dtype, buf: usize, at: &str) -> String {
    format!("ld_{}(bufs[{buf}], {at})", Dtype::name(d))
}

/// A stored value of `from` moved to a buffer of `to` (unchanged when the dtypes agree).
fn moved(to: Dtype, from: Dtype, x: &str) -> String {
    if to == from {
        x.to_string()
    } else {
        round(to, x, crate::is_f32ish(from))
    }
}

/// The clamped index of element `at` of index buffer `buf` along an axis of `extent`.
fn index(d: Dtype, buf: usize, at: &str, extent: usize) -> String {
    format!("rc_clamp_index((double)({}), {extent}LL)", ld(d, buf, at))
}

/// The device helper the index kernels share (the interpreter's `clamp_index`).
pub(crate) const PRELUDE: &str = r#"// An index value clamped to [0, extent): negative and NaN give 0.
__device__ __forceinline__ long long rc_clamp_index(double v, long long extent) {
    if (!(v > 0.0)) return 0;
    if (v >= (double)(extent - 1)) return extent > 0 ? extent - 1 : 0;
    return (long long)v;
}

// Philox-4x32-10 (compiler::rng): four random words for element `index` of `stream`.
__device__ __forceinline__ void rc_philox(unsigned long long seed, unsigned long long stream, unsigned long long index, unsigned int w[4]) {
    unsigned int c0 = (unsigned int)index, c1 = (unsigned int)(index >> 32), c2 = (unsigned int)stream, c3 = (unsigned int)(stream >> 32);
    unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        const unsigned long long p0 = 0xD2511F53ull * c0, p1 = 0xCD9E8D57ull * c2;
        const unsigned int n0 = (unsigned int)(p1 >> 32) ^ c1 ^ k0, n2 = (unsigned int)(p0 >> 32) ^ c3 ^ k1;
        c0 = n0; c1 = (unsigned int)p1; c2 = n2; c3 = (unsigned int)p0;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    w[0] = c0; w[1] = c1; w[2] = c2; w[3] = c3;
}
// A uniform sample in [0, 1) with 24 bits (compiler::rng::uniform).
__device__ __forceinline__ double rc_uniform(unsigned long long seed, unsigned long long stream, unsigned long long index) {
    unsigned int w[4];
    rc_philox(seed, stream, index, w);
    return (double)(w[0] >> 8) / 16777216.0;
}
// A standard normal sample by Box-Muller (compiler::rng::normal).
__device__ __forceinline__ double rc_normal(unsigned long long seed, unsigned long long stream, unsigned long long index) {
    unsigned int w[4];
    rc_philox(seed, stream, index, w);
    const double u1 = ((double)(w[0] >> 8) + 1.0) / 16777216.0;
    const double u2 = (double)(w[1] >> 8) / 16777216.0;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * __longlong_as_double(0x400921fb54442d18LL) * u2);
}

"#;

/// The store of a copied element (`v`, stored as `from`) at `pt` of output `o`, closing the
/// grid-stride loop and the kernel.
fn store_copy(out: &mut String, od: Dtype, o: usize, from: Dtype, v: &str) {
    let _ = writeln!(out, "        st_{}(bufs[{o}], pt, {});\n    }}\n}}\n", Dtype::name(od), moved(od, from, v));
}

fn grid_stride(out: &mut String, name: &str, total: usize) {
    let _ = writeln!(out, "extern \"C\" __global__ void {name}(unsigned char* const* __restrict__ bufs) {{");
    let _ = writeln!(
        out,
        "    for (long long pt = (long long)blockIdx.x * blockDim.x + threadIdx.x; pt < {total}LL; pt += (long long)gridDim.x * blockDim.x) {{"
    );
}

fn launch(ki: usize, name: String, blocks: u64) -> Launch {
    crate::line_launch(ki, name, "index", blocks)
}

/// The device kernel of a library kernel, or `None` when it stays on the host (sort, top-k,
/// categorical samples, linear algebra, integer matmuls…).
pub(crate) fn library_kernel(p: &Program, ki: usize, k: &Kernel, out: &mut String) -> Result<Option<Launch>, String> {
    let Kernel::Library { node, operands, args, out: o, .. } = k else { return Ok(None) };
    let name = format!("k{ki}");
    let total: usize = node.shape.iter().product();
    let od = node.dtype;
    let blocks = (total as u64).div_ceil(LOOP_BLOCK as u64);
    Ok(match &node.op {
        Op::Gather { axis } => {
            let (x, ix) = (&operands[0], &operands[1]);
            let xs = strides(&x.shape);
            grid_stride(out, &name, total);
            unravel(out, "pt", &node.shape, "c", "        ");
            let _ = writeln!(out, "        const long long k = {};", index(ix.dtype, args[1], "pt", x.shape[*axis]));
            let terms: Vec<(String, usize)> = (0..node.shape.len())
                .map(|i| (if i == *axis { "k".to_string() } else { format!("c{i}") }, xs[i]))
                .collect();
            store_copy(out, od, *o, x.dtype, &ld(x.dtype, args[0], &dot(&terms)));
            Some(launch(ki, name, blocks))
        }
        Op::ScatterAdd { axis } => {
            let (x, ix, v) = (&operands[0], &operands[1], &operands[2]);
            let (vs, vsh) = (strides(&v.shape), &v.shape);
            grid_stride(out, &name, total);
            unravel(out, "pt", &node.shape, "c", "        ");
            let _ = writeln!(out, "        double acc = (double)({});", ld(x.dtype, args[0], "pt"));
            let inside: Vec<String> =
                (0..vsh.len()).filter(|i| i != axis).map(|i| format!("c{i} < {}LL", vsh[i])).collect();
            let cond = if inside.is_empty() { "true".to_string() } else { inside.join(" && ") };
            let terms: Vec<(String, usize)> =
                (0..vsh.len()).map(|i| (if i == *axis { "l".to_string() } else { format!("c{i}") }, vs[i])).collect();
            let _ = writeln!(
                out,
                "        if ({cond}) {{
            for (long long l = 0; l < {len}LL; l++) {{
                const long long q = {at};
                if ({k} == c{axis}) acc += (double)({val});
            }}
        }}
        st_{od}(bufs[{o}], pt, {r});
    }}
}}
",
                len = vsh[*axis],
                at = dot(&terms),
                k = index(ix.dtype, args[1], "q", x.shape[*axis]),
                val = ld(v.dtype, args[2], "q"),
                od = Dtype::name(od),
                r = round(od, "acc", false),
            );
            Some(launch(ki, name, blocks))
        }
        Op::Take { axis } => {
            let (x, ix) = (&operands[0], &operands[1]);
            let (xs, is, ir) = (strides(&x.shape), strides(&ix.shape), ix.shape.len());
            grid_stride(out, &name, total);
            unravel(out, "pt", &node.shape, "c", "        ");
            let iterms: Vec<(String, usize)> = (0..ir).map(|j| (format!("c{}", axis + j), is[j])).collect();
            let _ = writeln!(
                out,
                "        const long long k = {};",
                index(ix.dtype, args[1], &format!("({})", dot(&iterms)), x.shape[*axis])
            );
            let mut terms: Vec<(String, usize)> = (0..*axis).map(|i| (format!("c{i}"), xs[i])).collect();
            terms.push(("k".into(), xs[*axis]));
            terms.extend((axis + 1..x.shape.len()).map(|i| (format!("c{}", i - 1 + ir), xs[i])));
            store_copy(out, od, *o, x.dtype, &ld(x.dtype, args[0], &dot(&terms)));
            Some(launch(ki, name, blocks))
        }
        Op::Uniform { stream } | Op::Normal { stream } => {
            let f = if matches!(node.op, Op::Uniform { .. }) { "rc_uniform" } else { "rc_normal" };
            grid_stride(out, &name, total);
            let _ = writeln!(
                out,
                "        const unsigned long long seed = (unsigned long long)bufs[{nb}];
        st_{od}(bufs[{o}], pt, {v});
    }}
}}
",
                nb = p.buffers.len(),
                od = Dtype::name(od),
                v = round(od, &format!("{f}(seed, {stream}ull, (unsigned long long)pt)"), false),
            );
            Some(launch(ki, name, blocks))
        }
        Op::TakeAdd { axis } => Some(take_add(ki, name, node.dtype, operands, args, *o, *axis, out)),
        Op::Pad { axis, start } => {
            let x = &operands[0];
            let xs = strides(&x.shape);
            grid_stride(out, &name, total);
            unravel(out, "pt", &node.shape, "c", "        ");
            let terms: Vec<(String, usize)> = (0..node.shape.len())
                .map(|i| (if i == *axis { format!("(c{i} - {start}LL)") } else { format!("c{i}") }, xs[i]))
                .collect();
            let v = ld(x.dtype, args[0], &dot(&terms));
            let _ = writeln!(
                out,
                "        const bool in = c{axis} >= {start}LL && c{axis} < {end}LL;
        st_{od}(bufs[{o}], pt, in ? {v} : 0);
    }}
}}
",
                end = start + x.shape[*axis],
                od = Dtype::name(od),
                v = moved(od, x.dtype, &v),
            );
            Some(launch(ki, name, blocks))
        }
        Op::Concat { axis } => {
            grid_stride(out, &name, total);
            unravel(out, "pt", &node.shape, "c", "        ");
            let mut offset = 0;
            for (j, x) in operands.iter().enumerate() {
                let xs = strides(&x.shape);
                let terms: Vec<(String, usize)> = (0..node.shape.len())
                    .map(|i| (if i == *axis { format!("(c{i} - {offset}LL)") } else { format!("c{i}") }, xs[i]))
                    .collect();
                let end = offset + x.shape[*axis];
                let v = moved(od, x.dtype, &ld(x.dtype, args[j], &dot(&terms)));
                let head = if j == 0 { "        if" } else { " else if" };
                let _ = write!(
                    out,
                    "{head} (c{axis} < {end}LL) {{\n            st_{}(bufs[{o}], pt, {v});\n        }}",
                    Dtype::name(od)
                );
                offset = end;
            }
            let _ = writeln!(out, "\n    }}\n}}\n");
            Some(launch(ki, name, blocks))
        }
        Op::Reduce { op: op @ (Red::ArgMax | Red::ArgMin), axes } => {
            let x = &operands[0];
            let xs = strides(&x.shape);
            let kept: Vec<usize> = (0..x.shape.len()).filter(|i| !axes.contains(i)).collect();
            let mut red: Vec<usize> = axes.clone();
            red.sort_unstable();
            grid_stride(out, &name, total);
            unravel(out, "pt", &node.shape, "c", "        ");
            let cmp = if *op == Red::ArgMax { ">" } else { "<" };
            let _ = writeln!(
                out,
                "        double best = 0.0;\n        long long arg = 0, r = 0;\n        bool seen = false;"
            );
            let mut indent = String::from("        ");
            for a in &red {
                let _ = writeln!(out, "{indent}for (long long j{a} = 0; j{a} < {}LL; j{a}++) {{", x.shape[*a]);
                indent.push_str("    ");
            }
            let terms: Vec<(String, usize)> = (0..x.shape.len())
                .map(|i| match kept.iter().position(|k| *k == i) {
                    Some(p) => (format!("c{p}"), xs[i]),
                    None => (format!("j{i}"), xs[i]),
                })
                .collect();
            let _ = writeln!(
                out,
                "{indent}const double v = (double)({});
{indent}if (!seen || v {cmp} best || (isnan(v) && !isnan(best))) {{ best = v; arg = r; seen = true; }}
{indent}r++;",
                ld(x.dtype, args[0], &dot(&terms))
            );
            for _ in &red {
                indent.truncate(indent.len() - 4);
                let _ = writeln!(out, "{indent}}}");
            }
            let _ = writeln!(
                out,
                "        st_{}(bufs[{o}], pt, {});\n    }}\n}}\n",
                Dtype::name(od),
                round(od, "(double)arg", false)
            );
            Some(launch(ki, name, blocks))
        }
        _ => None,
    })
}

/// Capacity of the block's list of matching index positions in `take_add`.
const TAKE_ADD_LIST: usize = 256;

/// `take_add` (the embedding gradient): `x` `[pre, K, post]` plus the rows of `values`
/// `[pre, P, post]` added at rows `idx[p]`. A block owns (pre, row k, 256 columns): thread 0
/// lists the positions p with `idx[p] == k` in increasing order (256 at a time), then each
/// thread adds its column of those rows in `double`, in that order, and stores once. Work
/// is a scan of `idx` per block, no atomics: the interpreter's bits, deterministically.
#[allow(clippy::too_many_arguments)]
fn take_add(
    ki: usize,
    name: String,
    od: Dtype,
    operands: &[compiler::ir::Node],
    args: &[usize],
    o: usize,
    axis: usize,
    out: &mut String,
) -> Launch {
    let (x, ix, v) = (&operands[0], &operands[1], &operands[2]);
    let pre: usize = x.shape[..axis].iter().product();
    let kk = x.shape[axis];
    let post: usize = x.shape[axis + 1..].iter().product();
    let p: usize = ix.shape.iter().product();
    let chunks = post.div_ceil(LOOP_BLOCK as usize).max(1);
    let nb = pre * kk * chunks;
    let cap = TAKE_ADD_LIST;
    let _ = writeln!(
        out,
        r#"extern "C" __global__ void {name}(unsigned char* const* __restrict__ bufs) {{
    __shared__ long long list[{cap}];
    __shared__ int count;
    __shared__ long long next;
    for (long long blk = blockIdx.x; blk < {nb}LL; blk += gridDim.x) {{
        const long long chunk = blk % {chunks}LL, k = (blk / {chunks}LL) % {kk}LL, pre = blk / {kc}LL;
        const long long col = chunk * {lb}LL + threadIdx.x;
        const bool live = col < {post}LL;
        const long long at = (pre * {kk}LL + k) * {post}LL + col;
        double acc = live ? (double)({xl}) : 0.0;
        long long from = 0;
        while (from < {p}LL) {{
            if (threadIdx.x == 0) {{
                int c = 0;
                long long q = from;
                for (; q < {p}LL && c < {cap}; q++)
                    if ({idx} == k) list[c++] = q;
                count = c;
                next = q;
            }}
            __syncthreads();
            const int c = count;
            if (live)
                for (int i = 0; i < c; i++) acc += (double)({vl});
            from = next;
            __syncthreads();
        }}
        if (live) st_{ods}(bufs[{o}], at, {r});
    }}
}}
"#,
        kc = kk * chunks,
        lb = LOOP_BLOCK,
        xl = ld(x.dtype, args[0], "at"),
        idx = index(ix.dtype, args[1], "q", kk),
        vl = ld(v.dtype, args[2], &format!("(pre * {p}LL + list[i]) * {post}LL + col")),
        ods = Dtype::name(od),
        r = round(od, "acc", false),
    );
    Launch { shared_bytes: (8 * cap + 4 + 8) as u32, ..launch(ki, name, nb as u64) }
}
