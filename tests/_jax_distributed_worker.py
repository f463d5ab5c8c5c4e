"""The JAX context-parallel checks (run by test_jax.py in a subprocess, as
XLA's host device count is fixed at import):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python _jax_distributed_worker.py

On meshes of 2 and 4 CPU devices, libna.jax.distributed inside jax.jit of
jax.shard_map must give the single-device op's out, lse and gradients (q, k,
v sharded; rpb and additional keys/values replicated); bad calls raise.
Failures go to stdout; the exit status is the number of failures.
"""

import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

jax.config.update("jax_enable_x64", True)

import libna.jax  # noqa: E402
import libna.jax.distributed as cp  # noqa: E402

CASES = [  # name, spatial, kernel, axis, keywords
    ("1d k3", (16,), 3, 0, {}),
    ("1d k5 dilation 2 stride 2 lse", (24,), 5, 0, dict(dilation=2, stride=2, return_lse=True)),
    ("1d causal k4", (16,), 4, 0, dict(is_causal=True, return_lse=True)),
    ("1d k = length (halo over every block)", (16,), 16, 0, {}),
    ("1d even k6 thin blocks (multi-hop)", (12,), 6, 0, dict(return_lse=True)),
    ("2d axis 1 rpb gqa dv", (5, 16), (3, 5), 1, dict(rpb=True, heads_kv=2, dim_v=3)),
    ("2d axis 0 causal/dilated, additional keys", (16, 6), (3, 3), 0,
     dict(is_causal=(True, False), dilation=(2, 1), additional=3, return_lse=True)),
    ("3d axis 2 stride", (3, 4, 16), (2, 3, 4), 2, dict(stride=(1, 1, 2), return_lse=True)),
]


def check(devices, name, spatial, kernel, axis, keywords):
    keywords = dict(keywords)
    n = len(spatial)
    heads, heads_kv = 4, keywords.pop("heads_kv", 4)
    dim, dim_v = 4, keywords.pop("dim_v", 4)
    use_rpb, additional = keywords.pop("rpb", False), keywords.pop("additional", 0)
    return_lse = keywords.get("return_lse", False)
    rng = np.random.default_rng(len(name))
    t = lambda *shape: jnp.asarray(rng.standard_normal(shape))  # noqa: E731
    q, k, v = t(2, *spatial, heads, dim), t(2, *spatial, heads_kv, dim), \
        t(2, *spatial, heads_kv, dim_v)
    ks = (kernel,) * n if isinstance(kernel, int) else kernel
    extra = {}
    if use_rpb:
        extra["rpb"] = t(heads, *(2 * x - 1 for x in ks))
    if additional:
        extra["additional_keys"] = t(2, additional, heads_kv, dim)
        extra["additional_values"] = t(2, additional, heads_kv, dim_v)
    single = getattr(libna.jax, f"na{n}d")
    parallel = getattr(cp, f"na{n}d")
    mesh = jax.make_mesh((devices,), ("x",), devices=jax.devices()[:devices])
    sharded = P(*([None] * (1 + axis) + ["x"]))

    def loss(fn, q, k, v, extra):
        result = fn(q, k, v, kernel, **extra, **keywords)
        out, lse = result if return_lse else (result, None)
        value = (out ** 2 * jnp.cos(out)).sum()
        return value + (0.0 if lse is None else jnp.sin(lse).sum()), result

    def local(q, k, v, extra):
        value, result = loss(lambda *a, **kw: parallel(*a, axis_name="x", axis=axis, **kw),
                             q, k, v, extra)
        return jax.lax.psum(value, "x"), result

    extra_specs = {key: P() for key in extra}
    out_specs = (P(), (sharded, sharded) if return_lse else sharded)
    sharded_fn = jax.shard_map(local, mesh=mesh, in_specs=(sharded, sharded, sharded,
                                                           extra_specs), out_specs=out_specs)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, sharded))  # noqa: E731
    args = (put(q), put(k), put(v), {key: jax.device_put(x, NamedSharding(mesh, P()))
                                      for key, x in extra.items()})
    (value, result), grads = jax.jit(jax.value_and_grad(sharded_fn, argnums=(0, 1, 2, 3),
                                                        has_aux=True))(*args)
    (want_value, want_result), want_grads = jax.value_and_grad(
        lambda q, k, v, e: loss(single, q, k, v, e), argnums=(0, 1, 2, 3),
        has_aux=True)(q, k, v, extra)
    failures = []
    pairs = [("loss", value, want_value)]
    pairs += list(zip(("out", "lse"), result if return_lse else (result,),
                      want_result if return_lse else (want_result,)))
    pairs += list(zip(("dq", "dk", "dv"), grads[:3], want_grads[:3]))
    pairs += [(f"d{key}", grads[3][key], want_grads[3][key]) for key in extra]
    for what, got, want in pairs:
        if not np.allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-11):
            err = np.abs(np.asarray(got) - np.asarray(want)).max()
            failures.append(f"{devices} devices, {name}: {what} differs from the single-device "
                            f"op (max error {err})")
    return failures


def bad_calls():
    failures = []
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    q = jax.device_put(jnp.zeros((1, 8, 2, 4)), NamedSharding(mesh, P(None, "x")))

    def expect(what, kind, needle, fn):
        try:
            jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(None, "x"),
                                  out_specs=P(None, "x")))(q)
        except kind as error:
            if needle not in str(error):
                failures.append(f"{what}: {kind.__name__} without {needle!r}: {error}")
        except Exception as error:  # noqa: BLE001
            failures.append(f"{what}: expected {kind.__name__}, got {error!r}")
        else:
            failures.append(f"{what}: no error")

    expect("kernel larger than the gathered axis", ValueError, "gathered shape of q is (1, 8",
           lambda q: cp.na1d(q, q, q, 9, axis_name="x"))
    expect("unknown mesh axis", ValueError, "axis_name='y'",
           lambda q: cp.na1d(q, q, q, 3, axis_name="y"))
    expect("axis out of range", ValueError, "axis=1",
           lambda q: cp.na1d(q, q, q, 3, axis_name="x", axis=1))
    return failures


def main():
    failures = []
    for devices in (2, 4):
        for case in CASES:
            try:
                failures += check(devices, *case)
            except Exception:  # noqa: BLE001
                failures.append(f"{devices} devices, {case[0]}: raised\n"
                                f"{traceback.format_exc()}")
    failures += bad_calls()
    for f in failures:
        print(f, flush=True)
    sys.exit(min(len(failures), 100))


if __name__ == "__main__":
    main()
