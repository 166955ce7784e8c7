#!/usr/bin/env python3
"""Independent oracle: every stdlib item evaluated by `recipec eval` against JAX on CPU.

For each case the script writes random inputs (seeded) as .npy, runs
`recipec eval`, computes the same quantity with JAX written from the papers' formulas (not
from the recipe source), and compares at documented tolerances:

  f32 elementwise results: rtol 1e-5, atol 1e-6
  f32 reductions (losses, norms, over up to ~10k elements): rtol 1e-4, atol 1e-5
  optimizer trajectories (several f32 steps): rtol 1e-5, atol 1e-6

Randomized decoding policies are checked statistically (the interpreter's Philox stream is
not JAX's): over many seeds the sampled tokens must stay in the allowed set and their
frequencies must match the target distribution within 0.06.

Usage: python tests/oracle/jax_oracle.py [path/to/recipec]   (default: target/debug/recipec)
Prints one line per case and a closing 'N passed, M failed' line; exits 1 on failure.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

jax.config.update("jax_enable_x64", True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPEC = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "recipec")
STD = lambda m: os.path.join(ROOT, "stdlib", f"{m}.recipe")  # noqa: E731

passed, failed = 0, []


def run_eval(file, item, args=None, hps=None, grad=False, steps=None, seed=0):
    """Runs recipec eval; returns {name: array}."""
    tmp = tempfile.mkdtemp(prefix="oracle-")
    cmd = [RECIPEC, "eval", file, item, "--out", os.path.join(tmp, "out"), "--seed", str(seed)]
    for name, arr in (args or {}).items():
        path = os.path.join(tmp, f"{name}.npy")
        np.save(path, arr)
        cmd += ["--arg", f"{name}={path}"]
    for name, v in (hps or {}).items():
        cmd += ["--hp", f"{name}={v}"]
    if grad:
        cmd.append("--grad")
    if steps is not None:
        cmd += ["--steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"recipec eval failed: {' '.join(cmd)}\n{r.stderr}")
    out = {}
    for f in os.listdir(os.path.join(tmp, "out")):
        out[f[:-4]] = np.load(os.path.join(tmp, "out", f))
    return out


def recipe_file(text):
    """Writes `text` as a recipe in a fresh temporary directory; returns its path."""
    path = os.path.join(tempfile.mkdtemp(prefix="oracle-src-"), "t.recipe")
    with open(path, "w") as f:
        f.write(text)
    return path


def check(name, got, want, rtol, atol):
    global passed
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        failed.append(f"{name}: shape {got.shape} != {want.shape}")
        print(f"FAIL {name}: shape {got.shape} != {want.shape}")
        return
    # Infinities and NaNs must match exactly (a tolerance scaled by |want| = inf would accept
    # any finite value); the finite rest within the tolerance.
    finite = np.isfinite(got) & np.isfinite(want)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    err = np.where(finite, np.abs(np.where(finite, got, 0.0) - np.where(finite, want, 0.0)), np.where(same, 0.0, np.inf))
    bad = err > atol + rtol * np.where(finite, np.abs(want), 0.0)
    if bad.any():
        i = np.unravel_index(np.argmax(err - rtol * np.abs(want)), err.shape)
        failed.append(f"{name}: max error at {i}: got {got[i]}, want {want[i]}")
        print(f"FAIL {name}: at {i} got {got[i]} want {want[i]}")
    else:
        passed += 1
        print(f"ok   {name} (max abs error {err.max() if err.size else 0:.2e})")


def case(fn):
    try:
        fn()
    except Exception as e:  # a crash is a failure of that case, not of the script
        failed.append(f"{fn.__name__}: {e}")
        print(f"FAIL {fn.__name__}: {e}")


rng = np.random.RandomState(1234)
RED = dict(rtol=1e-4, atol=1e-5)
ELT = dict(rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- losses

def ref_ce(z, y, ignore=-100):
    keep = y != ignore
    lse = jax.nn.logsumexp(z, axis=1)
    zy = jnp.take_along_axis(z, jnp.clip(y, 0, z.shape[1] - 1)[:, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(keep, lse - zy, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def losses():
    for n, v in [(1, 3), (5, 17), (64, 1000)]:
        z = rng.randn(n, v).astype(np.float32) * 3
        y = rng.randint(0, v, size=n).astype(np.int32)
        if n > 1:
            y[0] = -100
        out = run_eval(STD("loss"), "cross_entropy", {"logits": z, "targets": y}, grad=True)
        check(f"cross_entropy[{n}x{v}]", out["out"], ref_ce(z, y), **RED)
        check(f"cross_entropy[{n}x{v}] grad", out["grad_logits"], jax.grad(ref_ce)(z, y), **RED)

        # Label smoothing as PyTorch defines it.
        def ls(z, eps=0.1):
            keep = y != -100
            logp = jax.nn.log_softmax(z, axis=1)
            nll = -jnp.take_along_axis(logp, jnp.clip(y, 0, v - 1)[:, None], axis=1)[:, 0]
            smooth = -jnp.mean(logp, axis=1)
            return jnp.sum(jnp.where(keep, (1 - eps) * nll + eps * smooth, 0.0)) / jnp.maximum(jnp.sum(keep), 1)

        out = run_eval(STD("loss"), "label_smoothed_cross_entropy", {"logits": z, "targets": y}, {"smoothing": 0.1}, grad=True)
        check(f"label_smoothed_cross_entropy[{n}x{v}]", out["out"], ls(z), **RED)
        check(f"label_smoothed_cross_entropy[{n}x{v}] grad", out["grad_logits"], jax.grad(ls)(z), **RED)

        def palm(z):
            keep = y != -100
            lse = jax.nn.logsumexp(z, axis=1)
            return jnp.sum(jnp.where(keep, lse ** 2, 0.0)) / jnp.maximum(jnp.sum(keep), 1)

        out = run_eval(STD("loss"), "logz_penalty", {"logits": z, "targets": y}, grad=True)
        check(f"logz_penalty[{n}x{v}]", out["out"], palm(z), **RED)
        check(f"logz_penalty[{n}x{v}] grad", out["grad_logits"], jax.grad(palm)(z), **RED)

        yc = np.clip(y, 0, v - 1).astype(np.int32)

        def spherical(o, a=1.5, b=2.0):
            mu = jnp.mean(o, axis=1, keepdims=True)
            sd = jnp.sqrt(jnp.mean(o * o, axis=1, keepdims=True) - mu * mu)
            zc = jnp.take_along_axis((o - mu) / sd, yc[:, None], axis=1)[:, 0]
            return jnp.mean(jax.nn.softplus(a * (b - zc)) / a)

        if v > 1:
            out = run_eval(STD("loss"), "zloss_spherical", {"logits": z, "targets": yc}, {"a": 1.5, "b": 2.0}, grad=True)
            check(f"zloss_spherical[{n}x{v}]", out["out"], spherical(z), **RED)
            check(f"zloss_spherical[{n}x{v}] grad", out["grad_logits"], jax.grad(spherical)(z), rtol=1e-3, atol=1e-5)


def linear_ce():
    for n, d, v in [(8, 16, 33), (130, 32, 257)]:
        h = (rng.randn(n, d) / d ** 0.25).astype(np.float32)
        c = (rng.randn(v, d) / d ** 0.25).astype(np.float32)
        y = rng.randint(0, v, size=n).astype(np.int32)
        y[1] = -100
        f = lambda h, c: ref_ce(h @ c.T, y)  # noqa: E731
        out = run_eval(STD("loss"), "linear_cross_entropy", {"hidden": h, "classifier": c, "targets": y}, grad=True)
        check(f"linear_cross_entropy[{n},{d},{v}]", out["out"], f(h, c), **RED)
        gh, gc = jax.grad(f, argnums=(0, 1))(h, c)
        check(f"linear_cross_entropy[{n},{d},{v}] grad hidden", out["grad_hidden"], gh, **RED)
        check(f"linear_cross_entropy[{n},{d},{v}] grad classifier", out["grad_classifier"], gc, **RED)


def eisl_sequence():
    """EISL from the criterion's steps: clamp, cost matrix, n x n identity convolution (here
    `lax.conv`), softmax over generated positions, sum over positions, mean over targets."""

    def ref(logp, y, n, tau, noise=None):
        B, T, V = logp.shape
        lp = jnp.asarray(jax.nn.relu(jnp.asarray(logp) + 20.0) - 20.0, jnp.float64)  # the code's clamp, in f32
        C = jnp.take_along_axis(lp, jnp.broadcast_to(jnp.asarray(y)[:, None, :], (B, T, T)), axis=2)
        G = jax.lax.conv(C[:, None], jnp.eye(n, dtype=jnp.float64)[None, None] / n, (1, 1), "VALID")[:, 0]
        w = jax.nn.softmax((G if noise is None else G + noise) / tau, axis=1)
        return -jnp.mean(jnp.sum(w * G, axis=1)), G

    for (B, T, V), n, tau in [((2, 5, 7), 2, 1.0), ((3, 6, 11), 3, 0.5), ((2, 4, 5), 1, 1.0), ((1, 4, 6), 4, 2.0)]:
        z = rng.randn(B, T, V).astype(np.float32) * 3
        logp = np.array(jax.nn.log_softmax(z, axis=-1), np.float32)
        logp[0, 0, 0] = -30.0  # below the clamp
        y = rng.randint(0, V, size=(B, T)).astype(np.int32)
        y[0, 0] = 0
        out = run_eval(STD("loss"), "eisl", {"logp": logp, "targets": y}, {"n": n, "tau": tau}, grad=True)
        f = lambda lp: ref(lp, y, n, tau)[0]  # noqa: E731
        check(f"eisl[{B}x{T}x{V}, n={n}, tau={tau}]", out["out"], f(logp), **RED)
        check(f"eisl[{B}x{T}x{V}, n={n}, tau={tau}] grad", out["grad_logp"], jax.grad(f)(jnp.asarray(logp, jnp.float64)), **RED)
    # Gumbel variant: B identical rows draw independent noise, so the loss is a Monte Carlo
    # mean over B; compare with an independent JAX Monte Carlo estimate of the expectation.
    B, T, V, n = 4000, 4, 5, 2
    z = rng.randn(1, T, V).astype(np.float32) * 2
    logp = np.repeat(np.asarray(jax.nn.log_softmax(z, axis=-1), np.float32), B, axis=0)
    y = np.repeat(rng.randint(0, V, size=(1, T)).astype(np.int32), B, axis=0)
    out = run_eval(STD("loss"), "eisl", {"logp": logp, "targets": y}, {"n": n, "gumbel": "true"}, seed=7)
    _, G = ref(logp[:1], y[:1], n, 1.0)
    g = jax.random.gumbel(jax.random.PRNGKey(0), (200000,) + G.shape[1:], jnp.float64)
    per = jnp.sum(jax.nn.softmax(G + g, axis=1) * G, axis=1)  # [samples, J]
    want = -jnp.mean(per)
    sigma = float(jnp.sqrt(jnp.sum(jnp.var(per, axis=0))) / (per.shape[1] * np.sqrt(B)))
    check("eisl gumbel (Monte Carlo mean over 4000 rows, 5 sigma)", out["out"], want, rtol=0, atol=5 * sigma)
    # Without noise the same rows give a different value: the noise is really drawn.
    det = -jnp.mean(jnp.sum(jax.nn.softmax(G, axis=1) * G, axis=1))
    if abs(float(want - det)) < 10 * sigma:
        failed.append("eisl gumbel: the test inputs cannot tell noise from no noise")


def distillation():
    """SquareHead as the code computes it (rows selected by the mask, per-layer normalized
    MSE, summed); temperature KL as `kl_div(log_target=True, reduction=sum) * T^2 / kept`."""
    eps = 2.0 ** -7  # finfo(bf16).eps
    for L, N, D in [(1, 5, 3), (3, 8, 16)]:
        s = rng.randn(L, N, D).astype(np.float32)
        t = (s + 0.3 * rng.randn(L, N, D)).astype(np.float32) * 2
        mask = (rng.rand(N) > 0.3).astype(np.float32)
        mask[0] = 1.0
        rows = mask.astype(bool)

        def sh(s):
            return sum(jnp.mean((s[l][rows] - t[l][rows]) ** 2) / (jnp.mean(t[l][rows] ** 2) + eps) for l in range(L))

        out = run_eval(STD("loss"), "squarehead", {"student": s, "teacher": t, "mask": mask}, grad=True)
        check(f"squarehead[{L}x{N}x{D}]", out["out"], sh(s), **RED)
        check(f"squarehead[{L}x{N}x{D}] grad student", out["grad_student"], jax.grad(sh)(jnp.asarray(s, jnp.float64)), **RED)
        check(f"squarehead[{L}x{N}x{D}] no teacher grad", out["grad_teacher"], np.zeros_like(t), rtol=0, atol=0)
        # Invariant to scaling student and teacher together (up to eps).
        c = 3.0
        out2 = run_eval(STD("loss"), "squarehead", {"student": s * c, "teacher": t * c, "mask": mask}, {"eps": 0.0})
        out1 = run_eval(STD("loss"), "squarehead", {"student": s, "teacher": t, "mask": mask}, {"eps": 0.0})
        check(f"squarehead[{L}x{N}x{D}] joint scaling", out2["out"], out1["out"], **RED)
    for n, v, T in [(4, 7, 1.0), (9, 33, 2.0)]:
        zs = rng.randn(n, v).astype(np.float32) * 2
        zt = rng.randn(n, v).astype(np.float32) * 2
        y = rng.randint(0, v, size=n).astype(np.int32)
        y[1] = -100
        keep = y != -100

        def kd(zs):
            ls = jax.nn.log_softmax(zs[keep] / T, axis=1)
            lt = jax.nn.log_softmax(zt[keep] / T, axis=1)
            return jnp.sum(jnp.exp(lt) * (lt - ls)) * T * T / keep.sum()

        out = run_eval(STD("loss"), "distill_kl", {"student": zs, "teacher": zt, "targets": y}, {"t": T}, grad=True)
        check(f"distill_kl[{n}x{v}, T={T}]", out["out"], kd(zs), **RED)
        check(f"distill_kl[{n}x{v}, T={T}] grad student", out["grad_student"], jax.grad(kd)(jnp.asarray(zs, jnp.float64)), **RED)
        check(f"distill_kl[{n}x{v}, T={T}] no teacher grad", out["grad_teacher"], np.zeros_like(zt), rtol=0, atol=0)


def gram():
    """GRAM volumes as sqrt|det(A A^T)| with `jnp.linalg.det` per pair (LU), and the loss as
    the code writes it: normalize, divide by the temperature, label-smoothed CE both ways."""

    def vol(a, m):  # a [A, D], m [K, B, D]
        out = np.zeros((a.shape[0], m.shape[1]))
        for i in range(a.shape[0]):
            for j in range(m.shape[1]):
                X = np.concatenate([a[i:i + 1], m[:, j]], axis=0).astype(np.float64)
                out[i, j] = np.sqrt(abs(np.linalg.det(X @ X.T)))
        return out

    for A, B, K, D in [(3, 4, 1, 5), (4, 5, 2, 8), (2, 3, 3, 6)]:
        a = rng.randn(A, D).astype(np.float32)
        m = rng.randn(K, B, D).astype(np.float32)
        out = run_eval(STD("loss"), "gram_volume", {"anchor": a, "others": m})
        check(f"gram_volume[{A},{B},K={K},D={D}]", out["out"], vol(a, m), rtol=1e-4, atol=1e-5)
    # Two unit vectors: |sin θ|; a collinear pair: 0.
    th = np.array([0.3, 1.2, 2.5])
    a = np.stack([np.cos(th), np.sin(th)], 1).astype(np.float32)
    m = np.array([[[1.0, 0.0], [2.0, 0.0]]], np.float32)
    out = run_eval(STD("loss"), "gram_volume", {"anchor": a, "others": m})
    want = np.stack([np.abs(np.sin(th)), 2 * np.abs(np.sin(th))], 1)
    check("gram_volume two vectors = |sin|", out["out"], want, rtol=1e-5, atol=1e-6)
    out = run_eval(STD("loss"), "gram_volume", {"anchor": np.array([[1.0, 2.0, 0.0]], np.float32), "others": np.array([[[2.0, 4.0, 0.0]]], np.float32)})
    check("gram_volume collinear = 0", out["out"], np.zeros((1, 1)), rtol=0, atol=1e-3)

    def lsce(z, y, eps):
        logp = jax.nn.log_softmax(z, axis=1)
        nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
        return jnp.mean((1 - eps) * nll - eps * jnp.mean(logp, axis=1))

    def loss(a, m, tau=0.07, eps=0.1):
        nrm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
        a, m = nrm(a), nrm(m)
        G = jnp.concatenate([jnp.broadcast_to(a[:, None, None], (a.shape[0], m.shape[1], 1, a.shape[1])),
                             jnp.broadcast_to(jnp.transpose(m, (1, 0, 2))[None], (a.shape[0],) + jnp.transpose(m, (1, 0, 2)).shape)], axis=2)
        V = jnp.sqrt(jnp.abs(jnp.linalg.det(G @ jnp.swapaxes(G, -1, -2)))) / tau
        y = jnp.arange(a.shape[0])
        return 0.5 * (lsce(-V, y, eps) + lsce(-V.T, y, eps))

    for B, K, D, tau in [(4, 1, 6, 0.07), (6, 2, 8, 0.5)]:
        a = rng.randn(B, D).astype(np.float32)
        m = rng.randn(K, B, D).astype(np.float32)
        out = run_eval(STD("loss"), "gram_loss", {"anchor": a, "others": m}, {"tau": tau}, grad=True)
        f = lambda a, m: loss(a, m, tau)  # noqa: E731
        ga, gm = jax.grad(f, argnums=(0, 1))(jnp.asarray(a, jnp.float64), jnp.asarray(m, jnp.float64))
        check(f"gram_loss[B={B},K={K},tau={tau}]", out["out"], f(a, m), **RED)
        check(f"gram_loss[B={B},K={K},tau={tau}] grad anchor", out["grad_anchor"], ga, rtol=1e-3, atol=1e-4)
        check(f"gram_loss[B={B},K={K},tau={tau}] grad others", out["grad_others"], gm, rtol=1e-3, atol=1e-4)


def flow_matching():
    """W-CFM: Gibbs-weighted CFM regression onto x1 - x0; epsilon -> inf is plain I-CFM."""
    for N, D in [(5, 3), (16, 8)]:
        v = rng.randn(N, D).astype(np.float32)
        x0 = rng.randn(N, D).astype(np.float32)
        x1 = (rng.randn(N, D) * 0.5 + 1.0).astype(np.float32)
        for cost, eps, normalize in [("sqeuclid", 4.0, "none"), ("euclid", 2.0, "none"), ("sqeuclid", 1.0, "batch_mean")]:
            def f(v):
                d = x1.astype(np.float64) - x0
                c = np.sum(d * d, 1) if cost == "sqeuclid" else np.linalg.norm(d, axis=1)
                w = np.exp(-c / eps)
                if normalize == "batch_mean":
                    w = w / w.mean()
                return jnp.mean(w * jnp.sum((v - d) ** 2, axis=1))

            out = run_eval(STD("loss"), "wcfm", {"velocity": v, "x0": x0, "x1": x1},
                           {"epsilon": eps, "cost": cost, "normalize": normalize}, grad=True)
            name = f"wcfm[{N}x{D}, {cost}, eps={eps}, {normalize}]"
            check(name, out["out"], f(v), **RED)
            check(name + " grad velocity", out["grad_velocity"], jax.grad(f)(jnp.asarray(v, jnp.float64)), **RED)
        icfm = jnp.mean(jnp.sum((v - (x1 - x0)) ** 2, axis=1))
        out = run_eval(STD("loss"), "wcfm", {"velocity": v, "x0": x0, "x1": x1}, {"epsilon": 1e30})
        check(f"wcfm[{N}x{D}] epsilon=1e30 is I-CFM", out["out"], icfm, **RED)


def local_gram_flow():
    """LGF: each position's softmax affinity to a (2r+1)^2 window of the next frame, computed
    here window by window (loops over the grid), against the stdlib's masked full matrix; the
    loss's KL and its gradients for both feature sets."""
    def flow(f, r, tau):
        T, H, W, _ = f.shape
        n = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
        rows = []
        for t in range(T - 1):
            for y in range(H):
                for x in range(W):
                    idx = [(yy, xx) for yy in range(H) for xx in range(W) if abs(yy - y) <= r and abs(xx - x) <= r]
                    logits = jnp.stack([jnp.dot(n[t, y, x], n[t + 1, yy, xx]) / tau for yy, xx in idx])
                    p = jax.nn.softmax(logits)
                    row = jnp.zeros(H * W, p.dtype)
                    for k, (yy, xx) in enumerate(idx):
                        row = row.at[yy * W + xx].set(p[k])
                    rows.append(row)
        return jnp.stack(rows).reshape(T - 1, H * W, H * W)

    def kl(s, te, r, tau):
        P, Q = flow(te, r, tau), flow(s, r, tau)
        terms = jnp.where(P > 0, P * (jnp.log(jnp.where(P > 0, P, 1.0)) - jnp.log(jnp.where(P > 0, Q, 1.0))), 0.0)
        return jnp.sum(terms) / (P.shape[0] * P.shape[1])

    for (T, H, W, C, D), r, tau in [((3, 3, 4, 5, 2), 1, 0.1), ((2, 4, 4, 3, 6), 2, 0.5)]:
        s = rng.randn(T, H, W, C).astype(np.float32)
        te = rng.randn(T, H, W, D).astype(np.float32)
        hps = {"radius": r, "tau": tau}
        got = run_eval(STD("loss"), "local_gram_flow", {"f": s}, hps)["out"]
        want = flow(jnp.asarray(s, jnp.float64), r, tau)
        name = f"local_gram_flow[{T}x{H}x{W}x{C}] r={r} tau={tau}"
        check(name, got, want, **RED)
        check(name + " rows sum to 1", np.asarray(got).sum(-1), np.ones(got.shape[:2]), **RED)
        out = run_eval(STD("loss"), "lgf_loss", {"student": s, "teacher": te}, hps, grad=True)
        f = lambda a, b: kl(a, b, r, tau)  # noqa: E731
        gs, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(s, jnp.float64), jnp.asarray(te, jnp.float64))
        name = f"lgf_loss[{T}x{H}x{W}, C={C}, D={D}] r={r} tau={tau}"
        check(name, out["out"], f(s, te), **RED)
        check(name + " grad student", out["grad_student"], gs, rtol=1e-3, atol=1e-5)
        check(name + " grad teacher", out["grad_teacher"], gt, rtol=1e-3, atol=1e-5)
        same = run_eval(STD("loss"), "lgf_loss", {"student": te, "teacher": te}, hps)["out"]
        check(name + " of the teacher itself = 0", same, 0.0, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- optimizers

def optimizers():
    k = 5
    for shape in [(7,), (3, 17)]:
        p0 = rng.randn(*shape).astype(np.float32)
        g = rng.randn(k, *shape).astype(np.float32)

        def adamw(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, coupled=False):
            p, m, v = p0.astype(np.float32), np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            for t in range(1, k + 1):
                gt = g[t - 1] + (wd * p if coupled else 0)
                m = b1 * m + (1 - b1) * gt
                v = b2 * v + (1 - b2) * gt * gt
                mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
                p = p - lr * (mh / (np.sqrt(vh) + eps) + (0 if coupled else wd * p))
            return p, m, v

        out = run_eval(STD("optim"), "adamw", {"param": p0, "grad": g}, {"lr": 0.01, "weight_decay": 0.1}, steps=k)
        p, m, v = adamw()
        check(f"adamw{shape} param", out["param"], p, **ELT)
        check(f"adamw{shape} m", out["state_m"], m, **ELT)
        check(f"adamw{shape} v", out["state_v"], v, **ELT)
        out = run_eval(STD("optim"), "adam", {"param": p0, "grad": g}, {"lr": 0.01, "weight_decay": 0.1}, steps=k)
        p, m, v = adamw(coupled=True)
        check(f"adam{shape} param", out["param"], p, **ELT)

        def sgd(lr=0.1, mu=0.9, wd=0.01, nesterov=False):
            p, buf = p0.astype(np.float64), np.zeros(shape)
            for t in range(k):
                gt = g[t] + wd * p
                buf = mu * buf + gt
                p = p - lr * ((gt + mu * buf) if nesterov else buf)
            return p

        for nest in [False, True]:
            out = run_eval(STD("optim"), "sgd", {"param": p0, "grad": g}, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": str(nest).lower()}, steps=k)
            check(f"sgd{shape} nesterov={nest}", out["param"], sgd(nesterov=nest), **ELT)

        def sign_sgd(lr=0.05, wd=0.1):
            p = p0.astype(np.float64)
            for t in range(k):
                p = p * (1 - lr * wd) - lr * np.sign(g[t])
            return p

        out = run_eval(STD("optim"), "sign_sgd", {"param": p0, "grad": g}, {"lr": 0.05, "weight_decay": 0.1}, steps=k)
        check(f"sign_sgd{shape}", out["param"], sign_sgd(), **ELT)


def projected_optimizers():
    """GaLore-AdamW, Fira and FRUGAL, written from the papers' algorithms and the authors' step
    code (FRUGAL's `GaloreOptimizer`/`AdamW`; GaLore and Fira as in Fira's `fira_adamw.py`). P is the top-r
    right singular vectors, each signed so its largest-magnitude entry is positive (the
    convention `svd_topk` documents; the updates do not depend on it). gap = 2 over 5 steps
    refreshes P (and FRUGAL's statistics) at steps 1, 3 and 5."""
    k, gap, r = 5, 2, 2
    f64 = jnp.float64

    def proj(G):
        _, _, vt = jnp.linalg.svd(G, full_matrices=False)
        return jnp.stack([v * jnp.sign(v[jnp.argmax(jnp.abs(v))]) for v in vt[:r]])

    for rows, cols in [(6, 4), (3, 5)]:
        p0 = rng.randn(rows, cols).astype(np.float32)
        g = rng.randn(k, rows, cols).astype(np.float32)

        def frugal(lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, free=0.5):
            W = jnp.asarray(p0, f64)
            for t in range(k):
                G = jnp.asarray(g[t], f64)
                if t % gap == 0:  # the projector's update resets the Adam statistics
                    P, M, V, n = proj(G), jnp.zeros((rows, r), f64), jnp.zeros((rows, r), f64), 0
                W = W * (1 - lr * wd)
                n += 1
                R = G @ P.T
                M = b1 * M + (1 - b1) * R
                V = b2 * V + (1 - b2) * R * R
                update = -(lr / (1 - b1 ** n)) * M / (jnp.sqrt(V) / jnp.sqrt(1 - b2 ** n) + eps)
                W = W + update @ P - lr * free * jnp.sign(G - R @ P)
            return W, P, M, V

        hps = {"lr": 0.01, "rank": r, "gap": gap, "weight_decay": 0.1, "free_lr_scale": 0.5}
        out = run_eval(STD("optim"), "frugal", {"param": p0, "grad": g}, hps, steps=k)
        for name, want in zip(["param", "state_p", "state_m", "state_v"], frugal()):
            check(f"frugal[{rows}x{cols}] {name}", out[name], want, **ELT)

        # The random projection (`proj_type = "random"`): P is drawn from the recipe's seeded
        # generator, so it is read from runs stopped right after each redraw (steps 1, 3, 5);
        # it must have orthonormal rows and change at each redraw, and the whole run must be
        # FRUGAL's step with those P.
        rand = dict(hps, projection="random")
        drawn = {t: np.asarray(run_eval(STD("optim"), "frugal", {"param": p0, "grad": g[:t + 1]}, rand, steps=t + 1)["state_p"], np.float64)
                 for t in range(0, k, gap)}
        for t, P in drawn.items():
            check(f"frugal[{rows}x{cols}] random P at step {t + 1} has orthonormal rows", P @ P.T, np.eye(r), rtol=0, atol=1e-5)
        distinct = len({tuple(np.round(P, 6).ravel()) for P in drawn.values()}) == len(drawn)
        check(f"frugal[{rows}x{cols}] random P redrawn each gap", float(distinct), 1.0, rtol=0, atol=0)
        proj_random = proj
        try:
            steps_seen = iter(sorted(drawn))
            proj = lambda G: jnp.asarray(drawn[next(steps_seen)], f64)  # noqa: E731
            want = frugal()
        finally:
            proj = proj_random
        out = run_eval(STD("optim"), "frugal", {"param": p0, "grad": g}, rand, steps=k)
        for name, w in zip(["param", "state_p", "state_m", "state_v"], want):
            check(f"frugal[{rows}x{cols}] projection=random {name}", out[name], w, **ELT)

        def galore(lr=0.01, alpha=0.25, b1=0.9, b2=0.999, eps=1e-6, wd=0.1):
            W = jnp.asarray(p0, f64)
            M, V = jnp.zeros((rows, r), f64), jnp.zeros((rows, r), f64)
            for t in range(1, k + 1):
                G = jnp.asarray(g[t - 1], f64)
                if (t - 1) % gap == 0:  # the state is kept when P changes
                    P = proj(G)
                R = G @ P.T
                M = b1 * M + (1 - b1) * R
                V = b2 * V + (1 - b2) * R * R
                step_size = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                W = W - step_size * alpha * (M / (jnp.sqrt(V) + eps)) @ P
                W = W - lr * wd * W
            return W, P, M, V

        out = run_eval(STD("optim"), "galore_adamw", {"param": p0, "grad": g},
                       {"lr": 0.01, "rank": r, "gap": gap, "weight_decay": 0.1}, steps=k)
        for name, want in zip(["param", "state_p", "state_m", "state_v"], galore()):
            check(f"galore_adamw[{rows}x{cols}] {name}", out[name], want, **ELT)

        def fira(lr=0.01, alpha=0.25, b1=0.9, b2=0.999, eps=1e-6, wd=0.1, paper=False):
            W = jnp.asarray(p0, f64)
            M, V, prev = jnp.zeros((rows, r), f64), jnp.zeros((rows, r), f64), None
            for t in range(1, k + 1):
                G = jnp.asarray(g[t - 1], f64)
                if (t - 1) % gap == 0:
                    P = proj(G)
                R = G @ P.T
                M = b1 * M + (1 - b1) * R
                V = b2 * V + (1 - b2) * R * R
                step_size = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                N = M / (jnp.sqrt(V) + eps)
                # Norm-based scaling, one factor per row of R (R has more rows than columns).
                phi = jnp.linalg.norm(N, axis=1) / (jnp.linalg.norm(R, axis=1) + 1e-8)
                S = (G - (1.0 if paper else alpha) * R @ P) * phi[:, None]
                if prev is None:
                    prev = jnp.linalg.norm(S)
                else:  # the norm-growth limiter
                    size = jnp.linalg.norm(S)
                    lim = max(size / (prev + 1e-8), 1.01) / 1.01
                    S, prev = S / lim, size / lim
                W = W - step_size * (alpha * N @ P + S)
                W = W - lr * wd * W
            return W, P, M, V, prev

        for paper in [False, True]:
            out = run_eval(STD("optim"), "fira_adamw", {"param": p0, "grad": g},
                           {"lr": 0.01, "rank": r, "gap": gap, "weight_decay": 0.1, "paper_residual": str(paper).lower()},
                           steps=k)
            for name, want in zip(["param", "state_p", "state_m", "state_v", "state_q"], fira(paper=paper)):
                check(f"fira_adamw[{rows}x{cols}] paper_residual={paper} {name}", out[name], want, **ELT)


# ----------------------------------------------------------------------------- schedules

def schedules():
    n = 1000
    steps = np.arange(1, n + 1, dtype=np.float64)
    out = run_eval(STD("schedule"), "constant", hps={"value": 0.25}, steps=10)
    check("constant", out["out"], np.full(10, 0.25), **ELT)
    out = run_eval(STD("schedule"), "linear_warmup", hps={"peak": 1e-3, "warmup": 100}, steps=n)
    check("linear_warmup", out["out"], 1e-3 * np.minimum(steps / 100, 1.0), **ELT)
    out = run_eval(STD("schedule"), "cosine", hps={"peak": 3e-4, "total": n, "warmup": 50, "final_factor": 0.1}, steps=n + 20)
    t = np.arange(1, n + 21, dtype=np.float64)
    prog = np.clip((t - 50) / (n - 50), 0, 1)
    want = np.where(t < 50, 3e-4 * t / 50, 3e-4 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * prog))))
    check("cosine", out["out"], want, **ELT)

    def wsd(shape, F=0.0, frac=0.2, warm=100, init_div=100.0, power=0.5):
        t = np.arange(1, n + 31, dtype=np.float64)
        na = np.floor(frac * n)
        nh = n - na
        x = (t - nh) / na
        S = {
            "linear": F + (1 - F) * (1 - x),
            "sqrt": F + (1 - F) * (1 - np.sign(x) * np.abs(x) ** power),
            "cosine": F + (1 - F) * 0.5 * (1 + np.cos(np.pi * x)),
            "square": F + (1 - F) * (1 - x * x),
            "exp": F ** x if F > 0 else np.zeros_like(x),
            "mirror_cosine": 2 * (F + (1 - F) * (1 - x)) - (F + (1 - F) * 0.5 * (1 + np.cos(np.pi * x))),
        }[shape]
        return np.where(t < warm, 1.0 * (t / warm + (1 - t / warm) / init_div), np.where(t < nh, 1.0, np.where(t < n, S, F)))

    for shape, F in [("linear", 0.0), ("sqrt", 0.0), ("cosine", 0.05), ("square", 0.0), ("exp", 0.1), ("mirror_cosine", 0.0)]:
        out = run_eval(STD("schedule"), "wsd", hps={"peak": 1.0, "total": n, "warmup": 100, "decay_frac": 0.2, "shape": shape, "final_factor": F}, steps=n + 30)
        want = wsd(shape, F)
        # Before the decay phase x < 0 is never used (np.where evaluates all branches).
        check(f"wsd shape={shape}", out["out"], want, **ELT)
    # WSD-S (Wen et al.): one run, a decayed checkpoint every `period` steps, after which the
    # rate jumps back to the peak and training continues from the decayed weights. Written as
    # the run goes: a global warmup, then in each period a stable phase and a decay over its
    # last n_a steps that reaches F exactly at the checkpoint step.
    def wsd_s(period, shape, F, steps, warm=30, frac=0.2):
        na = int(np.floor(frac * period))
        lr = []
        for t in range(1, steps + 1):
            into = (t - 1) % period + 1  # 1..period; period is the checkpoint step
            if t < warm:
                lr.append(t / warm + (1 - t / warm) / 100.0)
            elif into < period - na:
                lr.append(1.0)
            elif into < period:
                x = (into - (period - na)) / na
                lr.append({"linear": F + (1 - F) * (1 - x), "sqrt": F + (1 - F) * (1 - np.sqrt(x)),
                           "cosine": F + (1 - F) * 0.5 * (1 + np.cos(np.pi * x))}[shape])
            else:
                lr.append(F)
        return np.array(lr)

    for shape, F in [("linear", 0.0), ("sqrt", 0.1), ("cosine", 0.05)]:
        out = run_eval(STD("schedule"), "wsd_s", hps={"peak": 1.0, "period": 200, "warmup": 30, "decay_frac": 0.2,
                                                      "shape": shape, "final_factor": F}, steps=650)
        check(f"wsd_s shape={shape}", out["out"], wsd_s(200, shape, F, 650), **ELT)
    # The reference values of the methods notes (n = 1000, f = 0.2, F = 0, step 900).
    for shape, v in [("linear", 0.5), ("sqrt", 0.2929), ("cosine", 0.5), ("square", 0.75)]:
        out = run_eval(STD("schedule"), "wsd", hps={"peak": 1.0, "total": 1000, "warmup": 0, "decay_frac": 0.2, "shape": shape}, steps=900)
        check(f"wsd reference value {shape}@900", out["out"][899], v, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- sparsity

def sparsity():
    w = rng.randn(6, 16).astype(np.float32)
    out = run_eval(STD("sparsity"), "nm", {"param": w}, {"n": 2, "m": 4})
    groups = np.abs(w).reshape(6, 4, 4)
    order = np.argsort(-groups, axis=-1, kind="stable")
    want = np.zeros_like(groups)
    np.put_along_axis(want, order[..., :2], 1.0, axis=-1)
    check("nm 2:4 mask", out["mask"], want.reshape(6, 16), rtol=0, atol=0)
    assert (out["mask"].reshape(6, 4, 4).sum(-1) == 2).all()
    out = run_eval(STD("sparsity"), "magnitude", {"param": w, "grad": w * 0.5}, {"density": 0.3})
    thr = np.quantile(np.abs(w), 0.7)
    check("magnitude mask", out["mask"], (np.abs(w) >= thr).astype(np.float32), rtol=0, atol=0)
    check("magnitude straight-through grad", out["grad"], w * 0.5, rtol=0, atol=0)

    # Progressive gradient flow (Bambhaniya et al.), from the code's `get_sparse_mask` and
    # decay types: the soft mask after K steps on fixed weights, and SR-STE's gradient.
    def nm_mask(x, n, m):
        groups = jnp.abs(jnp.asarray(x, jnp.float64)).reshape(x.shape[0], -1, m)
        ranks = jnp.argsort(jnp.argsort(-groups, axis=-1, stable=True), axis=-1, stable=True)
        return (ranks < n).astype(jnp.float64).reshape(x.shape)

    hard = nm_mask(w, 2, 4)
    for exponential, steps, dense in [(True, 4, 1), (False, 4, 1), (True, 1, 0), (False, 30, 0)]:
        t = max(steps - 1 - dense, 0)  # updates since the dense phase ended
        beta = np.exp(-0.1 * t) if exponential else max(0.0, 1 - 0.1 * t)
        out = run_eval(STD("sparsity"), "mdgf", {"param": w, "grad": w * 0.5},
                       {"decay": 0.1, "exponential": str(exponential).lower(), "dense_steps": dense}, steps=steps)
        check(f"mdgf exponential={exponential} step {steps} mask", out["mask"], hard + (1 - hard) * beta, **ELT)
        check(f"mdgf exponential={exponential} straight-through grad", out["grad"], w * 0.5, rtol=0, atol=0)
    g = rng.randn(6, 16).astype(np.float32)
    out = run_eval(STD("sparsity"), "srste", {"param": w, "grad": g}, {"decay": 0.01})
    check("srste mask", out["mask"], hard, rtol=0, atol=0)
    check("srste grad", out["grad"], g + 0.01 * (1 - hard) * w, **ELT)


# ----------------------------------------------------------------------------- decoding

def decoding():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0], dtype=np.float32)
    out = run_eval(STD("decode"), "greedy", {"logits": logits})
    check("greedy", out["out"], np.argmax(logits), rtol=0, atol=0)

    def freq(item, hps, seeds=300):
        counts = np.zeros(len(logits))
        for s in range(seeds):
            counts[int(run_eval(STD("decode"), item, {"logits": logits}, hps, seed=s)["out"])] += 1
        return counts / seeds

    p = np.asarray(jax.nn.softmax(jnp.asarray(logits) / 0.8))
    f = freq("temperature", {"t": 0.8})
    check("temperature sampling frequencies", f, p, rtol=0, atol=0.06)
    top2 = np.zeros_like(p)
    top2[:2] = np.asarray(jax.nn.softmax(jnp.asarray(logits[:2])))
    f = freq("top_k", {"k": 2, "t": 1.0})
    check("top_k frequencies (k = 2)", f, top2, rtol=0, atol=0.06)
    full = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    order = np.argsort(-full)
    keep = order[: np.searchsorted(np.cumsum(full[order]), 0.7) + 1]
    nuc = np.zeros_like(full)
    nuc[keep] = full[keep] / full[keep].sum()
    f = freq("top_p", {"p": 0.7})
    check("top_p frequencies (p = 0.7)", f, nuc, rtol=0, atol=0.06)


def localleap():
    """LocalLeap's commit rule as the code's loop runs it: positions in confidence order,
    the first always committed, the others against the relaxed threshold near an anchor."""
    def ref(c, tau, relax, r):
        order = [i for i in np.argsort(-c, kind="stable") if np.isfinite(c[i])]
        anchors = [i for i in order if c[i] >= tau]
        near = set()
        for a in anchors:
            near |= set(range(max(0, a - r), min(len(c), a + r + 1)))
        commit = np.zeros(len(c), bool)
        for j, k in enumerate(order):
            if j == 0 or c[k] >= (relax if (anchors and k in near) else tau):
                commit[k] = True
        return commit

    # The methods note's case: an anchor at 0.95 takes its neighbors at >= 0.75 within 4,
    # not a 0.8 six positions away.
    c = np.full(16, -np.inf, np.float32)
    c[2:14] = [0.5, 0.95, 0.8, 0.7, 0.76, 0.6, 0.5, 0.3, 0.2, 0.8, 0.1, 0.4]
    cases = [(c, 0.9, 0.75, 4)]
    no_anchor = np.array([0.3, 0.6, 0.85, 0.2, 0.8], np.float32)  # only the top-1 commits
    cases.append((no_anchor, 0.9, 0.75, 4))
    for _ in range(4):
        x = rng.rand(24).astype(np.float32)
        x[rng.rand(24) < 0.3] = -np.inf
        cases.append((x, 0.7, 0.5, 2))
    for i, (c, tau, relax, r) in enumerate(cases):
        out = run_eval(STD("decode"), "localleap_commit", {"confidence": c}, {"threshold": tau, "relaxed": relax, "radius": r})
        want = ref(c, tau, relax, r)
        check(f"localleap_commit case {i} ({int(want.sum())} of {np.isfinite(c).sum()} commit)", out["out"].astype(float), want.astype(float), rtol=0, atol=0)
    assert ref(cases[0][0], 0.9, 0.75, 4).nonzero()[0].tolist() == [3, 4, 6]
    assert ref(no_anchor, 0.9, 0.75, 4).nonzero()[0].tolist() == [2]


def quantization():
    """Group-wise abs-max quantization as the methods note writes it, with numpy's
    round-half-to-even."""
    for (M, N), bits, group in [((3, 8), 4, 4), ((5, 128), 4, 64), ((4, 96), 8, 32), ((2, 12), 3, 12)]:
        w = rng.randn(M, N).astype(np.float32)
        w[0, :group] = 0.0  # a group of zeros stays zero
        g = w.reshape(M, N // group, group)
        top = 2 ** (bits - 1) - 1
        s = np.abs(g).max(axis=2, keepdims=True) / np.float32(top)
        q = np.clip(np.round(g / np.where(s > 0, s, 1)), -top - 1, top)
        want = (q * s).reshape(M, N)
        out = run_eval(STD("sparsity"), "quantize_groups", {"w": w}, {"bits": bits, "group": group})
        check(f"quantize_groups[{M}x{N}] bits={bits} group={group}", out["out"], want, **ELT)
        levels = np.unique(np.round(out["out"].reshape(M, N // group, group) / np.where(s > 0, s, 1)))
        if levels.size > 2 ** bits:
            failed.append(f"quantize_groups bits={bits}: {levels.size} levels")


# ----------------------------------------------------------------------------- models

def layer_norm():
    x = rng.randn(9, 12).astype(np.float32)
    g = rng.randn(12).astype(np.float32)
    b = rng.randn(12).astype(np.float32)

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * g + b

    out = run_eval(STD("models"), "layer_norm", {"x": x, "gain": g, "bias": b})
    check("layer_norm", out["out"], ln(x, g, b), **RED)


def positions():
    """RoPE as Llama applies it (`rotate_half`), its relative-position property, the NTK and
    LongLLaDA base rules against the methods note's worked table, and LM-Infinite's mask
    against a set-based count of the keys each query sees."""
    def rotate_half(x):
        h = x.shape[-1] // 2
        return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)

    def rope(x, base, offset=0):
        E = x.shape[-1]
        inv = 1.0 / (base ** (np.arange(0, E, 2, dtype=np.float32) / np.float32(E)))
        pos = np.arange(offset, offset + x.shape[-2], dtype=np.float32)
        freqs = np.outer(pos, inv).astype(np.float32)
        emb = np.concatenate([freqs, freqs], axis=-1)
        return x * np.cos(emb) + rotate_half(x) * np.sin(emb)

    for shape, base, offset in [((1, 2, 5, 8), 10000.0, 0), ((2, 3, 7, 16), 500.0, 3)]:
        x = rng.randn(*shape).astype(np.float32)
        out = run_eval(STD("models"), "rope", {"x": x}, {"base": base, "offset": offset})
        check(f"rope{list(shape)} base={base} offset={offset}", out["out"], rope(x, base, offset), rtol=1e-5, atol=2e-6)
    # Scores of rotated queries and keys depend on positions only through their difference.
    q = rng.randn(1, 1, 6, 8).astype(np.float32)
    k = rng.randn(1, 1, 6, 8).astype(np.float32)
    s0 = [run_eval(STD("models"), "rope", {"x": t}, {"offset": 0})["out"] for t in (q, k)]
    s5 = [run_eval(STD("models"), "rope", {"x": t}, {"offset": 5})["out"] for t in (q, k)]
    check("rope relative positions", s5[0][0, 0] @ s5[1][0, 0].T, s0[0][0, 0] @ s0[1][0, 0].T, rtol=1e-4, atol=1e-4)

    def ntk_base(b, d, T, Tn, rule="critical", bidi=False):
        if Tn <= T:
            return b
        if bidi:
            T, Tn = 2 * T, 2 * Tn
        if rule == "ntk":
            return b * (Tn / T) ** (d / (d - 2))
        dc = 2 * np.ceil(d / 2 * np.log(T / (2 * np.pi)) / np.log(b))
        return (Tn / (2 * np.pi)) ** (d / dc)

    # The methods note's table for LLaDA-8B (d = 128, b = 5e5, T = 4096): λ = b'/b.
    for Tn, lam in [(8192, 3.40), (16384, 13.6), (24576, 30.6), (32768, 54.4)]:
        got = run_eval(STD("models"), "ntk_rope_base", hps={"base": 500000.0, "dim": 128, "train_len": 4096, "target_len": Tn})["out"]
        check(f"ntk_rope_base LongLLaDA {Tn // 1024}k (table, 3 digits)", got / 5e5, lam, rtol=6e-3, atol=0)
        check(f"ntk_rope_base LongLLaDA {Tn // 1024}k", got, ntk_base(5e5, 128, 4096, Tn), rtol=1e-6, atol=0)
    for args in [(10000.0, 64, 128, 512, "ntk", False), (10000.0, 64, 128, 512, "critical", True), (10000.0, 64, 512, 256, "ntk", False)]:
        b, d, T, Tn, rule, bidi = args
        hps = {"base": b, "dim": d, "train_len": T, "target_len": Tn, "rule": rule, "bidirectional": str(bidi).lower()}
        got = run_eval(STD("models"), "ntk_rope_base", hps=hps)["out"]
        check(f"ntk_rope_base {args}", got, ntk_base(*args), rtol=1e-6, atol=0)

    for n, local, g in [(8, 3, 2), (12, 4, 0), (5, 8, 0), (9, 2, 10)]:
        m = run_eval(STD("models"), "lambda_mask", hps={"n": n, "local": local, "n_global": g})["out"].astype(bool)
        counts = [len(set(range(min(g, q + 1))) | set(range(max(0, q - local + 1), q + 1))) for q in range(n)]
        ok = m.sum(1).tolist() == counts and not np.triu(m, 1).any()
        if local >= n and g == 0:
            ok = ok and (m == np.tril(np.ones((n, n), bool))).all()
        check(f"lambda_mask n={n} local={local} n_global={g}", float(ok), 1.0, rtol=0, atol=0)


    # LM-Infinite's logits with the distance limit, written as the code's costlier path computes
    # them, element by element: rotated logits inside the local band, the stationary query
    # (rotated by d* = min(L, S - 1)) against unrotated keys for far global keys.
    def lambda_ref(q, k, local, g, base, limit=-1):
        S, E = q.shape[-2], q.shape[-1]
        rq, rk = np.asarray(rope(q, base)), np.asarray(rope(k, base))
        d = min(local if limit < 0 else limit, S - 1)
        inv = 1.0 / (base ** (np.arange(0, E, 2, dtype=np.float32) / np.float32(E)))
        emb = np.concatenate([d * inv, d * inv]).astype(np.float32)
        sq = np.asarray(q * np.cos(emb) + rotate_half(q) * np.sin(emb))
        out = np.full(q.shape[:-1] + (S,), -np.inf)
        for i in range(S):
            for j in range(i + 1):
                if i - j < local:
                    out[..., i, j] = np.sum(rq[..., i, :] * rk[..., j, :], -1) / np.sqrt(E)
                elif j < g:
                    out[..., i, j] = np.sum(sq[..., i, :] * k[..., j, :], -1) / np.sqrt(E)
        return out

    for shape, local, g, base in [((1, 2, 9, 8), 3, 2, 10000.0), ((2, 1, 12, 16), 4, 10, 500.0), ((1, 1, 6, 8), 8, 0, 10000.0)]:
        q = rng.randn(*shape).astype(np.float32)
        k = rng.randn(*shape).astype(np.float32)
        got = run_eval(STD("models"), "lambda_scores", {"q": q, "k": k}, {"local": local, "n_global": g, "base": base})["out"]
        want = lambda_ref(q, k, local, g, base)
        name = f"lambda_scores{list(shape)} local={local} n_global={g}"
        check(name, got, want, rtol=1e-4, atol=1e-5)
        check(name + " softmax", jax.nn.softmax(got, -1), jax.nn.softmax(want, -1), rtol=1e-4, atol=1e-6)
        if g > 0:  # a distance limit apart from the window (`--limit_distance`)
            got = run_eval(STD("models"), "lambda_scores", {"q": q, "k": k}, {"local": local, "n_global": g, "base": base, "limit": local + 2})["out"]
            check(name + f" limit={local + 2}", got, lambda_ref(q, k, local, g, base, local + 2), rtol=1e-4, atol=1e-5)
        if local >= shape[2] and g == 0:
            causal = np.where(np.tril(np.ones((shape[2], shape[2]), bool)), np.asarray(rope(q, base)) @ np.swapaxes(np.asarray(rope(k, base)), -1, -2) / np.sqrt(shape[3]), -np.inf)
            check(name + " = causal RoPE attention", got, causal, rtol=1e-4, atol=1e-5)


def frugal_coordinates():
    """FRUGAL's coordinate projection (`CoordOptimizer`, columns): Adam on the columns J, sign
    descent on the rest, statistics reset when J is redrawn. J is random (the recipe's seeded
    generator), so it is read from runs stopped right after each redraw (steps 1, 3, 5 with
    gap = 2); the reference then runs the whole algorithm with those sets. With r = N and no
    redraw it must be optax's AdamW."""
    k, gap, r = 5, 2, 2
    f64 = jnp.float64
    for rows, cols in [(6, 4), (3, 5)]:
        p0 = rng.randn(rows, cols).astype(np.float32)
        g = rng.randn(k, rows, cols).astype(np.float32)
        hps = {"lr": 0.01, "rank": r, "gap": gap, "weight_decay": 0.1, "free_lr_scale": 0.5}
        drawn = {t: run_eval(STD("optim"), "frugal_columns", {"param": p0, "grad": g[:t + 1]}, hps, steps=t + 1)["state_cols"]
                 for t in range(0, k, gap)}
        ok = all(len(set(J.tolist())) == r and J.min() >= 0 and J.max() < cols for J in drawn.values())
        ok = ok and len({tuple(J.tolist()) for J in drawn.values()}) > 1
        check(f"frugal_columns[{rows}x{cols}] draws {r} distinct columns, anew each gap", float(ok), 1.0, rtol=0, atol=0)

        def reference(lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, free=0.5):
            W = jnp.asarray(p0, f64)
            for t in range(k):
                G = jnp.asarray(g[t], f64)
                if t % gap == 0:
                    J, M, V, n = drawn[t], jnp.zeros((rows, r), f64), jnp.zeros((rows, r), f64), 0
                W = W * (1 - lr * wd)
                n += 1
                R = G[:, J]
                M = b1 * M + (1 - b1) * R
                V = b2 * V + (1 - b2) * R * R
                U = (M / (1 - b1 ** n)) / (jnp.sqrt(V / (1 - b2 ** n)) + eps)
                rest = G.at[:, J].set(0.0)
                W = W - lr * jnp.zeros_like(W).at[:, J].set(U) - lr * free * jnp.sign(rest)
            return W, M, V

        out = run_eval(STD("optim"), "frugal_columns", {"param": p0, "grad": g}, hps, steps=k)
        for name, want in zip(["param", "state_m", "state_v"], reference()):
            check(f"frugal_columns[{rows}x{cols}] {name}", out[name], want, **ELT)
        check(f"frugal_columns[{rows}x{cols}] final J", out["state_cols"], drawn[k - 1], rtol=0, atol=0)

        # r = N, one draw: AdamW (J only permutes the columns of m and v).
        out = run_eval(STD("optim"), "frugal_columns", {"param": p0, "grad": g},
                       {"lr": 0.01, "rank": cols, "gap": 100, "weight_decay": 0.1}, steps=k)
        opt = optax.adamw(0.01, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
        W = jnp.asarray(p0, f64)
        st = opt.init(W)
        for t in range(k):
            u, st = opt.update(jnp.asarray(g[t], f64), st, W)
            W = optax.apply_updates(W, u)
        check(f"frugal_columns[{rows}x{cols}] rank = N is optax.adamw", out["param"], W, **ELT)


def matryoshka_kv():
    """MatryoshkaKV's pieces: `solve` and its gradients against jnp.linalg.solve, the Cayley
    map against (I − Ω)(I + Ω)⁻¹ (orthogonal, identity at 0, gradient through the solve),
    the PCA basis against NumPy's SVD (and its truncation as the best rank-r reconstruction),
    the compressed attention against the paper's truncated formulas (cache of r columns) and,
    at full rank, against plain causal attention; drawn ranks over seeds."""
    src = recipe_file("use std.models.cayley\n"
                      "loss solved(a: f32[N, N], b: f32[N, K], c: f32[N, K]) -> f32 {\n    sum(c * solve(a, b))\n}\n"
                      "loss rotated(w: f32[D, D], c: f32[D, D]) -> f32 {\n    sum(c * cayley(w))\n}\n")
    n, kk = 5, 3
    a = (rng.randn(n, n) + 3 * np.eye(n)).astype(np.float32)
    b = rng.randn(n, kk).astype(np.float32)
    c = rng.randn(n, kk).astype(np.float32)
    f = lambda a, b: jnp.sum(c * jnp.linalg.solve(a, b))  # noqa: E731
    a64, b64 = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
    out = run_eval(src, "solved", {"a": a, "b": b, "c": c}, grad=True)
    check("solve value", out["out"], f(a64, b64), **RED)
    check("solve grad a", out["grad_a"], jax.grad(f, 0)(a64, b64), **RED)
    check("solve grad b", out["grad_b"], jax.grad(f, 1)(a64, b64), **RED)

    def cay(w):
        om = w - w.T
        eye = jnp.eye(w.shape[0], dtype=w.dtype)
        return (eye - om) @ jnp.linalg.inv(eye + om)

    for d in (4, 7):
        w = (0.7 * rng.randn(d, d)).astype(np.float32)
        u = run_eval(STD("models"), "cayley", {"w": w})["out"]
        check(f"cayley[{d}]", u, cay(jnp.asarray(w, jnp.float64)), **RED)
        check(f"cayley[{d}] orthogonal", u.T.astype(np.float64) @ u, np.eye(d), rtol=0, atol=2e-6)
        check(f"cayley[{d}] at 0 is I", run_eval(STD("models"), "cayley", {"w": np.zeros((d, d), np.float32)})["out"], np.eye(d), rtol=0, atol=0)
        cw = rng.randn(d, d).astype(np.float32)
        g = run_eval(src, "rotated", {"w": w, "c": cw}, grad=True)["grad_w"]
        check(f"cayley[{d}] grad", g, jax.grad(lambda w: jnp.sum(cw * cay(w)))(jnp.asarray(w, jnp.float64)), **RED)

    x = rng.randn(20, 6).astype(np.float32)
    v = run_eval(STD("models"), "pca_basis", {"x": x})["out"]
    _, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    want = np.array([r if r[np.argmax(np.abs(r))] > 0 else -r for r in vt]).T
    check("pca_basis[20x6]", v, want, **RED)
    r = 2
    u_, s_, vt_ = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    check("pca_basis rank-2 reconstruction", x @ v[:, :r] @ v[:, :r].T, (u_[:, :r] * s_[:r]) @ vt_[:r], **RED)

    B, H, S, E = 2, 3, 6, 8
    q, k, vv = (rng.randn(B, H, S, E).astype(np.float32) for _ in range(3))
    uk = np.stack([np.linalg.qr(rng.randn(E, E))[0] for _ in range(H)]).astype(np.float32)
    uv = np.stack([np.linalg.qr(rng.randn(E, E))[0] for _ in range(H)]).astype(np.float32)

    def mkv(rk, rv):
        # The paper's cache: r columns per token; scores from the projected query.
        q64, k64, v64 = (t.astype(np.float64) for t in (q, k, vv))
        kc = np.einsum("bhse,her->bhsr", k64, uk[:, :, :rk])
        vc = np.einsum("bhse,her->bhsr", v64, uv[:, :, :rv])
        qc = np.einsum("bhse,her->bhsr", q64, uk[:, :, :rk])
        s = np.einsum("bhir,bhjr->bhij", qc, kc) / np.sqrt(E)
        s = np.where(np.tril(np.ones((S, S), bool)), s, -np.inf)
        w = np.asarray(jax.nn.softmax(s, -1))
        return np.einsum("bhij,bhjr,her->bhie", w, vc, uv[:, :, :rv])

    for rk, rv in [(E, E), (3, 5), (1, 8)]:
        for item in ("matryoshka_attention", "matryoshka_cached_attention"):
            got = run_eval(STD("models"), item, {"q": q, "k": k, "v": vv, "u_k": uk, "u_v": uv}, {"rank_k": rk, "rank_v": rv})["out"]
            check(f"{item} ranks {rk},{rv}", got, mkv(rk, rv), **RED)
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2) / np.sqrt(E)
    s = np.where(np.tril(np.ones((S, S), bool)), s, -np.inf)
    plain = np.asarray(jax.nn.softmax(s, -1)) @ vv
    got = run_eval(STD("models"), "matryoshka_attention", {"q": q, "k": k, "v": vv, "u_k": uk, "u_v": uv}, {"rank_k": E, "rank_v": E})["out"]
    check("matryoshka_attention full rank = causal attention", got, plain, **RED)

    drawn = [int(run_eval(STD("models"), "matryoshka_rank", hps={"E": 64, "step": 16}, seed=s)["out"]) for s in range(24)]
    check("matryoshka_rank in {16, 32, 48, 64}, each drawn", float(set(drawn) == {16, 32, 48, 64}), 1.0, rtol=0, atol=0)


# ----------------------------------------------------------------------------- linear algebra

def linear_algebra():
    src = recipe_file("fn top(g: f32[M, N], k: i32) -> f32[k, N] {\n    svd_topk(g, k)\n}\n"
                      "fn left(g: f32[M, N], k: i32) -> f32[M, k] {\n    svd_topk(g, k, side = \"left\")\n}\n"
                      "fn q(g: f32[M, N]) -> f32[M, N] {\n    qr(g)\n}\n")
    for m, n in [(6, 5), (4, 9)]:
        g = rng.randn(m, n).astype(np.float32)
        u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
        k = 2
        want_v = np.array([v if v[np.argmax(np.abs(v))] > 0 else -v for v in vt[:k]])
        signs = np.array([1.0 if v[np.argmax(np.abs(v))] > 0 else -1.0 for v in vt[:k]])
        check(f"svd_topk right [{m}x{n}]", run_eval(src, "top", {"g": g}, {"k": k})["out"], want_v, **ELT)
        check(f"svd_topk left [{m}x{n}]", run_eval(src, "left", {"g": g}, {"k": k})["out"], u[:, :k] * signs, **ELT)
        if m >= n:
            qm = run_eval(src, "q", {"g": g})["out"]
            qj, rj = jnp.linalg.qr(jnp.asarray(g, jnp.float64))
            d = np.sign(np.diag(np.asarray(rj)))
            check(f"qr [{m}x{n}]", qm, np.asarray(qj) * d, **ELT)



def lost():
    """LOST's SVD split of an initial matrix (stdlib/models.recipe, lost_*), from JAX's SVD:
    B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T (each right vector's largest entry positive), the
    residual's C largest-norm columns kept in S; B A + S = W0 on the kept columns."""
    for (o, i, r, c) in [(6, 8, 2, 3), (12, 5, 3, 2)]:
        w0 = rng.randn(o, i).astype(np.float32)
        hp = {"R": r, "C": c}
        w = jnp.asarray(w0, jnp.float64)
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        signs = jnp.array([1.0 if v[jnp.argmax(jnp.abs(v))] > 0 else -1.0 for v in vt[:r]])
        u_r, v_r = u[:, :r] * signs, vt[:r] * signs[:, None]
        b = u_r * jnp.sqrt(s[:r])
        a = jnp.sqrt(s[:r])[:, None] * v_r
        res = w - b @ a
        norms = jnp.sum(res ** 2, axis=0)
        keep = np.zeros(i)
        keep[np.argsort(-np.asarray(norms), kind="stable")[:c]] = 1.0
        tag = f"[{o}x{i}] R={r} C={c}"
        got = {f: run_eval(STD("models"), f"lost_{f}", {"w0": w0}, hp if f in ("channels", "sparse") else {"R": r})["out"]
               for f in ("left", "right", "channels", "sparse")}
        check(f"lost_left {tag}", got["left"], b, **RED)
        check(f"lost_right {tag}", got["right"], a, **RED)
        check(f"lost_channels {tag}", got["channels"], keep, rtol=0, atol=0)
        check(f"lost_sparse {tag}", got["sparse"], res * keep, **RED)
        check(f"lost_residual {tag}", run_eval(STD("models"), "lost_residual", {"w0": w0}, {"R": r})["out"], res, **RED)
        # On the kept channels the split is exact; elsewhere W = B A.
        total = got["left"].astype(np.float64) @ got["right"] + got["sparse"]
        check(f"lost B A + S on kept channels {tag}", total * keep, np.asarray(w) * keep, **RED)
        # The compact form: the kept channels as indices (descending norm, stable) and columns.
        order = np.argsort(-np.asarray(norms), kind="stable")[:c]
        idx = run_eval(STD("models"), "lost_channel_index", {"w0": w0}, hp)["out"]
        check(f"lost_channel_index {tag}", idx, order.astype(np.float64), rtol=0, atol=0)
        cols = run_eval(STD("models"), "lost_sparse_columns", {"w0": w0}, hp)["out"]
        check(f"lost_sparse_columns {tag}", cols, np.asarray(res)[:, order], **RED)

for f in [losses, linear_ce, eisl_sequence, distillation, gram, flow_matching, local_gram_flow, optimizers, projected_optimizers, frugal_coordinates, schedules, sparsity, quantization, decoding, localleap, layer_norm, positions, matryoshka_kv, lost, linear_algebra]:
    case(f)

print()
print(f"{passed} passed, {len(failed)} failed")
for f in failed:
    print("  " + f)
sys.exit(1 if failed else 0)
