"""ftjax.optim: schedules in closed form, the param table (LLRD, decay mask, freezing), and training steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import optim, schedules
from ftjax import params as params_lib
from ftjax.config import ConfigError, default_config
from ftjax.reporting import optimizer as optimizer_report

H = 4  # hidden size of the toy BERT
HEAD = r"classifier/.*|bert/pooler/.*"


def bert_params(num_layers: int = 4, seed: int = 0) -> dict:
    """A BERT-shaped nested dict: embeddings, num_layers encoder layers, pooler, classifier."""
    rng = np.random.default_rng(seed)

    def n(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float32)

    def layer():
        return {
            "attention": {
                "self": {"query": {"kernel": n(H, H), "bias": n(H)}},
                "output": {"LayerNorm": {"scale": 1.0 + n(H), "bias": n(H)}},
            },
            "intermediate": {"dense": {"kernel": n(H, 2 * H), "bias": n(2 * H)}},
        }

    return {
        "bert": {
            "embeddings": {
                "word_embeddings": {"embedding": n(10, H)},
                "LayerNorm": {"scale": 1.0 + n(H), "bias": n(H)},
            },
            "encoder": {"layer": {i: layer() for i in range(num_layers)}},
            "pooler": {"dense": {"kernel": n(H, H), "bias": n(H)}},
        },
        "classifier": {"kernel": n(H, 2), "bias": n(2)},
    }


IDS = jnp.array([1, 3, 5, 7, 2, 9])
LABEL = 1


def model_loss(p: dict) -> jax.Array:
    """A tiny transformer-shaped forward pass where every param gets a gradient."""
    emb = p["bert"]["embeddings"]
    x = emb["word_embeddings"]["embedding"][IDS]
    x = x * emb["LayerNorm"]["scale"] + emb["LayerNorm"]["bias"]
    for i in sorted(p["bert"]["encoder"]["layer"]):
        lp = p["bert"]["encoder"]["layer"][i]
        q = lp["attention"]["self"]["query"]
        h = jnp.tanh(x @ q["kernel"] + q["bias"])
        ln = lp["attention"]["output"]["LayerNorm"]
        x = x + h * ln["scale"] + ln["bias"]
        d = lp["intermediate"]["dense"]
        x = x + 0.5 * jnp.tanh(x @ d["kernel"] + d["bias"])[:, :H]
    pool = p["bert"]["pooler"]["dense"]
    pooled = jnp.tanh(x.mean(0) @ pool["kernel"] + pool["bias"])
    logits = pooled @ p["classifier"]["kernel"] + p["classifier"]["bias"]
    return -jax.nn.log_softmax(logits)[LABEL]


def separable_loss(p: dict) -> jax.Array:
    """Each leaf's gradient depends only on that leaf, so param trajectories are independent."""
    return sum(
        jnp.sum((x - 0.3) ** 2 * (1.0 + jnp.arange(x.size).reshape(x.shape) % 3)) for x in jax.tree.leaves(p)
    )


def ocfg(**overrides):
    """cfg.optim with a constant schedule and no clipping unless overridden ("schedule" takes a dict)."""
    o = default_config().optim
    o.schedule.type = "constant"
    o.clip_norm = 0.0
    schedule = overrides.pop("schedule", {})
    for k, v in schedule.items():
        o.schedule[k] = v
    for k, v in overrides.items():
        o[k] = v
    return o


def build(o, params=None, total_steps=20, steps_per_epoch=5, head_pattern=HEAD):
    params = bert_params() if params is None else params
    return optim.build(
        o, params, total_steps=total_steps, steps_per_epoch=steps_per_epoch, head_pattern=head_pattern
    )


def make_step(opt, trainable, loss=model_loss):
    """The train-step contract: zeros as gradients for params not trainable at this step."""

    @jax.jit
    def train_step(params, state):
        grads = jax.grad(loss)(params)
        grads = params_lib.map_with_path(lambda p, g: g if p in trainable else jnp.zeros_like(g), grads)
        updates, state = opt.tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return train_step


def train(opt, params, steps, start=0, state=None, loss=model_loss):
    """Runs `steps` optimizer steps from step `start`; returns (params after each step, last state)."""
    state = opt.tx.init(params) if state is None else state
    compiled, history = {}, []
    for s in range(start, start + steps):
        trainable = opt.trainable_at(s)
        if trainable not in compiled:
            compiled[trainable] = make_step(opt, trainable, loss)
        params, state = compiled[trainable](params, state)
        history.append(params)
    return history, state


def leaf_bytes(x) -> bytes:
    return np.asarray(x).tobytes()


def one_update(opt, grads, params, state=None):
    state = opt.tx.init(params) if state is None else state
    updates, _ = jax.jit(opt.tx.update)(grads, state, params)
    return params_lib.flatten(updates)


# ------------------------------------------------------------------------------------------ schedules
P, T, SPE = 0.1, 100, 10


def _warm(t, w, main):
    return P * t / w if t < w else main(t - w)


def _one_cycle(t, c, final):
    start = P / 25
    if t < c:
        return start + (P - start) * (1 - math.cos(math.pi * t / c)) / 2
    if t < T:
        return P + (final - P) * (1 - math.cos(math.pi * (t - c) / (T - c))) / 2
    return final


CLOSED_FORM = {
    "constant": ({}, lambda t: P),
    "linear": ({"decay": 50, "min_ratio": 0.1}, lambda t: P - (P - 0.1 * P) * min(t, 50) / 50),
    "cosine": (
        {"decay": 1.0, "min_ratio": 0.2},
        lambda t: 0.2 * P + 0.8 * P * (1 + math.cos(math.pi * min(t, 100) / 100)) / 2,
    ),
    "warmup_cosine": (
        {"warmup": 10, "decay": 1.0},
        lambda t: _warm(t, 10, lambda s: P * (1 + math.cos(math.pi * min(s, 90) / 90)) / 2),
    ),
    "warmup_linear": (
        {"warmup": "1ep", "decay": 1.0},
        lambda t: _warm(t, 10, lambda s: P - P * min(s, 90) / 90),
    ),
    "warmup_constant": ({"warmup": "20%"}, lambda t: _warm(t, 20, lambda s: P)),
    "wsd": (
        {"warmup": 10, "decay": 0.2, "min_ratio": 0.1},
        lambda t: P * t / 10 if t < 10 else P if t < 80 else P - 0.9 * P * min(t - 80, 20) / 20,
    ),
    "inverse_sqrt": ({"warmup": 16}, lambda t: P * t / 16 if t < 16 else P * math.sqrt(16 / t)),
    "polynomial": (
        {"warmup": 10, "decay": 40, "power": 2.0, "min_ratio": 0.1},
        lambda t: _warm(t, 10, lambda s: 0.1 * P + 0.9 * P * (1 - min(s, 40) / 40) ** 2),
    ),
    "step": (
        {"warmup": 10, "decay": 25, "gamma": 0.5},
        lambda t: _warm(t, 10, lambda s: P * 0.5 ** (s // 25)),
    ),
    "one_cycle": ({"pct_start": 0.25}, lambda t: _one_cycle(t, 25, P / 25 / 1e4)),
    # ULMFiT: cut = floor(T * cut_frac) = 20, p = t / cut, then 1 - (t - cut) / (cut * (1 / cut_frac - 1)).
    "stlr": (
        {"cut_frac": 0.2, "ratio": 32.0},
        lambda t: P * (1 + (t / 20 if t < 20 else max(0.0, 1 - (t - 20) / (20 * (1 / 0.2 - 1)))) * 31) / 32,
    ),
}
STEPS = (0, 1, 5, 9, 10, 11, 16, 20, 25, 37, 50, 60, 79, 80, 90, 99, 100, 120)


@pytest.mark.parametrize("kind", list(CLOSED_FORM))
def test_schedule_matches_closed_form(kind):
    spec, ref = CLOSED_FORM[kind]
    fn = schedules.make_schedule({"type": kind, **spec}, P, T, SPE)
    got = schedules.lr_curve(fn, STEPS)
    want = np.array([ref(t) for t in STEPS])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)


def test_wsd_one_minus_sqrt_cooldown_matches_closed_form():
    # Hägele et al. 2024: lr = P - (P - E) * sqrt((t - (T - D)) / D) in the final D steps.
    spec = {"type": "wsd", "warmup": 10, "decay": 0.2, "min_ratio": 0.1, "cooldown": "1-sqrt"}
    fn = schedules.make_schedule(spec, P, T, SPE)

    def ref(t):
        if t < 10:
            return P * t / 10
        return P if t < 80 else P - 0.9 * P * math.sqrt(min(t - 80, 20) / 20)

    np.testing.assert_allclose(schedules.lr_curve(fn, STEPS), [ref(t) for t in STEPS], rtol=2e-5, atol=1e-9)
    at_zero = schedules.make_schedule({**spec, "min_ratio": 0.0}, P, T, SPE)
    np.testing.assert_allclose(schedules.lr_curve(at_zero, [90]), [P * (1 - math.sqrt(10 / 20))], rtol=2e-5)


def test_stlr_needs_a_rise_of_at_least_one_step():
    with pytest.raises(ConfigError, match="optim.schedule.cut_frac"):
        schedules.make_schedule({"type": "stlr", "cut_frac": 0.05}, P, 10, SPE)


def test_one_cycle_ends_at_min_ratio():
    fn = schedules.make_schedule({"type": "one_cycle", "pct_start": 0.3, "min_ratio": 0.1}, P, T, SPE)
    np.testing.assert_allclose(
        schedules.lr_curve(fn, [0, 30, 65, 100]),
        [_one_cycle(t, 30, 0.1 * P) for t in (0, 30, 65, 100)],
        rtol=2e-5,
    )


def test_lr_at_is_group_multiplier_times_its_schedule():
    groups = (("classifier/.*", {"name": "head", "lr_mult": 10.0, "schedule": {"type": "constant"}}),)
    opt = build(ocfg(lr=0.1, groups=groups, schedule={"type": "warmup_linear", "warmup": 4}), total_steps=20)
    for step in (0, 2, 4, 12, 19):
        lrs = opt.lr_at(step)
        assert lrs["head"] == pytest.approx(1.0)
        want = 0.1 * step / 4 if step < 4 else 0.1 * (1 - (step - 4) / 16)
        assert lrs["default"] == pytest.approx(want, rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------------------------------ param table
def test_layerwise_lr_decay_multipliers_on_bert_tree():
    opt = build(ocfg(layer_lr_decay=0.5, lr=1.0, name="sgd", momentum=0.0, weight_decay=0.0))
    t = opt.table
    assert t["classifier/kernel"].lr_mult == 1.0 and t["classifier/kernel"].depth == 5
    assert t["bert/pooler/dense/kernel"].lr_mult == 1.0
    for i in range(4):
        row = t[f"bert/encoder/layer/{i}/attention/self/query/kernel"]
        assert (row.depth, row.lr_mult) == (i + 1, 0.5 ** (4 - i))
        assert t[f"bert/encoder/layer/{i}/attention/output/LayerNorm/scale"].lr_mult == 0.5 ** (4 - i)
    assert t["bert/embeddings/word_embeddings/embedding"].depth == 0
    assert t["bert/embeddings/word_embeddings/embedding"].lr_mult == 0.5**5
    assert t["bert/embeddings/LayerNorm/scale"].lr_mult == 0.5**5
    # The chain reads the table: with sgd, lr 1 and unit gradients the update is -lr_mult.
    params = bert_params()
    updates = one_update(opt, jax.tree.map(jnp.ones_like, params), params)
    for path, u in updates.items():
        np.testing.assert_allclose(u, -t[path].lr_mult, rtol=1e-6)


def test_group_lr_mult_multiplies_llrd():
    groups = (("classifier/.*", {"lr_mult": 10.0}),)
    opt = build(ocfg(layer_lr_decay=0.5, groups=groups))
    assert opt.table["classifier/kernel"].group == "group0"
    assert opt.table["classifier/kernel"].lr_mult == 10.0
    assert opt.table["bert/encoder/layer/3/intermediate/dense/kernel"].lr_mult == 0.5


def test_decay_mask_on_bert_tree():
    opt = build(ocfg(weight_decay=0.1))
    decays = {p for p, r in opt.table.items() if r.decay}
    for path in opt.table:
        excluded = path.endswith(("/bias", "/scale"))
        assert (path in decays) == (not excluded), path
    assert "bert/embeddings/word_embeddings/embedding" in decays
    no_emb = build(ocfg(weight_decay=0.1, decay_embeddings=False))
    assert not no_emb.table["bert/embeddings/word_embeddings/embedding"].decay
    assert no_emb.table["bert/encoder/layer/0/attention/self/query/kernel"].decay
    grouped = build(ocfg(weight_decay=0.1, groups=(("classifier/.*", {"weight_decay": 0.0}),)))
    assert not grouped.table["classifier/kernel"].decay
    assert grouped.table["bert/pooler/dense/kernel"].weight_decay == 0.1


def test_decoupled_decay_is_scaled_by_the_group_lr():
    groups = (("classifier/.*", {"lr_mult": 3.0}),)
    opt = build(ocfg(name="sgd", momentum=0.0, lr=0.5, weight_decay=0.1, groups=groups))
    params = bert_params()
    flat = params_lib.flatten(params)
    updates = one_update(opt, jax.tree.map(jnp.zeros_like, params), params)
    np.testing.assert_allclose(
        updates["classifier/kernel"], -0.5 * 3.0 * 0.1 * flat["classifier/kernel"], rtol=1e-6
    )
    path = "bert/encoder/layer/2/attention/self/query/kernel"
    np.testing.assert_allclose(updates[path], -0.5 * 0.1 * flat[path], rtol=1e-6)
    assert not np.any(updates["classifier/bias"]) and not np.any(updates["bert/embeddings/LayerNorm/scale"])


def test_l2sp_pulls_toward_pretrained_weights_kept_in_state():
    params = bert_params()
    moved = jax.tree.map(lambda x: x + 1.0, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    path = "bert/encoder/layer/1/intermediate/dense/kernel"
    p0, p1 = params_lib.flatten(params)[path], params_lib.flatten(moved)[path]
    l2sp = build(ocfg(name="sgd", momentum=0.0, lr=0.1, weight_decay=0.5, decay_toward="pretrained"))
    state = l2sp.tx.init(params)  # the anchor: the pre-trained values
    update = jax.jit(l2sp.tx.update)
    u, _ = update(zeros, state, moved)
    np.testing.assert_allclose(params_lib.flatten(u)[path], -0.05 * (p1 - p0), rtol=1e-5)
    after = p1 + params_lib.flatten(u)[path]
    assert np.abs(after - p0).max() < np.abs(p1 - p0).max()
    # The anchor is read from the state, not baked into the compiled update: a zero anchor decays to zero.
    anchored_at_zero = l2sp.tx.init(zeros)
    u0, _ = update(zeros, anchored_at_zero, moved)
    np.testing.assert_allclose(params_lib.flatten(u0)[path], -0.05 * p1, rtol=1e-5)
    # Trainable params only: the anchor costs one copy of what trains.
    frozen = build(ocfg(name="sgd", momentum=0.0, decay_toward="pretrained", train_only="classifier/.*"))
    assert params_lib.nbytes(frozen.tx.init(params)) == params_lib.nbytes(params["classifier"])


def test_clip_is_global_norm_over_the_whole_tree_and_ignores_frozen_zeros():
    params = bert_params()
    opt = build(ocfg(name="sgd", momentum=0.0, lr=1.0, weight_decay=0.0, clip_norm=1.0))
    grads = jax.tree.map(lambda x: jnp.full_like(x, 3.0), params)
    norm = float(optax.tree.norm(grads))
    updates = one_update(opt, grads, params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-5)
    for u in updates.values():
        np.testing.assert_allclose(u, -3.0 / norm, rtol=1e-5)
    frozen = build(
        ocfg(
            name="sgd", momentum=0.0, lr=1.0, weight_decay=0.0, clip_norm=1.0, freeze_layers="embeddings,0-2"
        )
    )
    fgrads = params_lib.map_with_path(
        lambda p, g: g if frozen.table[p].trainable_at(0) else jnp.zeros_like(g), grads
    )
    fupdates = one_update(frozen, fgrads, params)
    trainable_norm = float(optax.tree.norm(fgrads))
    assert trainable_norm < norm
    for path, u in fupdates.items():
        want = -3.0 / trainable_norm if frozen.table[path].trainable_at(0) else 0.0
        np.testing.assert_allclose(u, want, rtol=1e-5)


# ------------------------------------------------------------------------------------------ freezing
def _state_arrays(state):
    leaves = jax.tree.leaves(state)
    return [x for x in leaves if x.ndim > 0], sum(x.nbytes for x in leaves if x.ndim > 0)


def test_frozen_params_stay_bit_identical_and_get_no_optimizer_state():
    params = bert_params(num_layers=3)
    opt = build(ocfg(lr=0.05, freeze_layers="embeddings,0", clip_norm=1.0), params)
    free = build(ocfg(lr=0.05, clip_norm=1.0), params)
    history, state = train(opt, params, 3)
    before, after = params_lib.flatten(params), params_lib.flatten(history[-1])
    frozen = {p for p, r in opt.table.items() if r.frozen}
    assert frozen == {p for p in before if p.startswith("bert/embeddings/") or "/layer/0/" in p}
    for path in before:
        same = leaf_bytes(before[path]) == leaf_bytes(after[path])
        assert same == (path in frozen), path
    # Adam keeps mu and nu for trainable params only: 2 x their bytes, nothing for the frozen ones.
    trainable_bytes = sum(before[p].nbytes for p in before if p not in frozen)
    arrays, nbytes = _state_arrays(state)
    _, free_bytes = _state_arrays(free.tx.init(params))
    assert nbytes == 2 * trainable_bytes
    assert free_bytes == 2 * params_lib.nbytes(params) > nbytes
    assert len(arrays) == 2 * (len(before) - len(frozen))
    assert jax.tree.leaves(state[1].inner_states[optim.FROZEN]) == []


def test_train_only_head_uses_the_models_head_pattern():
    opt = build(ocfg(train_only="head"))
    assert opt.trainable_at(0) == {
        "classifier/kernel",
        "classifier/bias",
        "bert/pooler/dense/kernel",
        "bert/pooler/dense/bias",
    }
    regex = build(ocfg(train_only="classifier/.*"))
    assert regex.trainable_at(0) == {"classifier/kernel", "classifier/bias"}


def test_frozen_group_and_freeze_regex():
    opt = build(ocfg(groups=(("bert/pooler/.*", {"frozen": True}),), freeze=(r".*/layer/3/.*",)))
    frozen = {p for p, r in opt.table.items() if r.frozen}
    assert frozen == {p for p in opt.table if p.startswith("bert/pooler/") or "/layer/3/" in p}
    assert opt.trainable_at(0) == frozenset(opt.table) - frozen


def test_gradual_unfreezing_timeline_and_fresh_state():
    params = bert_params(num_layers=2)
    layer1 = "bert/encoder/layer/1/"
    o = ocfg(lr=0.05, train_only="classifier/.*", unfreeze=((3, layer1 + ".*"),))
    opt = build(o, params, total_steps=10)
    assert opt.phase_starts == (0, 3)
    assert not any(p.startswith(layer1) for p in opt.trainable_at(2))
    assert {p for p in opt.trainable_at(3)} == {p for p in opt.table if p.startswith((layer1, "classifier"))}
    history, state = train(opt, params, 3, loss=separable_loss)
    # Before step 3: layer 1 untouched, and its (gated) optimizer state still equals a fresh init.
    p0 = params_lib.flatten(params)
    for s in range(3):
        flat = params_lib.flatten(history[s])
        assert all(leaf_bytes(flat[p]) == leaf_bytes(p0[p]) for p in p0 if p.startswith(layer1))
        assert any(leaf_bytes(flat[p]) != leaf_bytes(p0[p]) for p in p0 if p.startswith("classifier"))
    fresh = opt.tx.init(params)
    gated = [k for k in state[1].inner_states if k.endswith("_from3")]
    assert gated
    for k in gated:
        inner_now, inner_fresh = state[1].inner_states[k].inner_state, fresh[1].inner_states[k].inner_state
        assert int(inner_now.count) == 3  # the gate counted the steps
        for a, b in zip(jax.tree.leaves(inner_now.inner), jax.tree.leaves(inner_fresh.inner)):
            assert leaf_bytes(a) == leaf_bytes(b)
    # From step 3: layer 1 trains exactly like a separately built optimizer started at step 3.
    later, _ = train(opt, history[-1], 3, start=3, state=state, loss=separable_loss)
    other = build(ocfg(lr=0.05, train_only="classifier/.*|" + layer1 + ".*"), params, total_steps=10)
    ref, _ = train(other, history[-1], 3, loss=separable_loss)
    for s in range(3):
        got, want = params_lib.flatten(later[s]), params_lib.flatten(ref[s])
        for p in got:
            if p.startswith(layer1):
                assert leaf_bytes(got[p]) != leaf_bytes(p0[p])
                np.testing.assert_allclose(got[p], want[p], rtol=1e-6, atol=1e-7)


def test_unfrozen_params_follow_the_global_schedule():
    params = bert_params(num_layers=2)
    o = ocfg(
        name="sgd",
        momentum=0.0,
        lr=1.0,
        weight_decay=0.0,
        schedule={"type": "warmup_linear", "warmup": 4},
        freeze_layers="0",
        unfreeze=(("1ep", r".*/layer/0/.*"),),
    )
    opt = build(o, params, total_steps=10, steps_per_epoch=6)
    assert opt.phase_starts == (0, 6)
    history, _ = train(opt, params, 7, loss=separable_loss)
    path = "bert/encoder/layer/0/intermediate/dense/kernel"
    before, at6 = params_lib.flatten(history[5])[path], params_lib.flatten(history[6])[path]
    assert leaf_bytes(before) == leaf_bytes(params_lib.flatten(params)[path])
    # The first update after unfreezing uses the run's LR at step 6, not the schedule's start (0 in warmup).
    lr6 = opt.lr_at(6)["default"]
    assert lr6 == pytest.approx(1 - 2 / 6, rel=1e-5)
    grad = params_lib.flatten(jax.jit(jax.grad(separable_loss))(history[5]))[path]
    np.testing.assert_allclose(at6 - before, -lr6 * grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd", "lion"])
def test_each_optimizer_trains_and_respects_freezing(name):
    params = bert_params(num_layers=2)
    o = ocfg(
        name=name,
        lr=0.05 if name != "lion" else 0.005,
        nesterov=True,
        freeze_layers="embeddings",
        clip_norm=1.0,
    )
    opt = build(o, params)
    history, _ = train(opt, params, 4)
    loss = jax.jit(model_loss)
    assert float(loss(history[-1])) < float(loss(params))
    emb = "bert/embeddings/word_embeddings/embedding"
    assert leaf_bytes(params_lib.flatten(history[-1])[emb]) == leaf_bytes(params_lib.flatten(params)[emb])


def test_describe_and_plot_lr(tmp_path):
    groups = (("classifier/.*", {"name": "head", "lr_mult": 10.0}),)
    opt = build(ocfg(groups=groups, train_only="head", unfreeze=((5, r".*/layer/3/.*"),), layer_lr_decay=0.8))
    text = optimizer_report.describe(opt)
    total = params_lib.count(bert_params())
    head = sum(r.size for r in opt.table.values() if r.trainable_at(0))
    assert "group head: 2 tensors" in text and "group default:" in text
    assert f"trainable at step 0: {head:,} ({100 * head / total:.1f}%)" in text
    assert "unfreezing at step 5" in text and "frozen" in text and "from step 5" in text
    png = tmp_path / "plots" / "lr.png"
    optimizer_report.plot_lr(opt, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ validation
def _raises(field, **kwargs):
    build_kwargs = {
        k: kwargs.pop(k) for k in ("total_steps", "steps_per_epoch", "head_pattern") if k in kwargs
    }
    with pytest.raises(ConfigError) as err:
        build(ocfg(**kwargs), **build_kwargs)
    assert field in str(err.value), str(err.value)
    return str(err.value)


def test_freeze_regex_matching_nothing_names_field_and_examples():
    msg = _raises("optim.freeze[1]", freeze=(r".*pooler.*", r"encoder/layers/.*"))
    assert "bert/embeddings/" in msg  # example param paths


def test_decay_exclude_matching_nothing():
    _raises("optim.decay_exclude", decay_exclude=r".*/beta")


def test_group_regex_matching_nothing():
    _raises("optim.groups[0][0]", groups=(("head/.*", {"lr_mult": 2.0}),))


def test_group_shadowed_by_earlier_group():
    _raises("optim.groups[1][0]", groups=(("classifier/.*", {}), ("classifier/kernel", {})))


def test_unfreeze_regex_matching_nothing():
    _raises("optim.unfreeze[0][1]", freeze=(".*layer.*",), unfreeze=((2, "encoder/blocks/.*"),))


def test_unfreeze_regex_matching_no_frozen_param():
    _raises("optim.unfreeze[0][1]", freeze=(".*/layer/0/.*",), unfreeze=((2, "classifier/.*"),))


def test_unfreeze_step_beyond_the_run():
    _raises("optim.unfreeze[0][0]", freeze=(".*layer.*",), unfreeze=((20, ".*layer.*"),), total_steps=20)
    _raises("optim.unfreeze[0][0]", freeze=(".*layer.*",), unfreeze=(("5ep", ".*layer.*"),), total_steps=20)


def test_train_only_regex_matching_nothing():
    _raises("optim.train_only", train_only="head/.*")


def test_train_only_head_without_head_pattern():
    _raises("optim.train_only", train_only="head", head_pattern=None)


def test_freeze_layers_naming_missing_layer():
    msg = _raises("optim.freeze_layers", freeze_layers="embeddings,0-5")
    assert "[4, 5]" in msg and "0-3" in msg


def test_warmup_longer_than_the_run():
    _raises("optim.schedule.warmup", schedule={"type": "warmup_linear", "warmup": "5ep"}, total_steps=20)
    _raises("optim.schedule.warmup", schedule={"type": "warmup_cosine", "warmup": 20}, total_steps=20)


def test_group_schedule_checked_against_the_run():
    groups = (("classifier/.*", {"schedule": {"type": "warmup_constant", "warmup": 30}}),)
    _raises("optim.groups[0].schedule.warmup", groups=groups, total_steps=20)


def test_wsd_warmup_plus_decay_longer_than_the_run():
    _raises("optim.schedule.decay", schedule={"type": "wsd", "warmup": 0.2, "decay": 0.9})


def test_step_schedule_needs_an_interval():
    _raises("optim.schedule.decay", schedule={"type": "step", "decay": 0})


def test_layer_lr_decay_without_layers():
    params = {"encoder": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}}
    with pytest.raises(ConfigError, match=r"optim\.layer_lr_decay"):
        optim.build(ocfg(layer_lr_decay=0.9), params, total_steps=10, steps_per_epoch=2)


def test_everything_frozen():
    _raises("optim.freeze", freeze=(".*",))


def test_total_steps_must_be_positive():
    _raises("train.steps", total_steps=0)


def test_build_checks_config_values_by_the_declaration():
    # The same ConfigError validate() raises, without a copy of the check in ftjax.optim.
    msg = _raises("optim.name", name="adam")
    assert msg.startswith("config.optim.name='adam' is invalid: one of (")
    _raises("optim.groups[0].name", groups=(("classifier/.*", {"name": "frozen"}),))
    _raises("optim.groups[0].weight_decay", groups=(("classifier/.*", {"weight_decay": -1.0}),))
    _raises("optim.unfreeze[0]", freeze=(".*layer.*",), unfreeze=((2, ".*", "extra"),))
    with pytest.raises(ConfigError, match=r"optim\.schedule\.foo|unknown keys \['foo'\]"):
        schedules.make_schedule({"type": "constant", "foo": 1}, P, T, SPE)


def test_group_left_out_keys_take_the_declared_defaults():
    opt = build(ocfg(weight_decay=0.05, groups=(("classifier/.*", {}),)))
    row = opt.table["classifier/kernel"]
    assert (row.group, row.lr_mult, row.weight_decay, row.frozen) == ("group0", 1.0, 0.05, False)
    assert opt.schedule_args["group0"] == opt.schedule_args["default"]
