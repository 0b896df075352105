"""Prompts JSONL hardening (issue 18 item 7): bad bytes, giant prompts, token caps, bad negatives, nothing usable."""
import json
import types

import pytest

from anima_lib import cache, cli, config, models
from anima_lib.nano_world.prompts import vocabulary


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def params(tmp_path):
    def make(prompts_file, preset="nano"):
        p = config.load_config("nano", [f"run.output_dir={tmp_path}/out", f"run.report_dir={tmp_path}/rep",
                                         f"cache.prompts_file={prompts_file}"])
        p.model.preset = preset  # cache_records reads only the preset name: no 2B weights needed
        return p
    return make


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "red round creature"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(cache.CacheError, match=r"p\.jsonl:2: not valid UTF-8"):
        cache.read_prompts_jsonl(path)
    # lines end at \n only: a U+2028 inside a JSON string is part of the prompt, not a line break
    path.write_text(json.dumps({"id": "a", "prompt": "red\u2028creature"}, ensure_ascii=False) + "\n")
    assert cache.read_prompts_jsonl(path)[0][0].prompt == "red\u2028creature"


def test_non_string_negative_is_an_error_naming_the_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "negative": 3}])
    with pytest.raises(cache.CacheError, match=r"p\.jsonl:2: 'negative' must be a string \(got int\)"):
        cache.read_prompts_jsonl(path)


def test_giant_one_word_prompt_is_skipped_on_every_preset(tmp_path, params):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "ok", "prompt": "red round creature"},
                                              {"id": "giant", "prompt": "x" * 100_000}])
    for preset, limit in (("nano", models.NANO_MAX_TOKENS), ("anima-2b", models.AnimaComponents.max_tokens)):
        cap = cache.CHARS_PER_TOKEN_CAP * limit
        records, skipped = cache.cache_records(params(path, preset))
        assert [r.id for r in records] == ["ok"], preset
        assert skipped == [f"line 2 id 'giant': 100,000 characters > {cap:,}"], preset


def test_token_cap_skips_with_line_and_token_count():
    records = [cache.PromptRecord("a", "one two", line=1), cache.PromptRecord("b", "one two three four", line=2),
               cache.PromptRecord("c", "one", negative="n1 n2 n3 n4 n5", line=3)]
    kept, skipped = cache.cap_by_tokens(records, lambda s: 2 * len(s.split()), max_tokens=4)  # 2 tokens per word
    assert [r.id for r in kept] == ["a"]
    assert skipped == ["line 2 id 'b': prompt of 8 tokens > 4 (the text path's limit)",
                       "line 3 id 'c': negative of 10 tokens > 4 (the text path's limit)"]


def test_token_counter_uses_the_components_tokenizers():
    tokenizer = models.nano_tokenizer(vocabulary())
    count = cache.token_counter(types.SimpleNamespace(tokenizer=tokenizer, t5_tokenizer=tokenizer))
    assert count("red round creature") == 3


def test_every_prompt_skipped_is_an_error_before_compute(tmp_path, params, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": " "}, {"id": "b", "prompt": "w " * 40}])
    with pytest.raises(cache.CacheError, match=r"no usable prompts \(2 skipped; first: line 1 id 'a': empty prompt; "
                                               r"line 2 id 'b': 40 words > 16\)"):
        cache.cache_records(params(path))
    # the CLI says it in one line, before loading any model
    code = cli.main(["cache", "build", "nano", "--set", f"cache.prompts_file={path}",
                     "--set", f"run.output_dir={tmp_path}/out", "--set", f"run.report_dir={tmp_path}/rep"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("anima: ") and "no usable prompts" in err and err.count("\n") == 1
