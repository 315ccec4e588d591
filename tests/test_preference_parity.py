"""ftjax.preference against TRL: the same tiny Llama's weights in torch and ftjax and the same batch give the same
DPO / IPO / hinge losses and reward metrics as TRL's DPOTrainer, and the same ORPO / SimPO losses as TRL's ORPO
and CPO trainers' own functions, within 1e-5."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ftjax import models, preference
from ftjax.preference import LogProbs, Objective
from tests.test_lm_data import tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = {
    "prompt": ["the cat sat on", "a dog ran to", "birds fly over"],
    "chosen": [" the warm mat", " the park", " the hills and the sea"],
    "rejected": [" a cold stone floor", " nowhere", " it"],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref_parity")
    return tiny_llama(str(root / "policy"), seed=0), tiny_llama(str(root / "reference"), seed=1)


def _trl_dpo(policy: str, reference: str, loss_type: str, tmp, label_smoothing: float = 0.0):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(policy)
    args = trl.DPOConfig(output_dir=str(tmp), beta=0.3, loss_type=[loss_type], report_to=[], use_cpu=True,
                         per_device_train_batch_size=3, max_length=64, label_smoothing=label_smoothing)
    trainer = trl.DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(policy),
                             ref_model=transformers.AutoModelForCausalLM.from_pretrained(reference), args=args,
                             train_dataset=datasets.Dataset.from_dict(PAIRS), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    # The reference's log-probs as plain transformers computes them (TRL's own reference forward differs from a
    # fresh load of the same folder by ~1e-5 relative in transformers 5.24 / TRL 1.16), given to TRL as precomputed.
    ref_logps, _, _ = _trl_logps(reference, {k: v.numpy() for k, v in batch.items()}, average=False)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_logps[:3], ref_logps[3:]
    trainer.precompute_ref_logps = True
    trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer._compute_loss(trainer.model, batch, False))
    metrics = {k: float(np.mean(v)) for k, v in trainer._metrics["eval"].items()}
    return loss, metrics, {k: v.numpy() for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _ours(folder: str, batch: dict) -> LogProbs:
    model = models.from_pretrained(folder, task="causal_lm")
    ids = jnp.asarray(batch["input_ids"])
    logits = model(input_ids=ids, attention_mask=jnp.asarray(batch["attention_mask"]))["logits"]
    return preference.response_logps(logits, preference.response_targets(ids, jnp.asarray(batch["completion_mask"])))


def _halves(lp: LogProbs) -> tuple[LogProbs, LogProbs]:
    n = lp.sum.shape[0] // 2
    return LogProbs(lp.sum[:n], lp.count[:n]), LogProbs(lp.sum[n:], lp.count[n:])


@pytest.mark.parametrize("loss,trl_name", [("dpo", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge")])
def test_reference_losses_and_reward_metrics_equal_trls_dpo_trainer(folders, tmp_path, loss, trl_name):
    policy, reference = folders
    trl_loss, trl_metrics, batch = _trl_dpo(policy, reference, trl_name, tmp_path)
    chosen, rejected = _halves(_ours(policy, batch))
    ref_chosen, ref_rejected = _halves(_ours(reference, batch))
    per_pair, metrics = preference.pair_losses(Objective(loss, beta=0.3), chosen, rejected, ref_chosen.sum,
                                               ref_rejected.sum)
    np.testing.assert_allclose(float(per_pair.mean()), trl_loss, rtol=1e-5, atol=1e-6)
    for ours, theirs in [("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                         ("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                         ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")]:
        np.testing.assert_allclose(float(metrics[ours].mean()), trl_metrics[theirs], rtol=1e-5, atol=1e-5)


def test_conservative_dpo_is_the_label_smoothed_sigmoid(folders):
    """cDPO: -(1 - e) log s(beta d) - e log s(-beta d); e = 0 is DPO, and the loss rises with e for a pair the
    policy already prefers."""
    chosen, rejected = LogProbs(jnp.array([-3.0]), jnp.array([2.0])), LogProbs(jnp.array([-6.0]), jnp.array([3.0]))
    ref = jnp.array([-4.0]), jnp.array([-4.0])
    d = 0.3 * ((-3.0 + 4.0) - (-6.0 + 4.0))
    for e in (0.0, 0.1, 0.3):
        loss, _ = preference.pair_losses(Objective("dpo", beta=0.3, label_smoothing=e), chosen, rejected, *ref)
        expected = -(1 - e) * np.log(1 / (1 + np.exp(-d))) - e * np.log(1 / (1 + np.exp(d)))
        np.testing.assert_allclose(float(loss[0]), expected, rtol=1e-6)


def _trl_logps(folder: str, batch: dict, average: bool):
    import transformers
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    labels = ids.masked_fill(torch.tensor(batch["completion_mask"]) == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average), logits, labels


def test_orpo_and_simpo_equal_trls_own_loss_functions(folders, tmp_path):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    policy, reference = folders
    _, _, batch = _trl_dpo(policy, reference, "sigmoid", tmp_path)
    avg, _, _ = _trl_logps(policy, batch, average=True)
    ours = _ours(policy, batch)
    np.testing.assert_allclose(np.asarray(ours.mean), avg.numpy(), rtol=1e-5, atol=1e-6)
    chosen, rejected = _halves(ours)
    fake = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device="cpu"))
    orpo_losses, orpo_chosen, orpo_rejected, _, _ = ORPOTrainer.odds_ratio_loss(fake, avg[:3], avg[3:])
    loss, metrics = preference.pair_losses(Objective("orpo", orpo_lambda=0.25), chosen, rejected)
    np.testing.assert_allclose(np.asarray(loss), -orpo_losses.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["rewards_chosen"]), orpo_chosen.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["rewards_rejected"]), orpo_rejected.numpy(), rtol=1e-5, atol=1e-6)
    # ORPO's NLL term: TRL's cross entropy over the chosen responses' tokens (a token mean over the batch)
    _, logits, labels = _trl_logps(policy, batch, average=False)
    shifted, targets = logits[:3, :-1].reshape(-1, logits.shape[-1]), labels[:3, 1:].reshape(-1)
    nll = torch.nn.functional.cross_entropy(shifted, targets, ignore_index=-100)
    np.testing.assert_allclose(float(preference.orpo_nll(chosen, jnp.ones(3))), float(nll), rtol=1e-5)
    cpo = types.SimpleNamespace(beta=2.0, simpo_gamma=0.5, label_smoothing=0.1, alpha=0.0, loss_type="simpo",
                                accelerator=types.SimpleNamespace(device="cpu"))
    simpo_losses, simpo_chosen, _ = CPOTrainer.cpo_loss(cpo, avg[:3], avg[3:])
    loss, metrics = preference.pair_losses(Objective("simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.1),
                                           chosen, rejected)
    np.testing.assert_allclose(np.asarray(loss), simpo_losses.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["rewards_chosen"]), simpo_chosen.numpy(), rtol=1e-5, atol=1e-6)


def test_a_reference_loss_without_reference_log_probs_is_refused():
    lp = LogProbs(jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ValueError, match="needs the reference"):
        preference.pair_losses(Objective("dpo"), lp, lp)
    with pytest.raises(ValueError, match="preference.loss='kto'"):
        Objective("kto")
