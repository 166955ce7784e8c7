"""The JAX side of recipec's benchmarks, driven line by line over stdin/stdout so that the
Rust runner can interleave it with its own runs in one process tree.

Commands (one per line): `adamw N` sets up an AdamW step over N f32 parameters with
`jax.jit(optax.adamw)` (buffers donated, so the update is in place); `run K` times K steps
and prints one line per step: seconds. `quit` ends.
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
        elif cmd[0] == "run":
            for _ in range(int(cmd[1])):
                t = time.perf_counter()
                p, s = step(state[0], state[1], state[2])
                jax.block_until_ready(p)
                state[0], state[1] = p, s
                print(time.perf_counter() - t, flush=True)
        elif cmd[0] == "quit":
            return


if __name__ == "__main__":
    main()
