"""--mode=dry_run as a plan: the run built as shapes from config.json alone, its real steps compiled ahead of time
for the live CPU devices or a TPU slice (libtpu's topology API), and dry_run.json's verdict."""

from __future__ import annotations

import json
import os

import jax
import pytest

from ftjax import dry_run, fileio
from ftjax import workdir as workdir_lib
from ftjax.config import ConfigError, default_config, with_overrides
from ftjax.run import Run
from tests.test_lm_data import tiny_llama
from tests.test_main import _cli, _error_line

pytest.importorskip("libtpu")


def config_only_llama(path, **values) -> str:
    """A model folder with config.json and nothing else: no weights, no tokenizer."""
    import transformers

    kwargs = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # noqa: C408
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    transformers.LlamaConfig(**{**kwargs, **values}).save_pretrained(str(path))
    assert os.listdir(path) == ["config.json"]
    return str(path)


def lm_config(model_dir: str, **overrides):
    c = default_config()
    c.model.name_or_path = model_dir
    c.model.task = "causal_lm"
    c.data.source = "files:/no/such/corpus.txt"  # a plan reads no data
    c.data.max_len = 64
    c.train.batch_size = 8
    c.train.steps = 10
    c.train.compilation_cache = ""
    c.mesh.data = -1
    return with_overrides(c, overrides)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return config_only_llama(tmp_path_factory.mktemp("config_only"))


def test_a_plan_reads_config_json_only_and_compiles_on_the_live_cpu_devices(llama_folder, tmp_path):
    result = dry_run.dry_run(lm_config(llama_folder), str(tmp_path), "cpu:4")
    saved = fileio.read_json(fileio.path(tmp_path) / workdir_lib.DRY_RUN_FILE)
    assert saved["topology"] == "cpu:4" and saved["chips"] == 4 and saved["platform"] == "cpu"
    assert saved["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert saved["fits"] is True and saved["per_chip_peak_bytes"] > saved["parts"]["params"] > 0
    # Adam's two moments: about twice the params (plus the step counters).
    assert 2 * saved["parts"]["params"] <= saved["parts"]["optimizer_state"] < 2.1 * saved["parts"]["params"]
    assert saved["batch_structure"]["input_ids"] == [[8, 64], "int32"]
    assert saved["params_total"] == 2 * (512 * 64) + 64 + 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64)
    assert "plan for cpu:4" in result["report"] and "fits in" in result["report"]


def test_the_planned_batches_are_the_ones_training_makes(tmp_path):
    """What is planned is what trains: the structure of a plan's batches equals the real data's."""
    folder = tiny_llama(str(tmp_path / "llama"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} about snacks and tea, said twice {i}." for i in range(60)))
    cfg = lm_config(folder)
    cfg.data.source = f"files:{corpus}"
    cfg.data.lm.format, cfg.data.lm.documents = "text", "paragraph"
    trained = Run(cfg, str(tmp_path / "train"), purpose="train")
    planned = Run(cfg, str(tmp_path / "plan"), purpose="plan")
    for kind in ("train", "eval"):
        real, plan = trained.batch_structs(kind, longest=True)[0], planned.batch_structs(kind, longest=True)[0]
        assert {k: (v.shape, v.dtype) for k, v in real.items()} == {k: (v.shape, v.dtype) for k, v in plan.items()}
    # The plan's params are shapes with the training run's shardings: nothing was materialised.
    real_leaves = jax.tree_util.tree_leaves(trained.state["params"])
    plan_leaves = jax.tree_util.tree_leaves(planned.state["params"])
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in plan_leaves)
    assert [(x.shape, x.dtype, x.sharding.spec) for x in real_leaves] == [
        (x.shape, x.dtype, x.sharding.spec) for x in plan_leaves]


def test_a_tpu_slice_plan_counts_the_flops_of_every_scanned_layer(llama_folder, tmp_path):
    """v5e-4 (libtpu's abstract v5e:2x2, compiled here): with XLA attention the lowered program's matmul
    FLOPs equal the model count, scanned or not (XLA's cost_analysis would count one layer of the scan)."""
    plans = {scan: dry_run.dry_run(lm_config(llama_folder, **{"model.attention": "xla", "model.scan_layers": scan}),
                                   str(tmp_path / str(scan)), "v5e-4") for scan in (True, False)}
    scanned = plans[True]
    assert scanned["libtpu_topology"] == "v5e:2x2" and scanned["chips"] == 4
    assert scanned["device_kind"].startswith("TPU v5")
    assert scanned["hbm_bytes_per_chip"] == 16 * 2**30 and scanned["fits"] is True
    assert scanned["hlo_to_model_flops"] == pytest.approx(1.0, abs=0.01)
    assert plans[False]["hlo_flops_per_step"] == pytest.approx(scanned["hlo_flops_per_step"], rel=1e-6)
    # LoRA: the adapters of a scanned stack are counted per layer (frozen base: no weight gradients). Unrolled,
    # the program is the count; scanned, the backward of a scan also computes layer 0's input gradient, which
    # nothing needs (one body serves every layer): a few % over at 2 layers.
    lora = {scan: dry_run.dry_run(lm_config(llama_folder, **{"model.attention": "xla", "optim.lora.rank": 4,
                                                             "model.scan_layers": scan}),
                                  str(tmp_path / f"lora{scan}"), "v5e-4") for scan in (True, False)}
    assert lora[False]["hlo_to_model_flops"] == pytest.approx(1.0, abs=0.005)
    assert 1.0 <= lora[True]["hlo_to_model_flops"] < 1.06
    assert lora[True]["model_flops_per_step"] == lora[False]["model_flops_per_step"]
    assert lora[True]["model_flops_per_step"] < 0.8 * scanned["model_flops_per_step"]
    # Full remat recomputes each layer's forward: more FLOPs, less temp memory.
    remat = dry_run.dry_run(lm_config(llama_folder, **{"model.attention": "xla", "model.remat": "full"}),
                            str(tmp_path / "remat"), "v5e-4")
    assert remat["hlo_flops_per_step"] > 1.15 * scanned["hlo_flops_per_step"]
    assert remat["parts"]["temp"] < scanned["parts"]["temp"]


@pytest.mark.parametrize("topology", ["cpu:4", "v5e-4"])
def test_a_population_plan_reports_memory_and_step_time_over_k(llama_folder, tmp_path, topology):
    result = dry_run.dry_run(lm_config(llama_folder), str(tmp_path), topology, population=4)
    rows = fileio.read_json(fileio.path(tmp_path) / workdir_lib.DRY_RUN_FILE)["population"]["sizes"]
    assert [r["members"] for r in rows] == [1, 2, 4]
    solo = result["parts"]
    for r in rows:  # K copies of the solo state, sharded like it, all fitting
        assert r["params"] == r["members"] * solo["params"] and r["fits"] is True
        assert r["optimizer_state"] == pytest.approx(r["members"] * solo["optimizer_state"], rel=0.01)
        assert r["peak_bytes"] > r["params"] + r["optimizer_state"]
    assert rows[-1]["peak_bytes"] > 2 * rows[0]["peak_bytes"]
    live = topology.startswith("cpu")
    assert all(("step_seconds" in r) == live for r in rows)
    if live:
        assert all(r["step_seconds"] > 0 and r["seconds_per_member"] == r["step_seconds"] / r["members"]
                   for r in rows)
    assert "population plan on " + topology in result["report"]


def test_a_plan_that_does_not_fit_says_what_would(tmp_path):
    """A 1.4B-parameter decoder fully fine-tuned in f32 on one v5e chip (16 GiB): params + Adam alone are
    about 22 GiB. The verdict names the dominating part and fixes that exist for this mesh and config."""
    folder = config_only_llama(tmp_path / "big", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                               num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    result = dry_run.dry_run(lm_config(folder, **{"train.batch_size": 4}), str(tmp_path / "plan"), "v5e-1")
    assert result["fits"] is False and result["margin_bytes"] < 0
    assert result["per_chip_peak_bytes"] > 16 * 2**30
    assert result["suggestion"].startswith("does not fit") and "optimizer state alone" in result["suggestion"]
    assert "model.remat" not in result["suggestion"]  # no activation setting can fix state > HBM
    assert "optim.lora.rank" in result["suggestion"]
    assert "DOES NOT FIT" in result["report"]


@pytest.mark.parametrize("name, libtpu, chips", [
    ("v5litepod-16", "v5e:4x4", 16), ("v5e-8", "v5e:2x4", 8), ("v6e-4", "v6e:2x2", 4),
    ("v5p-16", "v5p:2x2x2", 8), ("v4-32", "v4:2x2x4", 16), ("v5e:2x2", "v5e:2x2", 4),
])
def test_gcloud_accelerator_types_map_to_libtpu_topologies(name, libtpu, chips):
    topo = dry_run.topology(name)
    assert topo.libtpu_topology == libtpu and topo.chips == chips and topo.hbm_bytes_per_chip > 0


@pytest.mark.parametrize("name, says", [
    ("v9-8", "is not known"), ("v5p-6", "not a slice size"), ("v5e:4x4x4", "is not known"),
    ("cpu:999", "--cpu_devices=999"), ("tpu", "is not known"),
])
def test_unknown_topologies_are_one_line_naming_the_valid_ones(name, says):
    with pytest.raises(dry_run.TopologyError, match=says) as e:
        dry_run.topology(name)
    assert "\n" not in str(e.value)


def test_a_labelled_task_plan_needs_the_label_count(tmp_path, model_dir):
    cfg = default_config()
    cfg.model.name_or_path, cfg.model.task, cfg.data.source = model_dir, "classification", "files:/no/data"
    cfg.data.max_len, cfg.data.buckets = 64, 2
    with pytest.raises(ConfigError, match="model.num_labels"):
        Run(cfg, str(tmp_path), purpose="plan")
    cfg.model.num_labels = 3
    result = dry_run.dry_run(cfg, str(tmp_path), None)  # the live devices
    assert result["task"] == "classification" and result["fits"] is True


@pytest.mark.slow
def test_the_cli_plans_for_a_topology_and_refuses_it_elsewhere(llama_folder, tmp_path):
    recipe = tmp_path / "plan_recipe.py"
    recipe.write_text(f"from tests.test_dry_run import lm_config\n\ndef get_config(arg=None):\n"
                      f"    return lm_config({llama_folder!r})\n")
    workdir = tmp_path / "plan"
    out = _cli(f"--config={recipe}", f"--workdir={workdir}", "--mode=dry_run", "--topology=v5e-4")
    assert "plan for v5e-4 (4 x TPU v5 lite" in out.stdout and "fits in 16.00 GiB" in out.stdout
    assert json.loads((workdir / "dry_run.json").read_text())["fits"] is True
    bad = _cli(f"--config={recipe}", f"--workdir={workdir}", "--mode=dry_run", "--topology=v7x-9", check=False)
    assert "v7x-9" in _error_line(bad) and "v5litepod-N" in _error_line(bad)
    train = _cli(f"--config={recipe}", f"--workdir={workdir}", "--topology=v5e-4", check=False)
    assert train.returncode != 0 and "goes with --mode=dry_run" in train.stderr
