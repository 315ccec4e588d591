"""ftjax.config: flag overrides reach the ConfigDict, durations parse, validate() names the bad field, and
default_config(), validate() and the README table all come from the one declaration."""

import json

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from ftjax.config import (
    FIELDS,
    GROUP_KEYS,
    RULES,
    SCHEDULE_KEYS,
    ConfigError,
    default_config,
    duration_to_steps,
    markdown_table,
    parse_duration,
    parse_layer_ranges,
    validate,
    validate_schedule,
)
from ftjax.config.__main__ import main as config_main
from ftjax.config.readme import END, START

RECIPE = """
from ftjax.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.name_or_path = "some/model"
    c.data.source = "files:/tmp/data.jsonl"
    if arg == "short":
        c.train.steps = 10
    return c
"""


def parse_flags(tmp_path, *overrides, arg=""):
    path = tmp_path / "recipe.py"
    path.write_text(RECIPE)
    argv = ["prog", f"--config={path}{':' + arg if arg else ''}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "recipe", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def valid_config():
    c = default_config()
    c.model.name_or_path = "some/model"
    c.data.source = "files:/tmp/data.jsonl"
    return c


def test_flag_overrides_reach_the_config_dict(tmp_path):
    cfg = parse_flags(
        tmp_path,
        "--config.optim.lr=0.1",
        "--config.optim.name=lion",
        "--config.optim.schedule.type=cosine",
        "--config.optim.layer_lr_decay=0.8",
        "--config.train.batch_size=16",
        "--config.optim.freeze=('.*embed.*', '.*/layer/0/.*')",
        "--config.optim.unfreeze=((100, '.*/layer/0/.*'),)",
        arg="short",
    )
    assert cfg.optim.lr == 0.1 and cfg.optim.name == "lion"
    assert cfg.optim.schedule.type == "cosine" and cfg.optim.layer_lr_decay == 0.8
    assert cfg.train.batch_size == 16 and cfg.train.steps == 10
    assert tuple(cfg.optim.freeze) == (".*embed.*", ".*/layer/0/.*")
    assert tuple(map(tuple, cfg.optim.unfreeze)) == ((100, ".*/layer/0/.*"),)
    validate(cfg)


@pytest.mark.parametrize(
    "flag, value, kind",
    [("100", 100, "steps"), ("0.05", 0.05, "fraction"), ("3ep", "3ep", "epochs"), ("10%", "10%", "fraction")],
)
def test_duration_flags_keep_their_unit(tmp_path, flag, value, kind):
    cfg = parse_flags(
        tmp_path, f"--config.optim.schedule.warmup={flag}", f"--config.optim.schedule.decay={flag}"
    )
    assert cfg.optim.schedule.warmup == value and type(cfg.optim.schedule.warmup) is type(value)
    assert parse_duration(cfg.optim.schedule.decay, "optim.schedule.decay")[0] == kind
    validate(cfg)


def test_int_durations_stay_steps_in_recipes():
    c = valid_config()
    c.optim.schedule.warmup = 100
    assert c.optim.schedule.warmup == 100 and isinstance(c.optim.schedule.warmup, int)
    c.optim.schedule.warmup = "2ep"
    validate(c)


def test_bad_flag_value_is_rejected(tmp_path):
    with pytest.raises(flags.IllegalFlagValueError):
        parse_flags(tmp_path, "--config.optim.lr=fast")


def test_parse_duration_units():
    assert parse_duration(100, "f") == ("steps", 100.0)
    assert parse_duration(0.25, "f") == ("fraction", 0.25)
    assert parse_duration("3ep", "f") == ("epochs", 3.0)
    assert parse_duration("1.5 epochs", "f") == ("epochs", 1.5)
    assert parse_duration("10%", "f") == ("fraction", 0.1)
    assert parse_duration("40", "f") == ("steps", 40.0)
    assert parse_duration("0.5", "f") == ("fraction", 0.5)
    for bad in (1.5, -3, "3 weeks", True, "150%"):
        with pytest.raises(ConfigError, match="config.f="):
            parse_duration(bad, "f")


def test_duration_to_steps():
    assert duration_to_steps("2ep", "f", total_steps=100, steps_per_epoch=7) == 14
    assert duration_to_steps(0.5, "f", total_steps=30, steps_per_epoch=7) == 15
    assert duration_to_steps("10%", "f", total_steps=30, steps_per_epoch=7) == 3
    assert duration_to_steps(30, "f", total_steps=30, steps_per_epoch=7) == 30
    with pytest.raises(ConfigError, match=r"optim\.schedule\.warmup.*longer than the run"):
        duration_to_steps("5ep", "optim.schedule.warmup", total_steps=30, steps_per_epoch=7)


def test_parse_layer_ranges():
    assert parse_layer_ranges("embeddings,0-2,5", "f") == (True, (0, 1, 2, 5))
    assert parse_layer_ranges("3", "f") == (False, (3,))
    for bad in ("3-1", "layers 0-2", "0-2-4"):
        with pytest.raises(ConfigError, match="config.f="):
            parse_layer_ranges(bad, "f")


def test_default_recipe_validates():
    validate(valid_config())


def test_eval_every_is_a_duration():
    """0 = each epoch; int steps; a fraction or "N%" of the run; "Nep" epochs; never below one step."""
    from ftjax.run import eval_every_of

    def every(value):
        return eval_every_of(ml_collections.ConfigDict({"eval_every": value}), 10, 24)

    assert [every(v) for v in (0, 7, 0.25, "50%", "2ep", 0.01, 100)] == [10, 7, 6, 12, 20, 1, 100]
    for bad in (-1, 1.5, "often"):
        c = valid_config()
        c.train.eval_every = bad
        with pytest.raises(ConfigError, match="config.train.eval_every="):
            validate(c)


def test_wiki_topics_recipe_splits_the_package_files_the_same_everywhere(tmp_path):
    """configs/minilm_wiki_topics.py: the uncategorised and empty summaries left out, test = the titles whose
    SHA-1 is 0 mod 5 whatever the package's order, rows shuffled by that hash (max_examples takes a fair sample),
    and an existing data folder is read as it is (no package needed then)."""
    from configs import minilm_wiki_topics as wiki

    topics = ["People", "History", "Mathematics", wiki.UNCATEGORISED]
    titles = {f"article {i}": topics[i % 4] for i in range(200)}
    summaries = {t: {"extract": f"  text of\n{t} " if i % 7 else ""} for i, t in enumerate(titles)}
    counts = wiki.write_splits(titles, dict(reversed(summaries.items())), str(tmp_path / "a"))
    rows = {s: [json.loads(x) for x in open(tmp_path / "a" / f"{s}.jsonl")] for s in ("train", "test")}
    kept = {t for i, t in enumerate(titles) if i % 4 != 3 and i % 7}
    assert counts == {s: len(r) for s, r in rows.items()} and sum(counts.values()) == len(kept)
    assert {r["title"] for r in rows["test"]} == {t for t in kept if wiki.is_test(t)} != set()
    assert {r["title"] for r in rows["train"]} == {t for t in kept if not wiki.is_test(t)}
    assert all(r["text"] == f"text of {r['title']}" and r["topic"] == titles[r["title"]] for r in rows["train"])
    assert [r["title"] for r in rows["train"]] != sorted(r["title"] for r in rows["train"])  # shuffled
    wiki.write_splits(titles, summaries, str(tmp_path / "b"))  # another package order: the same files
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    cfg = wiki.get_config(f"data={tmp_path / 'a'},quick")
    validate(cfg)
    assert cfg.data.source == f"files:{tmp_path / 'a'}" and cfg.data.max_examples == 800


def _invalid(field, **optim):
    c = valid_config()
    for key, value in optim.items():
        if key.startswith("schedule_"):
            c.optim.schedule[key[len("schedule_") :]] = value
        else:
            c.optim[key] = value
    with pytest.raises(ConfigError) as err:
        validate(c)
    assert err.value.field == field, str(err.value)
    assert f"config.{field}=" in str(err.value)


# One test per optim check: each must name its field.
def test_unknown_optimizer():
    _invalid("optim.name", name="adam")


def test_lr_must_be_positive():
    _invalid("optim.lr", lr=0.0)


def test_layer_lr_decay_range():
    _invalid("optim.layer_lr_decay", layer_lr_decay=1.5)


def test_layer_pattern_needs_a_capture_group():
    _invalid("optim.layer_pattern", layer_pattern=r".*/layer/\d+/.*")


def test_bad_regex():
    _invalid("optim.decay_exclude", decay_exclude="(bias")


def test_unknown_schedule_type():
    _invalid("optim.schedule.type", schedule_type="cosine_restarts")


def test_schedule_min_ratio_range():
    _invalid("optim.schedule.min_ratio", schedule_min_ratio=1.5)


def test_schedule_pct_start_range():
    _invalid("optim.schedule.pct_start", schedule_pct_start=1.0)


def test_schedule_gamma_range():
    _invalid("optim.schedule.gamma", schedule_gamma=0.0)


def test_schedule_power_positive():
    _invalid("optim.schedule.power", schedule_power=0.0)


def test_schedule_warmup_float_above_one():
    _invalid("optim.schedule.warmup", schedule_warmup=1.5)


def test_schedule_decay_bad_unit():
    _invalid("optim.schedule.decay", schedule_decay="3 weeks")


def test_group_must_be_a_pair():
    _invalid("optim.groups[0]", groups=("classifier/.*",))


def test_group_unknown_key():
    _invalid("optim.groups[0][1]", groups=(("classifier/.*", {"lr": 1e-3}),))


def test_group_name_unique():
    _invalid("optim.groups[1].name", groups=(("a", {"name": "head"}), ("b", {"name": "head"})))


def test_group_name_reserved():
    _invalid("optim.groups[0].name", groups=(("a", {"name": "default"}),))


def test_group_negative_lr_mult():
    _invalid("optim.groups[0].lr_mult", groups=(("a", {"lr_mult": -1.0}),))


def test_group_negative_weight_decay():
    _invalid("optim.groups[0].weight_decay", groups=(("a", {"weight_decay": -0.1}),))


def test_group_frozen_must_be_bool():
    _invalid("optim.groups[0].frozen", groups=(("a", {"frozen": "yes"}),))


def test_group_schedule_unknown_key():
    _invalid("optim.groups[0].schedule", groups=(("a", {"schedule": {"warmup_steps": 10}}),))


def test_group_schedule_checked_after_merging_with_optim_schedule():
    _invalid("optim.groups[0].schedule.gamma", groups=(("a", {"schedule": {"type": "step", "gamma": 2.0}}),))
    c = valid_config()
    c.optim.groups = (("a", {"schedule": {"type": "constant"}}), ("b", {"schedule": {"warmup": "1ep"}}))
    validate(c)


def test_freeze_bad_regex():
    _invalid("optim.freeze[1]", freeze=(".*embed.*", "*"))


def test_freeze_layers_spec():
    _invalid("optim.freeze_layers", freeze_layers="embeddings,top")


def test_train_only_bad_regex():
    _invalid("optim.train_only", train_only="[head")


def test_unfreeze_must_be_pairs():
    _invalid("optim.unfreeze[0]", unfreeze=((100, ".*", "extra"),))


def test_unfreeze_when_is_a_step_or_epochs():
    _invalid("optim.unfreeze[0][0]", unfreeze=((0.5, ".*"),))


def test_unfreeze_bad_regex():
    _invalid("optim.unfreeze[0][1]", unfreeze=((100, "(layer"),))


# ------------------------------------------------------------------------------------------ the declaration
def _leaves(cfg, prefix=""):
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", cfg, key


def test_default_config_is_exactly_the_declaration():
    c = default_config()
    declared = {f.path: f for f in FIELDS}
    assert sorted(path for path, _, _ in _leaves(c)) == sorted(declared)
    for path, node, key in _leaves(c):
        f = declared[path]
        assert f.doc and "\n" not in f.doc, path
        assert node.get_type(key) is f.field_type, path
        if f.default is not None:
            assert isinstance(f.default, f.field_type), path
            assert node[key] == f.default, path


def test_durations_and_buckets_are_field_references_of_any_type():
    c = default_config()
    for node, key in ((c.optim.schedule, "warmup"), (c.optim.schedule, "decay"), (c.data, "buckets")):
        assert isinstance(node._fields[key], ml_collections.FieldReference)
        node[key] = "2ep"  # an object-typed field takes an int, a float or a string
    c.model.num_labels = 3  # a typed placeholder
    with pytest.raises(TypeError):
        c.model.num_labels = "three"


def test_every_default_passes_its_check_except_the_two_a_recipe_must_set():
    c, failing = valid_config(), []
    for f in FIELDS:
        if f.check is not None:
            assert f.check.valid, f.path
            try:
                f.check(f.default, f.path, c)
            except ConfigError:
                failing.append(f.path)
    assert failing == ["model.name_or_path", "data.source"]


def test_cross_field_rules_are_named_and_name_their_field():
    c = valid_config()
    c.train.batch_size, c.train.grad_accum = 30, 4
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size=30 is invalid: .*grad_accum=4"):
        validate(c)
    c = valid_config()
    c.mesh.data, c.mesh.fsdp = -1, -1
    with pytest.raises(ConfigError) as err:
        validate(c)
    assert err.value.field == "mesh"
    assert {r.name for r in RULES} >= {"batch_splits_into_micro_batches", "one_inferred_mesh_axis"}


def test_validate_one_section_reads_only_that_section():
    o = default_config().optim
    validate({"optim": o}, section="optim")  # model.name_or_path and data.source are not looked at
    o.lr = -1.0
    with pytest.raises(ConfigError, match=r"config\.optim\.lr=-1\.0 is invalid: a finite number > 0"):
        validate({"optim": o}, section="optim")


def test_missing_field_is_named():
    c = valid_config()
    del c.train["seed"]
    c.train.early_stop = ml_collections.ConfigDict({"metric": "loss"})
    with pytest.raises(ConfigError, match=r"config\.train\.early_stop\.mode=None is invalid: missing"):
        validate(c)


def test_group_keys_and_schedule_keys_come_from_the_declaration():
    assert GROUP_KEYS == ("name", "lr_mult", "weight_decay", "schedule", "frozen")
    assert set(SCHEDULE_KEYS) == set(default_config().optim.schedule.keys())
    validate_schedule({"type": "cosine", "decay": "2ep"}, "s")
    with pytest.raises(ConfigError, match=r"config\.s\.type=None"):
        validate_schedule({"decay": 10}, "s")


def test_markdown_table_has_a_row_per_field_and_per_group_key():
    table = markdown_table()
    for f in FIELDS:
        assert f"| `{f.path}` |" in table
    for key in GROUP_KEYS:
        assert f"| `optim.groups[i].{key}` |" in table
    assert r"`.*(bias\|scale)`" in table  # a | inside a cell is escaped


def test_module_cli_prints_the_table_and_rewrites_a_readme(tmp_path, capsys):
    config_main([])
    assert capsys.readouterr().out.strip() == markdown_table()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold\n{END}\noutro\n")
    config_main(["--readme", str(readme)])
    assert readme.read_text() == f"intro\n{START}\n{markdown_table()}\n{END}\noutro\n"
