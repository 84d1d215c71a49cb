"""`sftctl eval` on par with `train` (issue 15, part 3): --config, plugin options, --threads,
--heldout, --include-path, --num-fewshot, --apply-chat-template, --online, and the loud warning
for demo data on a user's checkpoint. Real CLI subprocesses, real lm-eval, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftctl_testutil import alpaca_records, build_tiny_base, cli_env, run_cli, write_jsonl

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    base = build_tiny_base(root / "base", seed=0)
    sft = build_tiny_base(root / "sft", seed=1)  # a plain HF checkpoint, no run directory
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(sft)
    return root, base, sft


def _one(folder: Path, pattern: str) -> dict:
    (path,) = sorted(folder.glob(pattern))
    return json.loads(path.read_text())


def test_config_heldout_threads_and_demo_data_warning(models, tmp_path):
    root, base, sft = models
    heldout = write_jsonl(tmp_path / "mine.jsonl", alpaca_records(6, seed=5))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("plugins: [alpaca]\neval: {limit: 2}\ntrain: {threads: 1}\n")
    out = tmp_path / "out"
    r = run_cli(["eval", str(sft), "--base", str(base), "--config", str(cfg), "--heldout",
                 str(heldout), "--tasks", "alpaca_exact_match", "--output-dir", str(out)],
                env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "eval" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["alpaca_exact_match", "heldout_generate",
                                                      "heldout_nll"]
    assert manifest["options"]["threads"] == 1 and manifest["options"]["online"] is False
    for label, model in (("base", base), ("sft", sft)):
        info = json.loads((out / "eval" / label / "model_info.json").read_text())
        assert info["threads"] == 1 and info["offline_env"]["HF_HUB_OFFLINE"] == "1"
        res = _one(out / "eval" / label / "heldout_generate", "results_*.json")
        assert res["config"]["model_args"]["pretrained"] == str(model)
        assert res["n-samples"]["heldout_generate"]["effective"] == 2
    # the demo benchmark on a checkpoint not trained on it: a warning line and a report warning
    assert "WARNING: alpaca_exact_match (plugin alpaca) benchmarks the plugin's built-in DEMO" \
        in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert any("DEMO data" in w for w in report["warnings"])
    assert "DEMO data" in (out / "report.md").read_text()
    gen = next(t for t in report["benchmarks"]["tasks"] if t["name"] == "heldout_generate")
    assert gen["stats"]["records"] == 6 and "--heldout" in gen["stats"]["source"]
    assert {row["task"] for row in report["benchmarks"]["table"]} >= {"heldout_generate",
                                                                      "heldout_nll"}


def test_include_path_fewshot_chat_template_online(models, tmp_path):
    root, base, sft = models
    data = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"copy {w}:", "a": f" {w}"}
                                               for w in ("red", "blue", "green", "gold")])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_copy.yaml").write_text(
        "task: my_copy\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {data}}}}}\n"
        "test_split: test\nfewshot_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "output_type: generate_until\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 4, do_sample: false}\n"
        "metric_list: [{metric: exact_match}]\nmetadata: {version: 1.0}\n")
    env = cli_env(tmp_path)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(k)
    out = tmp_path / "out"
    r = run_cli(["eval", str(sft), "--base", "none", "--include-path", str(tasks),
                 "--num-fewshot", "1", "--apply-chat-template", "--online", "--limit", "2",
                 "--output-dir", str(out)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--online: downloads allowed for this evaluation" in r.stderr
    info = json.loads((out / "eval" / "sft" / "model_info.json").read_text())
    assert set(info["offline_env"].values()) == {None}  # the worker was not forced offline
    res = _one(out / "eval" / "sft" / "my_copy", "results_*.json")
    assert res["n-shot"]["my_copy"] == 1 and res["n-samples"]["my_copy"]["effective"] == 2
    assert res["config"]["model_args"]["pretrained"] == str(sft)
    assert res["chat_template"] == TEMPLATE
    sample = json.loads(next((out / "eval" / "sft" / "my_copy").glob("samples_*.jsonl"))
                        .read_text().splitlines()[0])
    prompt = sample["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("<|user|>copy") and prompt.endswith("<|assistant|>")
    report = json.loads((out / "report.json").read_text())
    assert [t["name"] for t in report["benchmarks"]["tasks"]] == ["my_copy"]


def test_bad_eval_input_is_named_and_exits_2(models, tmp_path):
    root, base, sft = models
    write_jsonl(tmp_path / "x.jsonl", alpaca_records(3))  # exists: refused for want of --plugin
    for args, needle in (
            (["--include-path", str(tmp_path / "nope")], "--include-path:"),
            (["--alpaca-heldout", str(tmp_path / "x.jsonl")], "--alpaca-heldout"),
            (["--heldout", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
            (["--config", str(tmp_path / "none.yaml")], "none.yaml"),
            (["--num-fewshot", "-1"], "--num-fewshot")):
        r = run_cli(["eval", str(sft), "--base", "none", "--output-dir", str(tmp_path / "o"),
                     *args], env=cli_env(tmp_path))
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert needle in r.stderr, (args, r.stderr[-2000:])
