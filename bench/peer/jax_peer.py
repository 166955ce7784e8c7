"""The JAX side of recipec's benchmarks, driven line by line over stdin/stdout so that the
Rust runner can interleave it with its own runs in one process tree.

Commands (one per line): `adamw N` sets up an AdamW step over N f32 parameters with
`jax.jit(optax.adamw)` (buffers donated, so the update is in place); `lce N D V` sets up the
loss and both gradients of the naive linear cross-entropy (`hidden @ classifier.T`, then
log-sum-exp minus the target logit, averaged) under `jax.jit`; `gpt B T V D L H` sets up one
training step of `std.models.gpt` (pre-norm blocks, exact GELU, causal attention, tied
output head) with the linear cross-entropy and `optax.adamw`, jitted with donated
parameters and states (the same model and optimizer as `recipes/tiny_gpt.recipe`);
`run K` times K steps and
prints one line per step: seconds; `rss` prints this process's peak resident bytes.
`quit` ends.
"""
import sys, time

import jax
import jax.numpy as jnp
import optax

jax.config.update("jax_platforms", "cpu")


def main():
    step = None
    state = None
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "adamw":
            n = int(cmd[1])
            opt = optax.adamw(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
            key = jax.random.PRNGKey(0)
            p = jax.random.normal(key, (n,), jnp.float32)
            g = jax.random.normal(jax.random.PRNGKey(1), (n,), jnp.float32) * 0.01
            s = opt.init(p)

            def f(p, s, g):
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s

            step = jax.jit(f, donate_argnums=(0, 1))
            p, s = step(p, s, g)
            jax.block_until_ready(p)
            state = [p, s, g]
            print("ready", flush=True)
        elif cmd[0] == "lce":
            n, d, v = int(cmd[1]), int(cmd[2]), int(cmd[3])
            h = jax.random.normal(jax.random.PRNGKey(0), (n, d), jnp.float32) * 0.1
            c = jax.random.normal(jax.random.PRNGKey(1), (v, d), jnp.float32) * 0.1
            y = jax.random.randint(jax.random.PRNGKey(2), (n,), 0, v, jnp.int32)

            def loss(h, c):
                z = h @ c.T
                lse = jax.nn.logsumexp(z, axis=1)
                picked = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
                return jnp.mean(lse - picked)

            f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            jax.block_until_ready(f(h, c))

            def lce_step():
                jax.block_until_ready(f(h, c))

            step = lce_step
            state = None
            print("ready", flush=True)
        elif cmd[0] == "gpt":
            b, t, v, d, nl, nh = (int(x) for x in cmd[1:7])
            keys = iter(jax.random.split(jax.random.PRNGKey(0), 8 * nl + 8))
            nrm = lambda shape, std: jax.random.normal(next(keys), shape, jnp.float32) * std
            params = {"wte": nrm((v, d), 0.02), "wpe": nrm((t, d), 0.01),
                      "lg": jnp.ones(d), "lb": jnp.zeros(d), "blocks": []}
            for _ in range(nl):
                params["blocks"].append({
                    "g1": jnp.ones(d), "b1": jnp.zeros(d), "g2": jnp.ones(d), "b2": jnp.zeros(d),
                    "wq": nrm((d, d), 0.02), "wk": nrm((d, d), 0.02), "wv": nrm((d, d), 0.02),
                    "wo": nrm((d, d), 0.02), "w1": nrm((d, 4 * d), 0.02), "c1": jnp.zeros(4 * d),
                    "w2": nrm((4 * d, d), 0.02), "c2": jnp.zeros(d)})

            def ln(x, g, bb):
                mu = jnp.mean(x, -1, keepdims=True)
                c = x - mu
                return c * jax.lax.rsqrt(jnp.mean(c * c, -1, keepdims=True) + 1e-5) * g + bb

            def heads(x, w):
                return (x @ w).reshape(b, t, nh, d // nh).transpose(0, 2, 1, 3)

            causal = jnp.tril(jnp.ones((t, t), bool))

            def loss(p, x, y):
                h = p["wte"][x] + p["wpe"][:t]
                for blk in p["blocks"]:
                    a = ln(h, blk["g1"], blk["b1"])
                    q, k, vv = heads(a, blk["wq"]), heads(a, blk["wk"]), heads(a, blk["wv"])
                    s_ = q @ k.transpose(0, 1, 3, 2) * jax.lax.rsqrt(jnp.float32(d // nh))
                    w_ = jax.nn.softmax(jnp.where(causal, s_, -jnp.inf), axis=-1)
                    h = h + (w_ @ vv).transpose(0, 2, 1, 3).reshape(b, t, d) @ blk["wo"]
                    m = ln(h, blk["g2"], blk["b2"])
                    h = h + jax.nn.gelu(m @ blk["w1"] + blk["c1"], approximate=False) @ blk["w2"] + blk["c2"]
                f = ln(h.reshape(b * t, d), p["lg"], p["lb"])
                z = f @ p["wte"].T
                lse = jax.nn.logsumexp(z, axis=1)
                picked = jnp.take_along_axis(z, y.reshape(-1)[:, None], axis=1)[:, 0]
                return jnp.mean(lse - picked)

            opt = optax.adamw(learning_rate=3e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)

            def train_step(p, s, x, y):
                l, g = jax.value_and_grad(loss)(p, x, y)
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s, l

            f = jax.jit(train_step, donate_argnums=(0, 1))
            x = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, v, jnp.int32)
            y = jax.random.randint(jax.random.PRNGKey(2), (b, t), 0, v, jnp.int32)
            st = [params, opt.init(params)]
            st[0], st[1], l0 = f(st[0], st[1], x, y)
            jax.block_until_ready(l0)

            def gpt_step():
                st[0], st[1], l = f(st[0], st[1], x, y)
                jax.block_until_ready(l)

            step = gpt_step
            state = None
            print("ready", flush=True)
        elif cmd[0] == "rss":
            with open("/proc/self/status") as fh:
                for l in fh:
                    if l.startswith("VmHWM:"):
                        print(int(l.split()[1]) * 1024, flush=True)
        elif cmd[0] == "run":
            for _ in range(int(cmd[1])):
                t = time.perf_counter()
                if state is None:
                    step()
                else:
                    p, s = step(state[0], state[1], state[2])
                    jax.block_until_ready(p)
                    state[0], state[1] = p, s
                print(time.perf_counter() - t, flush=True)
        elif cmd[0] == "quit":
            return


if __name__ == "__main__":
    main()
