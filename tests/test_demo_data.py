"""The demo task generator: determinism, balance, split disjointness, instruction-not-copying."""

import collections
import json

import pytest
import yaml

from sftctl.plugins.alpaca import demo_data
from sftctl.plugins.alpaca.demo_data import TASKS, default_splits, format_prompt, generate, record_key


@pytest.fixture(scope="module")
def splits():
    return default_splits(seed=0)


def test_same_seed_same_records_other_seed_other_records():
    a = generate(500, seed=7)
    assert a == generate(500, seed=7)
    assert a != generate(500, seed=8)


def test_no_global_random_state_used():
    import random

    random.seed(123)
    before = random.getstate()
    generate(200, seed=1)
    assert random.getstate() == before
    random.seed(1)
    x = generate(50, seed=3)
    random.seed(2)
    assert generate(50, seed=3) == x


def test_record_fields_and_answers_are_correct():
    recs = generate(1300, seed=3)
    assert len(recs) == 1300
    for r in recs:
        assert set(r) == {"instruction", "input", "output", "task"}
        assert all(isinstance(r[k], str) for k in r)
        assert r["output"] and "\n" not in r["output"] and r["output"] == r["output"].strip()
        assert "\n" not in r["instruction"] and "\n" not in r["input"]
        t, inp, out = r["task"], r["input"], r["output"]
        words = inp.split()
        if t == "reverse_words":
            assert out.split() == words[::-1]
        elif t == "sort_words":
            assert out.split() == sorted(words)
        elif t == "uppercase":
            assert out == inp.upper()
        elif t == "capitalize":
            assert out.split() == [w[0].upper() + w[1:] for w in words]
        elif t == "count_words":
            assert int(out) == len(words)
        elif t == "dedup_words":
            assert len(set(words)) < len(words)
            assert out.split() == list(dict.fromkeys(words))
        elif t in ("first_k", "last_k"):
            k = int(next(tok for tok in r["instruction"].split() if tok.isdigit()))
            assert k < len(words)
            assert out.split() == (words[:k] if t == "first_k" else words[-k:])
        elif t in ("add", "smaller", "larger"):
            a, b = map(int, words)
            assert a != b and 0 <= min(a, b) and max(a, b) <= demo_data.MAX_NUMBER
            assert int(out) == {"add": a + b, "smaller": min(a, b), "larger": max(a, b)}[t]
        elif t == "repeat_word":
            assert inp == ""
            k = int(next(tok for tok in r["instruction"].split() if tok.isdigit()))
            assert len(out.split()) == k and len(set(out.split())) == 1
        elif t == "count_up":
            assert inp == ""
            nums = [int(x) for x in out.split()]
            assert nums == list(range(nums[0], nums[-1] + 1)) and len(nums) >= 3
        else:  # pragma: no cover
            pytest.fail(f"unknown task {t}")


def test_tasks_are_balanced():
    n = 13 * 77 + 5
    counts = collections.Counter(r["task"] for r in generate(n, seed=11))
    assert set(counts) == set(TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert max(counts.values()) / n < 0.1  # no task dominates


def test_same_input_different_instructions_different_answers():
    recs = generate(2000, seed=5)
    by_input = collections.defaultdict(list)
    for r in recs:
        if r["input"]:
            by_input[r["input"]].append(r)
    shared = [rs for rs in by_input.values() if len({r["task"] for r in rs}) >= 2]
    with_input = sum(1 for r in recs if r["input"])
    # Most records share their input with another task; on a shared input, answers differ.
    assert sum(len(rs) for rs in shared) > 0.9 * with_input
    differing = sum(1 for rs in shared if len({r["output"] for r in rs}) == len(rs))
    assert differing > 0.95 * len(shared)


def test_both_prompt_forms_and_several_phrasings():
    recs = generate(1300, seed=2)
    assert any(r["input"] == "" for r in recs) and any(r["input"] for r in recs)
    for name in TASKS:
        instr = {r["instruction"] for r in recs if r["task"] == name}
        assert len(instr) >= 3, name
    r_in = next(r for r in recs if r["input"])
    r_no = next(r for r in recs if not r["input"])
    assert format_prompt(r_in).endswith(f"### Input:\n{r_in['input']}\n\n### Response:\n")
    assert "### Input:" not in format_prompt(r_no)
    assert format_prompt(r_no).startswith("Below is an instruction that describes a task. Write")


def test_heldout_is_disjoint_from_training(splits):
    train, heldout = splits
    assert len(train) == demo_data.DEFAULT_N_TRAIN and len(heldout) == demo_data.DEFAULT_N_HELDOUT
    train_prompts = {format_prompt(r) for r in train}
    assert not any(format_prompt(r) in train_prompts for r in heldout)
    # Stronger: no held-out input (or no-input task parameters) appears in training at all.
    train_keys = {record_key(r) for r in train}
    assert not any(record_key(r) in train_keys for r in heldout)
    assert len({format_prompt(r) for r in heldout}) == len(heldout)
    counts = collections.Counter(r["task"] for r in heldout)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert default_splits(seed=0) == splits


def test_record_key_ignores_phrasing_of_no_input_tasks():
    a = {"instruction": "Repeat the word plum 3 times.", "input": "", "output": "", "task": "repeat_word"}
    b = {"instruction": "Say plum exactly 3 times.", "input": "", "output": "", "task": "repeat_word"}
    c = {"instruction": "Say plum exactly 4 times.", "input": "", "output": "", "task": "repeat_word"}
    assert record_key(a) == record_key(b) != record_key(c)


def test_exclude_is_respected_and_counted():
    first = generate(200, seed=0, unique=True)
    keys = {record_key(r) for r in first}
    recs, stats = demo_data.generate_with_stats(2000, seed=0, exclude=keys)
    assert not keys & {record_key(r) for r in recs}
    assert stats.redrawn_excluded > 0 and stats.records == 2000


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="non-negative"):
        generate(-1, seed=0)
    with pytest.raises(ValueError, match="unknown tasks"):
        generate(10, seed=0, tasks=["reverse_words", "nope"])


def test_jsonl_round_trip_and_bad_line(tmp_path):
    recs = generate(30, seed=4)
    path = demo_data.write_jsonl(recs, tmp_path / "sub" / "d.jsonl")
    assert demo_data.read_jsonl(path) == recs
    assert all(json.loads(line) for line in path.read_text().splitlines())
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:31"):
        demo_data.read_jsonl(path)


def test_default_config_matches_module_sizes():
    from pathlib import Path

    cfg = yaml.safe_load((Path(demo_data.__file__).parent / "default_config.yaml").read_text())
    assert cfg["options"]["alpaca.demo_train_size"] == demo_data.DEFAULT_N_TRAIN
    assert cfg["options"]["alpaca.demo_heldout_size"] == demo_data.DEFAULT_N_HELDOUT
