"""Report and task-building pieces that need no model: markdown/HTML safety, warnings for bad
input, plugin report sections through the real plugin manager, the alpaca task files and the
benchmark spec checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sftctl.plugins.alpaca.tasks import (CHOICE_TASK, EXACT_MATCH_TASK, alpaca_benchmarks,
                                       read_alpaca_records)
from sftctl.evals.report import build_report, markdown_to_html, write_report
from sftctl.evals.spec import BenchmarkSpec, ReportSection, check_task_files, specs_from_json


def _records(n=8, seed=1):
    from sftctl.plugins.alpaca import demo_data
    return demo_data.generate(n, seed=seed)


def _write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ alpaca tasks


def test_alpaca_tasks_write_absolute_yaml_and_prompts(tmp_path):
    from sftctl.plugins.alpaca import demo_data

    recs = _records(20)
    specs = alpaca_benchmarks(recs, tmp_path / "tasks", limit=5)
    assert [s.name for s in specs] == [EXACT_MATCH_TASK, CHOICE_TASK]
    assert all(s.limit == 5 and s.include_path == str((tmp_path / "tasks").resolve()) for s in specs)
    for s in specs:
        check_task_files(s)  # YAML present, data paths absolute and existing
    em = yaml.safe_load((tmp_path / "tasks" / f"{EXACT_MATCH_TASK}.yaml").read_text())
    assert em["output_type"] == "generate_until"
    assert em["generation_kwargs"] == {"until": ["\n"], "do_sample": False,
                                       "max_gen_toks": em["generation_kwargs"]["max_gen_toks"]}
    data = Path(em["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 20
    for row, rec in zip(rows, recs):
        assert row["prompt"] == demo_data.format_prompt(rec)  # byte-identical to training
        assert row["output"] == rec["output"]
        assert row["choices"][row["gold"]] == rec["output"]
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4


def test_alpaca_distractors_prefer_other_instructions_on_the_same_input(tmp_path):
    rec = {"instruction": "Sort the words alphabetically.", "input": "pear apple fig",
           "output": "apple fig pear", "task": "sort_words"}
    other = {"instruction": "Count the words.", "input": "tiger zebra",
             "output": "2", "task": "count_words"}
    alpaca_benchmarks([rec, other], tmp_path)
    row = json.loads((tmp_path / "alpaca_heldout_eval.jsonl").read_text().splitlines()[0])
    # the distractors are answers of the other demo tasks on "pear apple fig", not the other
    # record's answer "2": only reading the instruction tells them apart
    same_input = {"fig apple pear", "PEAR APPLE FIG", "Pear Apple Fig", "pear apple",
                  "apple fig", "3", "pear apple fig"}
    assert row["choices"][row["gold"]] == "apple fig pear"
    distractors = [c for i, c in enumerate(row["choices"]) if i != row["gold"]]
    assert len(distractors) == 3 and set(distractors) <= same_input


def test_alpaca_records_without_distractor_are_left_out_and_counted(tmp_path):
    specs = alpaca_benchmarks([{"instruction": "Say hi.", "output": "hi"}], tmp_path)
    choice = {s.name: s for s in specs}[CHOICE_TASK]
    assert choice.stats["choice_records"] == 0 and choice.stats["left_out_no_distractor"] == 1
    cfg = yaml.safe_load((tmp_path / f"{CHOICE_TASK}.yaml").read_text())
    assert cfg["dataset_kwargs"]["data_files"]["test"].endswith("_choice.jsonl")


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x", "input": ""}', "missing field 'output'"),
    ('{"instruction": "x", "output": 3}', "field 'output' must be a string"),
    ('{"instruction": "x", "output": "  "}', "field 'output' is empty"),
    ('{"instruction": "x", "output": "y"', "invalid JSON line"),
    ('[1, 2]', "expected a JSON object"),
])
def test_alpaca_heldout_errors_name_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path / "held.jsonl", ['{"instruction": "a", "output": "b"}', line])
    with pytest.raises(ValueError, match=rf"held\.jsonl:2: .*{message}"):
        read_alpaca_records(path)


def test_multiline_outputs_stop_at_eos_only(tmp_path):
    recs = [{"instruction": "Two lines.", "output": "a\nb"}, {"instruction": "One.", "output": "c"}]
    specs = alpaca_benchmarks(recs, tmp_path)
    em = yaml.safe_load((tmp_path / f"{EXACT_MATCH_TASK}.yaml").read_text())
    assert em["generation_kwargs"]["until"] == []
    assert specs[0].stats["stop"] == ["EOS"] and specs[0].stats["multiline_outputs"] == 1


# ----------------------------------------------------------------------------------- specs


def test_benchmark_spec_validation_and_round_trip(tmp_path):
    s = BenchmarkSpec(name="t1", include_path=str(tmp_path), limit=3, stats={"n": 1})
    assert BenchmarkSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert BenchmarkSpec(name="hellaswag").builtin
    with pytest.raises(ValueError, match="include_path must be absolute"):
        BenchmarkSpec(name="t", include_path="rel/dir")
    with pytest.raises(ValueError, match="invalid lm-eval task name"):
        BenchmarkSpec(name="bad name")
    with pytest.raises(ValueError, match=r"benchmarks\[1\]: unknown field\(s\) \['colour'\]"):
        specs_from_json([{"name": "a"}, {"name": "b", "colour": 1}], "summary.json: benchmarks")


def test_check_task_files_names_the_problem(tmp_path):
    spec = BenchmarkSpec(name="mytask", include_path=str(tmp_path), plugin="p")
    with pytest.raises(ValueError, match=r"benchmark 'mytask' \(plugin 'p'\): no task YAML"):
        check_task_files(spec)
    (tmp_path / "t.yaml").write_text("task: mytask\ndataset_path: json\ndataset_kwargs:\n"
                                     "  data_files:\n    test: data/rel.jsonl\n")
    with pytest.raises(ValueError, match="must be an absolute path"):
        check_task_files(spec)
    (tmp_path / "t.yaml").write_text(f"task: mytask\ndataset_kwargs:\n  data_files:\n"
                                     f"    test: {tmp_path / 'missing.jsonl'}\n"
                                     "process_results: !function utils.process\n")
    with pytest.raises(ValueError, match="missing.jsonl does not exist"):
        check_task_files(spec)


# ---------------------------------------------------------------------------------- report


def test_markdown_to_html_escapes_and_renders_blocks():
    html = markdown_to_html("# Title\n\nSome <script>alert(1)</script> **bold** and `x<y`.\n\n"
                            "- one\n- [two](javascript:alert(1))\n\n| a | b |\n|---|---|\n"
                            "| 1 | <b>2</b> |\n\n```\n<raw>\n```")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<h3>Title</h3>" in html and "<strong>bold</strong>" in html
    assert "<code>x&lt;y</code>" in html
    assert "<ul><li>one</li>" in html and 'href="javascript' not in html
    assert "<th>a</th>" in html and "<td>&lt;b&gt;2&lt;/b&gt;</td>" in html
    assert "<pre><code>&lt;raw&gt;</code></pre>" in html


def test_report_without_evaluation_warns_and_counts_bad_metric_lines(tmp_path):
    _write(tmp_path / "metrics.jsonl", [
        json.dumps({"kind": "train", "step": 1, "loss": 2.0, "lr": 1e-3}),
        "{not json",
        json.dumps({"kind": "train", "step": 2, "loss": 1.5, "lr": 1e-3}),
        json.dumps({"kind": "val", "step": 2, "val_loss": 1.7, "val_ppl": 5.5}),
        json.dumps({"kind": "train", "loss": 1.0}),  # no step
    ])
    (tmp_path / "summary.json").write_text(json.dumps({"model": "m", "steps": 2,
                                                       "val_loss": float("nan")}))
    paths = write_report(tmp_path)
    report = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(c))
    assert report["run"]["val_loss"] is None
    assert any("1 non-finite number(s) written as null: report.run.val_loss" in w
               for w in report["warnings"])
    assert report["benchmarks"] is None and report["samples"] == []
    assert report["training"]["train_points"] == 2 and report["training"]["val_points"] == 1
    assert any("2 unreadable line(s) skipped (lines 2, 5)" in w for w in report["warnings"])
    assert any("eval/manifest.json not found" in w for w in report["warnings"])
    assert set(report["plots"]) == {"loss", "lr"}
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "No benchmark results." in md and "unreadable line(s)" in html
    _validate_schema(report)  # a report without benchmarks is a valid report too


def _validate_schema(report: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import sftctl.evals

    schema = json.loads((Path(sftctl.evals.__file__).parent / "report.schema.json").read_text())
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()) \
        .validate(report)


def test_plugin_report_sections_through_the_plugin_manager(tmp_path):
    from sftctl.run.plugin_manager import get_plugin_manager, hookimpl

    class Good:
        @hookimpl
        def sftctl_report_sections(self, run_dir, report):
            assert Path(run_dir) == tmp_path.resolve()
            return [{"title": "Data audit", "markdown": "| k | v |\n|---|---|\n| rows | 3 |"},
                    ReportSection(title="Raw", markdown="", html="<p id='raw'>ok</p>")]

    class Bad:
        @hookimpl
        def sftctl_report_sections(self, report):
            raise RuntimeError("boom")

    pm = get_plugin_manager(entry_points=False, extra=[("good_plugin", Good()),
                                                       ("bad_plugin", Bad())])
    report, _ = build_report(tmp_path, pm=pm)
    titles = [(s["title"], s["plugin"]) for s in report["sections"]]
    assert titles == [("Data audit", "good_plugin"), ("Raw", "good_plugin")]
    assert any("plugin 'bad_plugin': sftctl_report_sections failed: RuntimeError: boom" in w
               for w in report["warnings"])
    html = write_report(tmp_path, pm=pm)["html"].read_text()
    assert "<td>rows</td>" in html and "<p id='raw'>ok</p>" in html
    assert "Data audit" in (tmp_path / "report.md").read_text()
    _validate_schema(json.loads((tmp_path / "report.json").read_text()))


def test_post_train_with_a_broken_registration_keeps_the_run_and_says_why(tmp_path, capsys):
    from sftctl.evals.runner import EXIT_BENCHMARK_FAILED, run_post_train

    (tmp_path / "summary.json").write_text(json.dumps({
        "model": "m", "benchmarks": [{"name": "gone", "include_path": str(tmp_path / "nowhere"),
                                      "plugin": "p"}]}))
    assert run_post_train(tmp_path) == EXIT_BENCHMARK_FAILED
    err = capsys.readouterr().err
    assert "cannot evaluate: benchmark 'gone' (plugin 'p'): task folder" in err
    assert (tmp_path / "report.html").is_file()  # the report still says what there is
