"""The benchmark of the user's own data (sftctl.evals.user_tasks), through the real CLI on a tiny
local model: Alpaca and chat data, base vs SFT in the report, and the numbers equal to stock
lm-eval's (``lm_eval.simple_evaluate(model="hf", ...)``) on the same task files and checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sftctl_testutil import alpaca_records, build_tiny_base, cli_env, run_cli, write_jsonl  # noqa: E402

from sftctl.data.formats import DatasetFormat, RecordError, Segment  # noqa: E402

TASKS = ("heldout_generate", "heldout_nll")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("user_bench") / "base")


def _train(args, tmp_path):
    r = run_cli(["train", *args, "--max-steps", "3", "--batch-size", "4", "--lr", "5e-3"],
                env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _results(out: Path, label: str, task: str) -> dict:
    (path,) = (out / "eval" / label / task).glob("results_*.json")
    return json.loads(path.read_text())


def _check_report(out: Path, n: int, source: str) -> dict:
    report = json.loads((out / "report.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in report["benchmarks"]["table"]}
    for key in (("heldout_generate", "exact_match"), ("heldout_generate", "normalized_match"),
                ("heldout_generate", "rouge_l"), ("heldout_generate", "chrf"),
                ("heldout_nll", "nll_per_token"), ("heldout_nll", "perplexity")):
        assert rows[key]["base"] is not None and rows[key]["sft"] is not None, key
    assert rows[("heldout_nll", "nll_per_token")]["higher_is_better"] is False
    summary = json.loads((out / "summary.json").read_text())
    assert source in summary["heldout"]["source"]
    md = (out / "report.md").read_text()
    assert f"{n} held-out records" in md and source in md
    return rows


def test_alpaca_data_held_out_slice_and_stock_lm_eval(base, tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", alpaca_records(60))
    out = tmp_path / "run"
    _train(["--model", str(base), "--data", str(data), "--output-dir", str(out)], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout"]["records"] == 3  # 5% of 60
    held = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 3
    rows = _check_report(out, 3, "held out of training")
    # stock lm-eval on the same task files and checkpoints gives the same numbers
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(out / "eval" / "tasks" / "heldout"), include_defaults=False)
    for label, path in (("base", base), ("sft", out / "model")):
        res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(path),
                                                              "dtype": "float32"},
                                      tasks=list(TASKS), task_manager=tm, batch_size=16,
                                      device="cpu")
        for task in TASKS:
            ours = _results(out, label, task)
            assert ours["config"]["model"] == "hf"
            assert ours["config"]["model_args"]["pretrained"] == str(Path(path).resolve())
            assert ours["model_name"] == str(Path(path).resolve())
            for k, v in res["results"][task].items():
                if "," in k and "stderr" not in k:
                    assert ours["results"][task][k] == v, (label, task, k)
                    assert rows[(task, k.split(",")[0])][label] == v
    # the prompts are the records' Alpaca prompts, exactly as training formats them
    from sftctl.plugins.alpaca.template import format_prompt

    pairs = [json.loads(x) for x in
             (out / "eval" / "tasks" / "heldout" / "heldout_pairs.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in pairs] == [format_prompt(r) for r in held]
    assert [p["reference"] for p in pairs] == [r["output"] for r in held]


def test_chat_data_with_val_data(base, tmp_path):
    def conv(i):
        return {"messages": [{"role": "system", "content": "Answer with one word."},
                             {"role": "user", "content": f"word {i}?"},
                             {"role": "assistant", "content": f"w{i % 7}"},
                             {"role": "user", "content": "again?"},
                             {"role": "assistant", "content": f"w{i % 5}"}]}
    data = write_jsonl(tmp_path / "chats.jsonl", [conv(i) for i in range(24)])
    val = write_jsonl(tmp_path / "val.jsonl", [conv(i) for i in range(100, 104)])
    out = tmp_path / "run"
    _train(["--plugin", "chat", "--model", str(base), "--chat-template", "chatml",
            "--data", str(data), "--val-data", str(val), "--output-dir", str(out)], tmp_path)
    _check_report(out, 4, "--val-data")
    pairs = [json.loads(x) for x in
             (out / "eval" / "tasks" / "heldout" / "heldout_pairs.jsonl").read_text().splitlines()]
    assert pairs[0]["messages"][-1] == {"role": "user", "content": "again?"}
    assert pairs[0]["reference"] == "w0"
    (sample_file,) = (out / "eval" / "sft" / "heldout_generate").glob("samples_*.jsonl")
    first = json.loads(sample_file.read_text().splitlines()[0])
    assert "<|im_start|>assistant\n" in first["arguments"]["gen_args_0"]["arg_0"]


def test_pairs_of_a_format_that_does_nothing_special():
    fmt = DatasetFormat(name="qa", to_segments=lambda r: [Segment("Q: " + r["q"] + "\n", False),
                                                          Segment("A: ", False),
                                                          Segment(r["a"], True),
                                                          Segment(" (end)", False)])
    assert fmt.pair({"q": "x", "a": "y"}) == ("Q: x\nA: ", "y")
    none = DatasetFormat(name="n", to_segments=lambda r: [Segment("text", False)])
    with pytest.raises(RecordError, match="no trainable segment"):
        none.pair({})
    tok = DatasetFormat(name="t", to_tokens=lambda r, t, o: ([1], [1]))
    assert not tok.has_pairs


def test_benchmark_option_without_its_plugin_is_an_error(base, tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", alpaca_records(30))
    held = write_jsonl(tmp_path / "held.jsonl", alpaca_records(3, seed=9))
    r = run_cli(["train", "--model", str(base), "--data", str(data), "--alpaca-heldout",
                 str(held), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"],
                env=cli_env(tmp_path))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--alpaca-heldout" in r.stderr and "--plugin alpaca" in r.stderr
    assert not (tmp_path / "run" / "model").exists()
