"""The chunked LM loss (model.loss_chunk_tokens, ftjax.losses): equal to the loss from full logits in value and
gradients, for causal LMs (padding, packed rows) and seq2seq (label smoothing), and no [B, L, V] buffer in the step."""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import lora, losses, models, optim, tasks
from ftjax import params as params_lib
from ftjax import step as step_lib
from ftjax.config import default_config

VOCAB = 96


def llama(vocab: int = VOCAB, hidden: int = 32, scan: bool = False, tied: bool = False):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=0, tie_word_embeddings=tied)
    return models.from_config(cfg, task="causal_lm", seed=3, scan_layers=scan)


def seq2seq(kind: str):
    if kind == "t5":  # tied embedding with T5's d_model ** -0.5 scaling in the head
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=4,
                                    relative_attention_num_buckets=8, decoder_start_token_id=0)
    else:  # BART: tied embedding plus final_logits_bias
        cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=2,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                      decoder_ffn_dim=32, max_position_embeddings=64, init_std=0.5)
    return models.from_config(cfg, task="seq2seq", seed=3)


def causal_batch(rows: int = 3, length: int = 11, packed: bool = False, vocab: int = VOCAB) -> dict:
    rng = np.random.RandomState(0)
    ids = rng.randint(3, vocab, (rows, length)).astype(np.int32)
    batch = {"input_ids": ids, "labels": ids.copy(), "weights": np.array([1.0] * (rows - 1) + [0.5], np.float32)}
    if packed:  # three documents in row 0, two in row 1, padding (segment 0) at the ends
        seg = np.zeros((rows, length), np.int32)
        seg[0, :4], seg[0, 4:8], seg[0, 8:] = 1, 2, 3
        seg[1, :6], seg[1, 6:9] = 1, 2
        seg[2:, :length - 2] = 1
        batch["segment_ids"] = seg
        batch["labels"] = np.where(seg > 0, ids, -100).astype(np.int32)
    else:
        mask = np.ones((rows, length), np.int32)
        mask[1, length - 4:] = 0
        batch["attention_mask"] = mask
        batch["labels"] = np.where(mask > 0, ids, -100).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def seq2seq_batch(rows: int = 2, source: int = 7, target: int = 9) -> dict:
    rng = np.random.RandomState(1)
    ids = rng.randint(3, VOCAB, (rows, source)).astype(np.int32)
    labels = rng.randint(3, VOCAB, (rows, target)).astype(np.int32)
    labels[1, target - 3:] = -100
    dec = np.concatenate([np.zeros((rows, 1), np.int32), np.where(labels < 0, 0, labels)[:, :-1]], axis=1)
    return {k: jnp.asarray(v) for k, v in {
        "input_ids": ids, "attention_mask": np.ones_like(ids), "decoder_input_ids": dec,
        "decoder_attention_mask": (np.arange(target)[None] < np.array([[target], [target - 2]])).astype(np.int32),
        "labels": labels, "weights": np.array([1.0, 0.7], np.float32)}.items()}


def loss_and_grads(model, batch: dict, task: str, chunk: int, label_smoothing: float = 0.0):
    graphdef, params, rest = params_lib.split(model)

    def loss(p):
        loss_sum, weight, out = tasks.get(task).forward_loss(
            params_lib.merge(graphdef, p, rest), batch, deterministic=True, label_smoothing=label_smoothing,
            loss_chunk_tokens=chunk)
        assert ("lm_hidden" in out) == bool(chunk) and ("logits" in out) != bool(chunk)
        return loss_sum / weight

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), params_lib.flatten(jax.device_get(grads))


def assert_same(plain, chunked):
    assert chunked[0] == pytest.approx(plain[0], rel=1e-6)
    assert plain[1].keys() == chunked[1].keys()
    for path, g in plain[1].items():
        np.testing.assert_allclose(chunked[1][path], g, rtol=1e-5, atol=1e-7, err_msg=path)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("chunk", [3, 12, 33, 1000])  # 1 or 4 positions per chunk (11 = 2*4+3), whole, too big
def test_causal_lm_chunked_loss_and_gradients_equal_full_logits(packed, chunk):
    model, batch = llama(), causal_batch(packed=packed)
    assert_same(loss_and_grads(model, batch, "causal_lm", 0), loss_and_grads(model, batch, "causal_lm", chunk))


def test_tied_scanned_llama_chunked_gradients_reach_the_embedding():
    model, batch = llama(tied=True, scan=True), causal_batch()
    plain, chunked = loss_and_grads(model, batch, "causal_lm", 0), loss_and_grads(model, batch, "causal_lm", 6)
    assert_same(plain, chunked)
    assert np.abs(chunked[1]["model/embed_tokens/embedding"]).sum() > 0


def test_lora_on_the_lm_head_applies_in_the_chunked_head_with_its_dropout():
    batch = causal_batch()
    model = lora.apply_lora(llama(), {"rank": 2, "alpha": 4, "dropout": 0.0, "targets": "lm_head|.*q_proj"}, seed=1)
    plain, chunked = loss_and_grads(model, batch, "causal_lm", 0), loss_and_grads(model, batch, "causal_lm", 5)
    assert_same(plain, chunked)
    assert np.abs(chunked[1]["lm_head/lora_b"]).sum() > 0
    # The head runs after the model call: the adapter's dropout key must still reach it in a training call.
    model = lora.apply_lora(llama(), {"rank": 2, "alpha": 4, "dropout": 0.5, "targets": "lm_head"}, seed=1)
    b = jax.random.normal(jax.random.key(0), model.lm_head.lora_b.get_value().shape)
    model.lm_head.lora_b.set_value(b)  # (zeros at init: no delta for dropout to change)

    def loss(deterministic):
        loss_sum, _, out = tasks.get("causal_lm").forward_loss(model, batch, deterministic=deterministic,
                                                               rngs=nnx.Rngs(dropout=0), loss_chunk_tokens=5)
        assert "lm_hidden" in out
        return float(loss_sum)

    assert loss(False) != pytest.approx(loss(True), rel=1e-4)


@pytest.mark.parametrize("kind", ["t5", "bart"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_seq2seq_chunked_loss_and_gradients_equal_full_logits(kind, smoothing):
    model, batch = seq2seq(kind), seq2seq_batch()
    assert_same(loss_and_grads(model, batch, "seq2seq", 0, smoothing),
                loss_and_grads(model, batch, "seq2seq", 4, smoothing))  # 2 positions per chunk, 9 = 4*2+1


def test_chunked_token_loss_sum_rejects_a_zero_chunk():
    with pytest.raises(ValueError, match="model.loss_chunk_tokens"):
        losses.chunked_token_loss_sum(jnp.zeros((1, 2, 4)), lambda h: h, jnp.zeros((1, 2), jnp.int32),
                                      chunk_tokens=0)


def _temp_bytes(model, batch: dict, chunk: int) -> int:
    graphdef, params, rest = params_lib.split(model)

    def loss(p):
        return tasks.get("causal_lm").forward_loss(params_lib.merge(graphdef, p, rest), batch, deterministic=True,
                                                   loss_chunk_tokens=chunk)[0]

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_loss_never_holds_the_full_logits_at_a_large_vocabulary():
    """The observable proof: at vocab 65536, hidden 16, B*L = 2 x 256 the float32 logits alone are 128 MiB; the
    plain loss's compiled value_and_grad needs more temp memory than that (measured 2.1x: logits and their
    gradient); the chunked one (16 tokens: 2 MiB of logits per chunk) about 0.12x, mostly the head's gradient."""
    vocab = 65536
    model, batch = llama(vocab=vocab, hidden=16), causal_batch(rows=2, length=256, vocab=vocab)
    logits_bytes = 2 * 256 * vocab * 4
    plain, chunked = _temp_bytes(model, batch, 0), _temp_bytes(model, batch, 16)
    print(f"temp bytes: plain {plain:,}, chunked {chunked:,}, [B, L, V] float32 {logits_bytes:,}")
    assert plain > logits_bytes
    assert chunked < logits_bytes / 4


def test_train_step_with_chunked_loss_equals_the_plain_step():
    model = llama()
    graphdef, params, rest = params_lib.split(model)
    o = default_config().optim
    o.lr, o.schedule.type, o.schedule.warmup = 1e-2, "constant", 0
    opt = optim.build(o, params, total_steps=4, steps_per_epoch=4, stacks=model.stacks())
    batch = causal_batch(rows=4, packed=True)
    results = []
    for chunk in (0, 10):
        state = {"step": jnp.int32(0), "params": params, "opt_state": opt.tx.init(params)}
        step_cfg = step_lib.StepConfig("causal_lm", grad_accum=2, loss_chunk_tokens=chunk)
        fn = jax.jit(step_lib.make_train_step(graphdef, rest, opt.tx, opt.trainable_params_at(0), step_cfg))
        for _ in range(2):
            state, metrics = fn(state, batch, jax.random.key(0))
        evaluate = jax.jit(step_lib.make_eval_step(graphdef, rest, "causal_lm", chunk))
        ev = evaluate(state["params"], batch)
        results.append((float(metrics["loss"]), float(ev["loss_sum"] / ev["weight"]),
                        params_lib.flatten(jax.device_get(state["params"]))))
    (loss0, eval0, p0), (loss1, eval1, p1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-6) and eval1 == pytest.approx(eval0, rel=1e-5)
    for path, value in p0.items():
        np.testing.assert_allclose(p1[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
    assert not np.allclose(p0["lm_head/kernel"], params_lib.flatten(params)["lm_head/kernel"])  # it trained


def test_loss_chunk_tokens_is_a_checked_config_field_that_may_change_on_resume():
    from ftjax.config import ConfigError, validate
    from ftjax.workdir import CHANGEABLE

    cfg = default_config()
    assert cfg.model.loss_chunk_tokens == 0 and "model.loss_chunk_tokens" in CHANGEABLE
    cfg.model.name_or_path, cfg.model.task, cfg.data.source = "some/model", "causal_lm", "files:/data"
    validate(cfg)
    cfg.model.loss_chunk_tokens = -1
    with pytest.raises(ConfigError, match="model.loss_chunk_tokens"):
        validate(cfg)
