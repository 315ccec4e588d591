"""Generation-based evaluation of a seq2seq run: at each validation eval, each member's current params
generate from the first data.seq2seq.eval_examples validation sources (greedy, or beam search with
data.seq2seq.num_beams), the outputs are scored against the references (sacreBLEU, chrF, ROUGE-1/2/L F1;
all x100) and the scores join that eval's validation results, so the logger, early stopping
(train.early_stop.metric="bleu", mode="max"), the best checkpoint and sweeps see them. The generations are
written to MEMBER_DIR/samples/step_<step>.jsonl ({"step", "source", "reference", "generation"}).

It must come before the callbacks that read the results (ftjax.trainer.standard_callbacks puts it right
after Evaluate). Scoring needs the `seq2seq` extra: pip install 'ftjax[seq2seq]' (sacrebleu, rouge-score).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from ftjax import fileio
from ftjax import params as params_lib
from ftjax import workdir as workdir_lib
from ftjax.generate import generate_seq2seq_ids
from ftjax.loop import Callback, Loop

ROUGE = ("rouge1", "rouge2", "rougeL")


def check_scorers(metrics: Sequence[str]) -> None:
    """Imports the libraries `metrics` need, or raises ImportError naming the extra to install."""
    needed = (["sacrebleu"] if {"bleu", "chrf"} & set(metrics) else []) + (
        ["rouge_score"] if set(ROUGE) & set(metrics) else [])
    for module in needed:
        try:
            __import__(module)
        except ImportError as e:
            raise ImportError(f"data.seq2seq.metrics={tuple(metrics)} needs {module}: "
                              "pip install 'ftjax[seq2seq]' (sacrebleu, rouge-score)") from e


def score(hypotheses: list[str], references: list[str], metrics: Sequence[str]) -> dict[str, float]:
    """Corpus scores of the generations, x100: sacreBLEU's BLEU (13a tokenisation) and chrF, and the mean
    ROUGE-1/2/L F-measure (rouge-score, with stemming; English-oriented tokenisation)."""
    out: dict[str, float] = {}
    if {"bleu", "chrf"} & set(metrics):
        import sacrebleu  # the seq2seq extra

        if "bleu" in metrics:
            out["bleu"] = float(sacrebleu.corpus_bleu(hypotheses, [references]).score)
        if "chrf" in metrics:
            out["chrf"] = float(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    keys = [m for m in ROUGE if m in metrics]
    if keys:
        from rouge_score import rouge_scorer  # the seq2seq extra

        scorer = rouge_scorer.RougeScorer(keys, use_stemmer=True)
        sums = dict.fromkeys(keys, 0.0)
        for hyp, ref in zip(hypotheses, references, strict=True):
            for key, value in scorer.score(ref, hyp).items():
                sums[key] += value.fmeasure
        out.update({k: 100.0 * v / max(1, len(hypotheses)) for k, v in sums.items()})
    return out


class Seq2SeqEval(Callback):
    """Adds the generation metrics to each validation eval's results (in place) and writes the samples."""

    def __init__(self, run: Any, member_dirs: list[str], data: Any, metrics: Sequence[str], *, num_beams: int = 1,
                 max_new_tokens: int = 32, batch: int = 32, enabled: bool = True):
        check_scorers(metrics)
        self.run, self.member_dirs, self.data = run, member_dirs, data  # run: graphdef, rest, tokenizer, mesh
        self.metrics, self.num_beams, self.max_new_tokens = tuple(metrics), int(num_beams), int(max_new_tokens)
        self.batch = max(1, min(int(batch), len(data.ids)))
        self.enabled = enabled

    @classmethod
    def for_run(cls, run: Any, member_dirs: list[str]) -> list[Callback]:
        """[the callback] for a seq2seq run with data.seq2seq.eval_examples > 0, else []."""
        s = run.cfg.data.seq2seq
        data = run.data.seq2seq_eval
        if run.cfg.model.task != "seq2seq" or not s.eval_examples or data is None or not data.ids:
            return []
        rows = max(1, run.data.eval_batch_size // jax.process_count() // s.num_beams)
        return [cls(run, member_dirs, data, s.metrics, num_beams=s.num_beams,
                    max_new_tokens=s.max_new_tokens or s.max_target_len, batch=rows, enabled=run.primary)]

    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None:
        if split != "validation":
            return
        with loop.timed("eval_seconds"):
            for k in np.flatnonzero(loop.active):
                results[int(k)].update(self.evaluate(int(k), loop.step, loop.stepper.params(int(k))))

    def evaluate(self, member: int, step: int, params: Any) -> dict[str, float]:
        """The generation metrics of `params` (NaN, with a warning, when generation fails: a NaN never counts
        as an improvement, and training goes on); writes the samples file."""
        try:
            generations = self.generate(params)
        except Exception as e:  # noqa: BLE001 (a failed generation is reported; the run goes on)
            logging.warning("seq2seq eval: generation failed at step %d (%s: %s); its metrics are NaN", step,
                            type(e).__name__, e)
            return dict.fromkeys(self.metrics, math.nan)
        scores = score(generations, self.data.references, self.metrics)
        logging.info("seq2seq eval at step %d (%d examples): %s", step, len(generations),
                     {k: round(v, 2) for k, v in scores.items()})
        if self.enabled:
            path = workdir_lib.samples_file(self.member_dirs[member], step)
            fileio.write_text(path, "".join(
                json.dumps({"step": step, "source": s, "reference": r, "generation": g}) + "\n"
                for s, r, g in zip(self.data.sources, self.data.references, generations)))
        return scores

    def generate(self, params: Any) -> list[str]:
        """Outputs for every eval source, in order: sources sorted by length, batched `batch` rows (the last
        batch filled with copies), each batch padded to the smallest bucket source length that holds it."""
        run, ids = self.run, self.data.ids
        model = params_lib.merge(run.graphdef, params, run.rest)
        pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
        order = np.argsort([len(x) for x in ids], kind="stable")
        out: list[str] = [""] * len(ids)
        for start in range(0, len(order), self.batch):
            chunk = order[start: start + self.batch]
            rows = np.concatenate([chunk, np.full(self.batch - len(chunk), chunk[0])])
            longest = max(1, max(len(ids[r]) for r in rows))
            width = next((w for w in self.data.source_lengths if w >= longest), longest)
            batch = np.full((len(rows), width), pad, np.int32)
            mask = np.zeros((len(rows), width), np.int32)
            for j, r in enumerate(rows):
                batch[j, : len(ids[r])], mask[j, : len(ids[r])] = ids[r], 1
                mask[j, 0] = 1  # an empty source still attends to one position
            with jax.set_mesh(run.mesh):
                tokens = generate_seq2seq_ids(model, batch, mask, self.max_new_tokens, num_beams=self.num_beams)
            for j, r in enumerate(chunk):
                out[r] = run.tokenizer.decode(tokens[j, 1:].tolist(), skip_special_tokens=True)
        return out
