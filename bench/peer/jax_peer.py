"""The JAX side of recipec's benchmarks, driven line by line over stdin/stdout so that the
Rust runner can interleave it with its own runs in one process tree.

Commands (one per line): `adamw N` sets up an AdamW step over N f32 parameters with
`jax.jit(optax.adamw)` (buffers donated, so the update is in place); `lce N D V` sets up the
loss and both gradients of the naive linear cross-entropy (`hidden @ classifier.T`, then
log-sum-exp minus the target logit, averaged) under `jax.jit`; `run K` times K steps and
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
