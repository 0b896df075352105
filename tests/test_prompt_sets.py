"""The team's prompt sets in params/prompts/: valid JSONL, no duplicates, GenEval's categories, and the evaluation
sets disjoint from the cache's training prompts (exactly and nearly)."""
import itertools
import json
import re
from collections import Counter

import pytest

from anima_lib import cache, config, gate

PROMPTS = config.PARAMS_DIR / "prompts"
GENEVAL = PROMPTS / "eval_geneval_style.jsonl"
STUDIO = PROMPTS / "eval_studio.jsonl"
TRAIN = PROMPTS / "train.jsonl"
GENEVAL_CATEGORIES = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
STOP = set("a an the of in on with and to at by for from its his her their into over under".split())


def rows(path):
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            row = json.loads(line)  # every line is one JSON object
            assert isinstance(row, dict), f"{path.name}:{n}"
            out.append(row)
    return out


@pytest.mark.parametrize("path", [GENEVAL, STUDIO, TRAIN], ids=lambda p: p.name)
def test_valid_jsonl_with_unique_ids_and_no_duplicate_prompts(path):
    data = rows(path)
    assert path.read_text(encoding="utf-8").endswith("\n")
    for row in data:
        assert set(row) <= {"id", "prompt", "negative", "category"}, row
        assert isinstance(row["id"], str) and isinstance(row["prompt"], str) and row["prompt"] == row["prompt"].strip()
        assert 3 <= len(row["prompt"].split()) <= 40, row
    records, skipped = cache.read_prompts_jsonl(path)  # the reader the cache and the gate use: nothing skipped
    assert skipped == [] and len(records) == len(data)
    assert len({r["id"] for r in data}) == len(data)
    normalized = Counter(gate.normalized_prompt(r["prompt"]) for r in data)
    assert [p for p, n in normalized.items() if n > 1] == []


def test_geneval_style_set_has_twenty_of_each_category():
    data = rows(GENEVAL)
    assert Counter(r["category"] for r in data) == {c: 20 for c in GENEVAL_CATEGORIES}
    assert all("negative" not in r for r in data)  # the gate samples with sampler.negative_prompt


def test_studio_set_is_about_a_hundred_creatures_characters_and_props():
    counts = Counter(r["category"] for r in rows(STUDIO))
    assert set(counts) == {"creature", "character", "prop"} and 90 <= sum(counts.values()) <= 110
    assert min(counts.values()) >= 20


def test_training_set_is_a_few_hundred_prompts():
    data = rows(TRAIN)
    assert 250 <= len(data) <= 1000
    assert all("negative" not in r for r in data)  # the cache stores one negative per shard


def _words(text):
    return {w for w in re.findall(r"[a-z']+", text.lower()) if w not in STOP}


def test_evaluation_sets_are_disjoint_from_training_and_each_other():
    train, evals = rows(TRAIN), rows(GENEVAL) + rows(STUDIO)
    ids = [r["id"] for r in train + evals]
    assert len(set(ids)) == len(ids)  # ids unique across every file
    seen = {gate.normalized_prompt(r["prompt"]) for r in train}
    assert [r["id"] for r in evals if gate.normalized_prompt(r["prompt"]) in seen] == []
    assert len({gate.normalized_prompt(r["prompt"]) for r in evals}) == len(evals)
    # nor a near-copy: no evaluation prompt shares most of its content words with a training prompt
    near = [(e["id"], t["id"]) for e, t in itertools.product(evals, train)
            if len(_words(e["prompt"]) & _words(t["prompt"])) / len(_words(e["prompt"]) | _words(t["prompt"])) >= 0.6]
    assert near == []


def test_the_anima_2b_preset_points_at_these_files():
    p = config.load_config("anima-2b", ["run.device=cpu"], check_paths=False)
    assert config.resolve_path(p.cache.prompts_file) == TRAIN
    assert config.gate_prompt_files(p) == [GENEVAL, STUDIO]
    assert p.gate.n_prompts == len(rows(GENEVAL)) + len(rows(STUDIO))
