"""Text generation with the decoder models (gpt2, llama, mistral, qwen2, qwen3): greedy or temperature/top-p
sampling under jit, with a KV cache filled by one prefill call and extended by a lax.while_loop, stopping at
eos. Prompts are left-padded and positions count real tokens only, as transformers' generate does; a longrope
model (Phi-3) is re-prefilled once where its sequence outgrows original_max_position_embeddings, as there.
Encoder-decoders (t5, bart, marian; task seq2seq): the encoder runs once, its cross-attention K/V are cached,
and the decoder runs greedy / sampling or transformers' beam search (`generate_seq2seq_ids`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.models import decoder

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this many tokens (fewer compilations).



def _checked_ids(input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """[batch, length] int32 ids and their mask (all ones when None), with clear errors for bad shapes."""
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    return ids, mask

def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _check_model(model: Any, seq2seq: bool = False) -> None:
    task = getattr(model, "task", None)
    if task == "seq2seq" and not seq2seq:
        raise ValueError("generate_ids is for decoder models; use generate_seq2seq_ids for an encoder-decoder")
    if (task != "causal_lm" and not (seq2seq and task == "seq2seq")) or not hasattr(model, "init_cache"):
        raise ValueError(f"generate needs a decoder model loaded with task='causal_lm' (gpt2, llama, mistral, "
                         f"qwen2, qwen3){' or an encoder-decoder with task=seq2seq (t5, bart, marian)' * seq2seq}; "
                         f"got family={getattr(model, 'family', None)!r} task={task!r}")


def _pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, greedy: bool) -> jax.Array:
    """Next token from [B, V] logits: argmax, or a sample after temperature and HF-style top-p filtering."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)  # ascending, as HF's TopPLogitsWarper.
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    removed = cumulative <= (1.0 - top_p)
    removed = removed.at[:, -1].set(False)  # always keep the most likely token.
    threshold = jnp.min(jnp.where(removed, jnp.inf, sorted_logits), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "eos"))
def _generate(graphdef, state, input_ids, prompt_mask, key, temperature, top_p, pad_id, finished, *,
              max_new_tokens: int, greedy: bool, eos: tuple[int, ...]):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    mask = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), prompt_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, cache_index=0,
                logits_to_keep=1)
    key, sub = jax.random.split(key)
    token = jnp.where(finished, pad_id, _pick(out["logits"][:, -1], sub, temperature, top_p, greedy))
    done = finished | jnp.isin(token, eos_arr)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    next_pos = positions[:, -1] + 1

    def cond(carry):
        i, _, _, done, _, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, tokens, pos, key = carry
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos[:, None], cache=cache,
                    cache_index=prompt_len + i - 1)
        key, sub = jax.random.split(key)
        nxt = _pick(out["logits"][:, -1], sub, temperature, top_p, greedy)
        nxt = jnp.where(done, pad_id, nxt)  # finished sequences are padded, as transformers does.
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i))
        return i + 1, nxt, out["cache"], done | jnp.isin(nxt, eos_arr), tokens, pos + 1, key

    carry = (jnp.int32(1), token, out["cache"], done, tokens, next_pos, key)
    steps, _, _, _, tokens, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, steps


def generate_ids(
    model: Any, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 32, temperature: float = 0.0,
    top_p: float = 1.0, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """Token-level generation. input_ids [B, P] (left-padded when attention_mask marks pads; right padding
    is not supported). Returns [B, P + n]: the prompts followed by n <= max_new_tokens new tokens, n
    stopping early when every sequence produced an eos; after its eos a sequence gets pad_token_id.
    eos_token_id / pad_token_id default to the model config's (pad falls back to the first eos)."""
    _check_model(model)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} (>= 0; 0 = greedy) or top_p={top_p} (in (0, 1]) is invalid")
    ids, mask = _checked_ids(input_ids, attention_mask)
    if (mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded (attention_mask ends with 0 for some row); pad on the left")
    cfg = model.hf_config
    eos = _eos_ids(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    finished = np.zeros(ids.shape[0], bool)
    switch, longest = decoder.longrope_switch(cfg), int(mask.sum(axis=1).max())
    if switch is not None and longest <= switch < longest + max_new_tokens - 1:
        # longrope (Phi-3): the first tokens come from the short factors; once the sequence outgrows
        # original_max_position_embeddings transformers runs it again whole (its cached keys had the short ones),
        # so does this: the rest is generated from the prompt and those tokens, re-prefilled with the long ones.
        short = switch + 1 - longest
        head = _generate_ids(model, ids, mask, short, temperature, top_p, seed, eos, pad_token_id, finished)
        new = head[:, ids.shape[1]:]
        if new.shape[1] < short:  # every row ended with an eos
            return head
        finished = np.isin(new, eos).any(axis=1)
        ids, mask = head, np.concatenate([mask, np.ones_like(new)], axis=1)
        max_new_tokens, seed = max_new_tokens - short, seed + 1
    return _generate_ids(model, ids, mask, max_new_tokens, temperature, top_p, seed, eos, pad_token_id, finished)


def _generate_ids(model: Any, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, temperature: float,
                  top_p: float, seed: int, eos: tuple[int, ...], pad_token_id: int, finished: np.ndarray) -> np.ndarray:
    """generate_ids from checked inputs; `finished` rows (an eos already made) get pad tokens only."""
    batch, length = ids.shape
    bucket = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
    padded = np.full((batch, bucket), pad_token_id, np.int32)
    padded_mask = np.zeros((batch, bucket), np.int32)
    padded[:, bucket - length:], padded_mask[:, bucket - length:] = ids, mask
    graphdef, state = nnx.split(model)
    greedy = temperature == 0.0
    tokens, steps = _generate(
        graphdef, state, jnp.asarray(padded), jnp.asarray(padded_mask), jax.random.PRNGKey(seed),
        jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p), jnp.int32(pad_token_id),
        jnp.asarray(finished), max_new_tokens=int(max_new_tokens), greedy=greedy, eos=eos,
    )
    new = np.asarray(tokens)[:, : int(steps)]
    return np.concatenate([ids, new], axis=1)


def generate(
    model: Any, tokenizer: Any, prompts: str | Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
    top_p: float = 1.0, seed: int = 0, num_beams: int = 1,
) -> str | list[str]:
    """Continuations of `prompts` (a string, or a list of them) decoded without special tokens: greedy when
    temperature is 0, else temperature / top-p sampling from `seed`. Stops at the model's eos token (or the
    tokenizer's when the config has none). An encoder-decoder (task seq2seq) returns its outputs for the
    prompts (the decoder's tokens), with beam search when num_beams > 1."""
    _check_model(model, seq2seq=True)
    if num_beams != 1 and model.task != "seq2seq":
        raise ValueError(f"num_beams={num_beams}: beam search is implemented for encoder-decoders (task seq2seq)")
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        raise ValueError("prompts is empty; pass a string or a non-empty list of strings")
    encoded = [list(tokenizer(t)["input_ids"]) for t in texts]
    if any(not e for e in encoded):
        raise ValueError("a prompt tokenized to no tokens; pass non-empty prompts")
    eos = model.hf_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = _eos_ids(eos)[0] if _eos_ids(eos) else 0
    length = max(len(e) for e in encoded)
    if model.task == "seq2seq":
        return _seq2seq_text(model, tokenizer, encoded, single, max_new_tokens, temperature, top_p, seed,
                             num_beams, pad)
    ids = np.full((len(texts), length), pad, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, e in enumerate(encoded):
        ids[row, length - len(e):], mask[row, length - len(e):] = e, 1
    out = generate_ids(model, ids, mask, max_new_tokens, temperature, top_p, seed, eos_token_id=eos,
                       pad_token_id=pad)
    decoded = [tokenizer.decode(row[length:].tolist(), skip_special_tokens=True) for row in out]
    return decoded[0] if single else decoded


def _seq2seq_text(model, tokenizer, encoded, single, max_new_tokens, temperature, top_p, seed, num_beams, pad):
    """generate() for an encoder-decoder: right-padded encoder inputs, outputs decoded after the start token."""
    length = max(len(e) for e in encoded)
    ids = np.full((len(encoded), length), pad, np.int32)
    mask = np.zeros((len(encoded), length), np.int32)
    for row, e in enumerate(encoded):
        ids[row, : len(e)], mask[row, : len(e)] = e, 1
    out = generate_seq2seq_ids(model, ids, mask, max_new_tokens, num_beams=num_beams, temperature=temperature,
                               top_p=top_p, seed=seed)
    decoded = [tokenizer.decode(row[1:].tolist(), skip_special_tokens=True) for row in out]
    return decoded[0] if single else decoded


# ----------------------------------------------------------------------------------------------------
# Encoder-decoders (task seq2seq): greedy / sampling and beam search as transformers' generate runs them.

FROM_CONFIG = "config"  # default of the seq2seq token settings: the model config's value (None: off).


@dataclasses.dataclass(frozen=True)
class Seq2SeqRules:
    """The static settings of one seq2seq decode (a jit static argument). max_len counts the decoder start
    token, as transformers' max_length does (= 1 + max_new_tokens)."""

    max_len: int
    start: int
    pad: int
    eos: tuple[int, ...] = ()
    forced_bos: int | None = None  # forced at the first generated position.
    forced_eos: tuple[int, ...] = ()  # forced at the last position (max_len - 1).
    banned: tuple[int, ...] = ()  # single-token bad_words_ids: never generated.
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as transformers.
    greedy: bool = True


def _force(scores: jax.Array, ids: tuple[int, ...], when: jax.Array) -> jax.Array:
    forced = jnp.full_like(scores, -jnp.inf).at[:, jnp.asarray(ids)].set(0.0)
    return jnp.where(when, forced, scores)


def _process(scores: jax.Array, cur_len: jax.Array, rules: Seq2SeqRules) -> jax.Array:
    """transformers' logits processors in its order: bad words, then forced BOS (when cur_len == 1) and forced
    EOS (when cur_len == max_len - 1); cur_len counts the decoder tokens so far, the start token included."""
    if rules.banned:
        scores = scores.at[:, jnp.asarray(rules.banned)].set(-jnp.inf)
    if rules.forced_bos is not None:
        scores = _force(scores, (rules.forced_bos,), cur_len == 1)
    if rules.forced_eos:
        scores = _force(scores, rules.forced_eos, cur_len == rules.max_len - 1)
    return scores


@functools.partial(jax.jit, static_argnames=("graphdef", "rules"))
def _seq2seq_sample(graphdef, state, input_ids, mask, key, temperature, top_p, *, rules: Seq2SeqRules):
    """Greedy or sampled decoding: [B, max_len] tokens (start first) and how many are filled."""
    model = nnx.merge(graphdef, state)
    batch = input_ids.shape[0]
    cache = model.init_cache(model.encode(input_ids, mask), rules.max_len)  # cross-attention K/V: once.
    eos_arr = jnp.asarray(rules.eos or (-1,), jnp.int32)
    tokens = jnp.full((batch, rules.max_len), rules.pad, jnp.int32).at[:, 0].set(rules.start)

    def cond(carry):
        i, _, done, _, _ = carry
        return (i < rules.max_len) & ~jnp.all(done)

    def body(carry):
        i, cache, done, tokens, key = carry  # i: decoder tokens so far (cur_len).
        last = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
        out = model.decode(last, None, mask, cache=cache, cache_index=i - 1)
        scores = _process(out["logits"][:, -1].astype(jnp.float32), i, rules)
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, rules.pad, _pick(scores, sub, temperature, top_p, rules.greedy))
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i))
        return i + 1, out["cache"], done | jnp.isin(nxt, eos_arr), tokens, key

    carry = (jnp.int32(1), cache, jnp.zeros((batch,), bool), tokens, key)
    steps, _, _, tokens, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, steps


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, N, ...] rows idx [B, M] along axis 1 -> [B, M, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_candidates(c: dict, scores: jax.Array, rules: Seq2SeqRules, eos_arr: jax.Array) -> dict:
    """transformers' _get_top_k_continuations: the best (1 + max(1, #eos)) * beams continuations of all beams
    by accumulated log-probability, and which of them hit a stopping criterion (eos or max length)."""
    batch, beams, length = c["running"].shape
    vocab = scores.shape[-1]
    total = (scores.reshape(batch, beams, vocab) + c["running_scores"][:, :, None]).reshape(batch, beams * vocab)
    keep = max(2, 1 + len(rules.eos)) * beams
    top_lp, top_idx = jax.lax.top_k(total, keep)
    src, tok = top_idx // vocab, top_idx % vocab
    seqs = jnp.where(jnp.arange(length) == c["cur"], tok[:, :, None], _gather(c["running"], src))
    hits = jnp.isin(tok, eos_arr) | (c["cur"] + 1 >= rules.max_len)
    return {"lp": top_lp, "src": src, "seqs": seqs, "hits": hits}


def _beam_update(c: dict, cand: dict, rules: Seq2SeqRules, penalty: jax.Array) -> dict:
    """transformers' _get_running_beams_for_next_iteration and _update_finished_beams (same -1e9 masks)."""
    beams = rules.num_beams
    run_lp = cand["lp"] + cand["hits"].astype(jnp.float32) * -1.0e9
    nxt = jax.lax.top_k(run_lp, beams)[1]
    new = dict(c, running=_gather(cand["seqs"], nxt), running_scores=_gather(run_lp, nxt),
               running_src=_gather(cand["src"], nxt))
    just = cand["hits"] & (jnp.arange(cand["lp"].shape[1]) < beams)[None, :]
    fin_lp = cand["lp"] / penalty[c["cur"]]
    full = jnp.all(c["finished"], axis=-1, keepdims=True) & (rules.early_stopping is True)
    fin_lp = fin_lp + full.astype(jnp.float32) * -1.0e9
    fin_lp = fin_lp + (~c["unsat"]).astype(jnp.float32) * -1.0e9
    fin_lp = fin_lp + (~just).astype(jnp.float32) * -1.0e9
    merged = {
        "seqs": jnp.concatenate([c["seqs"], cand["seqs"]], axis=1),
        "scores": jnp.concatenate([c["scores"], fin_lp], axis=1),
        "finished": jnp.concatenate([c["finished"], just], axis=1),
        "lengths": jnp.concatenate([c["lengths"], jnp.where(just, c["cur"], 0)], axis=1),
    }
    best = jax.lax.top_k(merged["scores"], beams)[1]
    new.update({k: _gather(v, best) for k, v in merged.items()})
    return new


def _beam_stop(c: dict, rules: Seq2SeqRules, penalty: jax.Array, hits: jax.Array) -> dict:
    """transformers' _check_early_stop_heuristic and _beam_search_has_unfinished_sequences (cur_len already
    advanced): can a running beam still beat the worst finished one?"""
    if rules.early_stopping == "never" and rules.length_penalty > 0.0:
        best_len = rules.max_len - 1
    else:
        best_len = c["cur"] - 1
    best_running = c["running_scores"][:, :1] / penalty[best_len]
    worst = jnp.where(c["finished"], jnp.min(c["scores"], axis=1, keepdims=True), -1.0e9)
    unsat = c["unsat"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
    open_beam = ~(jnp.all(c["finished"]) & (rules.early_stopping is True))
    return dict(c, unsat=unsat, go=jnp.any(unsat) & open_beam & ~jnp.all(hits))


@functools.partial(jax.jit, static_argnames=("graphdef", "rules"))
def _seq2seq_beam(graphdef, state, input_ids, mask, *, rules: Seq2SeqRules):
    """transformers' (vectorised) beam search: the best finished hypothesis per row [B, max_len] and its
    number of generated tokens [B]. The cache rows follow their beams; the cross-attention K/V are per row."""
    model = nnx.merge(graphdef, state)
    batch, beams, length = input_ids.shape[0], rules.num_beams, rules.max_len
    mask = jnp.repeat(mask, beams, axis=0)
    cache = model.init_cache(jnp.repeat(model.encode(input_ids, mask[::beams]), beams, axis=0), length)
    # Denominators n ** length_penalty computed in float64, then float32, as Python and torch do.
    penalty = jnp.asarray(np.array([float(max(n, 1)) ** rules.length_penalty for n in range(length + 1)],
                                   np.float32))
    eos_arr = jnp.asarray(rules.eos or (-1,), jnp.int32)
    fill = rules.pad or (rules.eos[0] if rules.eos else -1)  # transformers: pad_token_id or eos_token_id[0].
    seqs = jnp.full((batch, beams, length), fill, jnp.int32).at[:, :, 0].set(rules.start)
    c = {"cur": jnp.int32(1), "running": seqs, "seqs": seqs, "cache": cache, "go": jnp.bool_(True),
         "running_scores": jnp.zeros((batch, beams)).at[:, 1:].set(-1.0e9),
         "scores": jnp.full((batch, beams), -1.0e9), "finished": jnp.zeros((batch, beams), bool),
         "lengths": jnp.zeros((batch, beams), jnp.int32), "unsat": jnp.ones((batch, 1), bool),
         "running_src": jnp.zeros((batch, beams), jnp.int32)}

    def body(c):
        last = jax.lax.dynamic_index_in_dim(c["running"], c["cur"] - 1, axis=2, keepdims=False)
        out = model.decode(last.reshape(-1, 1), None, mask, cache=c["cache"], cache_index=c["cur"] - 1)
        scores = _process(jax.nn.log_softmax(out["logits"][:, -1].astype(jnp.float32), axis=-1), c["cur"], rules)
        cand = _beam_candidates(c, scores, rules, eos_arr)
        c = _beam_update(c, cand, rules, penalty)
        rows = (c["running_src"] + jnp.arange(batch)[:, None] * beams).reshape(-1)
        c["cache"] = [dict(lc, k=lc["k"][rows], v=lc["v"][rows]) for lc in out["cache"]]
        c["cur"] = c["cur"] + 1
        return _beam_stop(c, rules, penalty, cand["hits"])

    c = jax.lax.while_loop(lambda c: c["go"], body, c)
    return c["seqs"][:, 0], c["lengths"][:, 0]


def _token_setting(value: Any, cfg: Any, name: str) -> Any:
    return getattr(cfg, name, None) if isinstance(value, str) and value == FROM_CONFIG else value


def seq2seq_rules(model: Any, max_new_tokens: int, num_beams: int = 1, length_penalty: float = 1.0,
                  early_stopping: bool | str = False, greedy: bool = True, eos_token_id: Any = None,
                  pad_token_id: int | None = None, decoder_start_token_id: int | None = None,
                  forced_bos_token_id: Any = FROM_CONFIG, forced_eos_token_id: Any = FROM_CONFIG,
                  bad_words_ids: Any = FROM_CONFIG) -> Seq2SeqRules:
    """The checked settings of `generate_seq2seq_ids` (token ids default to the model config's)."""
    if max_new_tokens < 1 or num_beams < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and num_beams={num_beams} must be >= 1")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r} is invalid: True, False or 'never'")
    if num_beams > 1 and not greedy:
        raise ValueError("beam search with sampling (temperature > 0) is not supported; use num_beams=1")
    cfg = model.hf_config
    eos = _eos_ids(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    start = decoder_start_token_id if decoder_start_token_id is not None else cfg.decoder_start_token_id
    if start is None:
        raise ValueError("config.json has no decoder_start_token_id; pass decoder_start_token_id")
    bad = _token_setting(bad_words_ids, cfg, "bad_words_ids") or ()
    if any(len(b) != 1 for b in bad):
        raise ValueError(f"bad_words_ids={bad!r}: only single-token entries are supported (e.g. [[pad_id]])")
    forced_bos = _token_setting(forced_bos_token_id, cfg, "forced_bos_token_id")
    return Seq2SeqRules(
        max_len=1 + int(max_new_tokens), start=int(start), pad=int(pad), eos=eos,
        forced_bos=None if forced_bos is None else int(forced_bos),
        forced_eos=_eos_ids(_token_setting(forced_eos_token_id, cfg, "forced_eos_token_id")),
        banned=tuple(int(b[0]) for b in bad), num_beams=int(num_beams), length_penalty=float(length_penalty),
        early_stopping=early_stopping, greedy=greedy)


def generate_seq2seq_ids(
    model: Any, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 32, num_beams: int = 1,
    length_penalty: float = 1.0, early_stopping: bool | str = False, temperature: float = 0.0, top_p: float = 1.0,
    seed: int = 0, **tokens: Any,
) -> np.ndarray:
    """Decoder token ids [B, 1 + n] (the decoder start token, then n <= max_new_tokens new tokens) for encoder
    inputs input_ids [B, S] (attention_mask 0 = padding, either side), as transformers' generate returns them:
    greedy (num_beams=1, temperature 0), sampling (temperature / top_p) or beam search (num_beams > 1; scores
    sum_logprobs / len ** length_penalty; early_stopping True / False / "never"). Finished rows are padded.
    tokens: eos_token_id, pad_token_id, decoder_start_token_id (default: the config's), forced_bos_token_id,
    forced_eos_token_id, bad_words_ids (single tokens; default: the config's, None disables). Not supported:
    no_repeat_ngram_size, min_length, repetition_penalty (set them off on transformers' side to compare)."""
    _check_model(model, seq2seq=True)
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} (>= 0; 0 = greedy) or top_p={top_p} (in (0, 1]) is invalid")
    rules = seq2seq_rules(model, max_new_tokens, num_beams, length_penalty, early_stopping,
                          greedy=temperature == 0.0, **tokens)
    ids, mask = _checked_ids(input_ids, attention_mask)
    bucket = -(-ids.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET  # right-padded: masked keys change nothing.
    ids = np.pad(ids, ((0, 0), (0, bucket - ids.shape[1])), constant_values=rules.pad)
    mask = np.pad(mask, ((0, 0), (0, bucket - mask.shape[1])))
    graphdef, state = nnx.split(model)
    if num_beams > 1:
        tokens_out, lengths = _seq2seq_beam(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), rules=rules)
        return np.asarray(tokens_out)[:, : 1 + int(np.max(np.asarray(lengths)))]
    tokens_out, steps = _seq2seq_sample(
        graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(seed),
        jnp.float32(temperature if temperature else 1.0), jnp.float32(top_p), rules=rules)
    return np.asarray(tokens_out)[:, : int(steps)]
