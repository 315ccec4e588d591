"""Fused attention: splash (Pallas interpret mode on CPU) equals decoder.attend on DecoderInputs masks, splash
compiles ahead of time for a TPU topology, and resolve() picks or refuses kernels with reasons."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax.models import decoder
from ftjax.models import fused_attention as fa

B, H, D = 2, 4, 64


def _qkv(length, kv_heads, seed=0, batch=B, heads=H, dim=D, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (batch, length, heads, dim), dtype),
            jax.random.normal(kk, (batch, length, kv_heads, dim), dtype),
            jax.random.normal(kv, (batch, length, kv_heads, dim), dtype))


def _packed_segments(length):
    """Row 0: three documents then padding; row 1: one document then padding (segment 0 = padding)."""
    seg = np.zeros((B, length), np.int32)
    seg[0, : length // 3] = 1
    seg[0, length // 3: length // 2 + 5] = 2
    seg[0, length // 2 + 5: length - 20] = 3
    seg[1, : length - 37] = 1
    return jnp.asarray(seg)


def _reference(q, k, v, *, segment_ids=None, attention_mask=None, window=None):
    inputs = decoder.DecoderInputs(jnp.zeros(q.shape[:2], jnp.int32), attention_mask, None, segment_ids, None, None)
    return decoder.attend(q, k, v, inputs.mask(window), D**-0.5, nnx.Dropout(0.0), deterministic=True, rngs=None)


def _splash(q, k, v, *, segment_ids=None, attention_mask=None, window=None):
    key_valid = None if attention_mask is None else attention_mask > 0
    return fa.fused_attention(q, k, v, scale=D**-0.5, implementation="splash", segment_ids=segment_ids,
                              key_valid=key_valid, window=window, interpret=True)


CASES = {  # name: (length, kv_heads, segment ids?, window)
    "causal_gqa": (128, 2, False, None),
    "causal_mha": (128, 4, False, None),
    "sliding_window_gqa": (256, 2, False, 48),
    "packed_padded_gqa": (256, 2, True, None),
    "packed_padded_window_mqa": (256, 1, True, 40),
}


@pytest.mark.parametrize("name", list(CASES))
def test_splash_interpret_equals_xla_forward_and_gradients(name):
    length, kv_heads, packed, window = CASES[name]
    q, k, v = _qkv(length, kv_heads)
    seg = _packed_segments(length) if packed else None
    rows = jnp.ones((B, length), bool) if seg is None else seg > 0  # query rows the loss counts
    cot = jax.random.normal(jax.random.key(1), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, segment_ids=seg, window=window) * cot * rows[:, :, None, None])

    out, ref = _splash(q, k, v, segment_ids=seg, window=window), _reference(q, k, v, segment_ids=seg, window=window)
    assert out.shape == ref.shape == q.shape
    assert bool(jnp.isfinite(out).all())  # padding rows included
    np.testing.assert_allclose(np.asarray(out)[np.asarray(rows)], np.asarray(ref)[np.asarray(rows)], atol=1e-5)
    grads = jax.grad(loss(_splash), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for got, want, what in zip(grads, ref_grads, "qkv"):
        assert bool(jnp.isfinite(got).all()), what
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, err_msg=f"d/d{what}")


def test_splash_key_padding_without_segments_matches_xla_on_rows_with_a_visible_key():
    """attention_mask with left padding: padded keys are never attended; a query before the first valid key has
    no visible key, and only its finiteness is promised (the loss masks it)."""
    length = 128
    q, k, v = _qkv(length, 2, seed=3)
    mask = np.ones((B, length), np.int32)
    mask[0, :10] = 0  # left padding
    mask[1, 100:] = 0  # right padding: those queries still see the valid prefix, as in the XLA path
    mask = jnp.asarray(mask)
    out, ref = _splash(q, k, v, attention_mask=mask), _reference(q, k, v, attention_mask=mask)
    assert bool(jnp.isfinite(out).all())
    seen = np.ones((B, length), bool)
    seen[0, :10] = False
    np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], atol=1e-5)
    # A padded key's value must not leak: changing it leaves every row with a visible key unchanged.
    v2 = v.at[0, 3].set(100.0).at[1, 120].set(-100.0)
    np.testing.assert_allclose(np.asarray(_splash(q, k, v2, attention_mask=mask))[seen], np.asarray(out)[seen],
                               atol=1e-5)


def test_splash_refuses_shapes_it_cannot_run_with_the_reason():
    q, k, v = _qkv(192, 2)  # 192 is not a multiple of 128
    with pytest.raises(ValueError, match="model.attention='splash'.*not a multiple of 128"):
        _splash(q, k, v)
    q, k, v = _qkv(128, 2)
    with pytest.raises(ValueError, match="model.attention='splash'.*TPU kernel and the backend is cpu"):
        fa.fused_attention(q, k, v, scale=1.0, implementation="splash")  # no interpret on a CPU
    with pytest.raises(ValueError, match="k .* and v .* must be"):
        fa.fused_attention(q, k[:, :64], v[:, :64], scale=1.0, implementation="splash", interpret=True)


def test_splash_block_sizes_divide_the_length():
    assert fa.splash_block(128) == 128 and fa.splash_block(384) == 128
    assert fa.splash_block(256) == 256 and fa.splash_block(768) == 256
    assert fa.splash_block(4096) == 512


def _topology_mesh():
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    except Exception as err:  # no libtpu, or a jax without the topology API
        pytest.skip(f"TPU topology API unavailable: {err}")
    return jax.sharding.Mesh(np.array(topo.devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("window", [None, 200])
def test_splash_compiles_ahead_of_time_for_a_tpu_topology_forward_and_backward(window):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _topology_mesh()
    batch, length, heads, kv_heads, dim = 4, 1024, 8, 2, 128
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))

    def attention(q, k, v, seg):
        return fa.fused_attention(q, k, v, scale=dim**-0.5, implementation="splash", segment_ids=seg, window=window)

    def loss(q, k, v, seg):
        return attention(q, k, v, seg).astype(jnp.float32).sum()

    args = [jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.bfloat16, sharding=batch_sharding),
            jax.ShapeDtypeStruct((batch, length, kv_heads, dim), jnp.bfloat16, sharding=batch_sharding),
            jax.ShapeDtypeStruct((batch, length, kv_heads, dim), jnp.bfloat16, sharding=batch_sharding),
            jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=batch_sharding)]
    with jax.set_mesh(mesh):
        assert fa.target_platform() == "tpu"
        forward = jax.jit(attention).lower(*args).compile()
        backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    for compiled, kernels in ((forward, 1), (backward, 2)):  # the backward: forward + fused dq/dk/dv kernel
        text = compiled.as_text()
        assert text.count("tpu_custom_call") >= kernels  # the Pallas (Mosaic) kernels, not an XLA fallback
        assert "all-gather" not in text  # shard_map keeps batch and heads local: no gathering of q/k/v
        assert compiled.cost_analysis()["bytes accessed"] > 0
        memory = compiled.memory_analysis()
        assert memory.argument_size_in_bytes > 0 and memory.output_size_in_bytes > 0
        # one [B, H, L, L] float32 score matrix per chip would be 32 MiB; the kernel never builds one.
        assert memory.temp_size_in_bytes < batch * heads * length * length * 4 // 4


def test_resolve_auto_picks_xla_on_cpu_and_kernels_on_accelerators():
    shape = dict(q_shape=(2, 256, 4, 64), kv_heads=2)
    assert fa.resolve("auto", **shape, dtype=jnp.float32, platform="cpu") == "xla"
    assert fa.resolve("auto", **shape, dtype=jnp.bfloat16) == "xla"  # the test backend is cpu
    assert fa.resolve("auto", **shape, dtype=jnp.bfloat16, platform="tpu") == "splash"
    assert fa.resolve("auto", **shape, dtype=jnp.bfloat16, platform="gpu", packed=True, window=64) == "cudnn"
    assert fa.resolve("auto", **shape, dtype=jnp.float32, platform="gpu") == "xla"  # cuDNN: bf16/fp16 only
    assert fa.resolve("auto", q_shape=(2, 200, 4, 64), kv_heads=2, dtype=jnp.bfloat16, platform="tpu") == "xla"
    assert fa.resolve("auto", q_shape=(2, 256, 4, 256), kv_heads=2, dtype=jnp.bfloat16, platform="gpu") == "xla"
    assert fa.resolve("xla", **shape, dtype=jnp.float32, platform="tpu") == "xla"
    assert fa.resolve("splash", **shape, dtype=jnp.bfloat16, platform="tpu") == "splash"


def test_dropout_forces_xla_under_auto_and_an_explicit_kernel_raises():
    shape = dict(q_shape=(2, 256, 4, 64), kv_heads=2, dtype=jnp.bfloat16, has_dropout=True)
    assert fa.resolve("auto", **shape, platform="tpu") == "xla"
    assert fa.resolve("auto", **shape, platform="gpu") == "xla"
    for kernel, platform in (("splash", "tpu"), ("cudnn", "gpu")):
        with pytest.raises(ValueError, match=rf"model.attention='{kernel}' cannot run: attention dropout.*fix:"):
            fa.resolve(kernel, **shape, platform=platform)


def test_explicit_kernel_on_the_wrong_platform_raises_one_line_with_the_fix():
    with pytest.raises(ValueError) as err:
        fa.resolve("splash", q_shape=(2, 256, 4, 64), kv_heads=2, dtype=jnp.float32)  # cpu backend
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.attention='splash' cannot run: splash attention is a TPU kernel")
    assert "fix: use model.attention=auto" in message
    with pytest.raises(ValueError, match="model.attention='cudnn' cannot run: cuDNN flash attention needs an NVIDIA"):
        fa.resolve("cudnn", q_shape=(2, 256, 4, 64), kv_heads=2, dtype=jnp.bfloat16, platform="cpu")
    with pytest.raises(ValueError, match="model.attention='flash' is not valid; use one of auto, xla, splash"):
        fa.resolve("flash", q_shape=(2, 256, 4, 64), kv_heads=2, dtype=jnp.bfloat16)


@pytest.mark.parametrize("kernel, platform, kwargs, reason", [
    ("splash", "tpu", dict(q_shape=(2, 200, 4, 64)), "sequence length 200 is not a multiple of 128"),
    ("splash", "tpu", dict(q_shape=(2, 256, 4, 320)), "head dim 320 > 256"),
    ("splash", "tpu", dict(dtype=jnp.float16), "bfloat16 or float32, not float16"),
    ("splash", "tpu", dict(kv_heads=3), "4 query heads are not a multiple of 3 kv heads"),
    ("cudnn", "gpu", dict(q_shape=(2, 256, 4, 256)), "head dim 256 must be a multiple of 8 and <= 128"),
    ("cudnn", "gpu", dict(dtype=jnp.float32), "bfloat16 or float16, not float32"),
    ("cudnn", "gpu", dict(q_shape=(2, 255, 4, 64), packed=True), "even sequence length, got 255"),
    ("cudnn", "rocm", {}, "needs an NVIDIA GPU and the backend is rocm"),
    ("splash", "tpu", dict(window=0), "sliding window 0 must be >= 1"),
])
def test_unsupported_shapes_explain_themselves(kernel, platform, kwargs, reason):
    base = dict(q_shape=(2, 256, 4, 64), kv_heads=2, dtype=jnp.bfloat16, platform=platform)
    if platform != "rocm":
        assert fa.unsupported_reason(kernel, **base) is None
    assert reason in (fa.unsupported_reason(kernel, **(base | kwargs)) or "")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU (run with "
                    "JAX_PLATFORMS=cuda on a GPU machine)")
@pytest.mark.parametrize("packed, window", [(False, None), (False, 48), (True, None), (True, 40)])
def test_cudnn_equals_xla_on_a_gpu(packed, window):
    length = 256
    q, k, v = _qkv(length, 2, dtype=jnp.bfloat16)
    seg = _packed_segments(length) if packed else None
    rows = np.ones((B, length), bool) if seg is None else np.asarray(seg > 0)
    assert fa.resolve("auto", q_shape=q.shape, kv_heads=2, dtype=q.dtype, window=window, packed=packed) == "cudnn"
    out = fa.fused_attention(q, k, v, scale=D**-0.5, implementation="cudnn", segment_ids=seg, window=window)
    ref = _reference(q, k, v, segment_ids=seg, window=window)
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    np.testing.assert_allclose(np.asarray(out, np.float32)[rows], np.asarray(ref, np.float32)[rows], atol=2e-2)
    cot = jax.random.normal(jax.random.key(1), q.shape, jnp.bfloat16) * jnp.asarray(rows, q.dtype)[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum((fn(q, k, v) * cot).astype(jnp.float32))

    fused = lambda q, k, v: fa.fused_attention(q, k, v, scale=D**-0.5, implementation="cudnn",  # noqa: E731
                                               segment_ids=seg, window=window)
    grads = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(lambda q, k, v: _reference(q, k, v, segment_ids=seg, window=window)),
                         argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=6e-2)
