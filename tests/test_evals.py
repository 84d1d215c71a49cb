"""Post-training evaluation end to end: real lm-eval on a real tiny checkpoint, and the report.

One module-scoped run directory is built from real pieces (no mocks): the project's tokenizer and
a shrunk Llama saved with ``save_pretrained`` as the base model, the same model fine-tuned for a
few dozen steps on the held-out answers (so the SFT checkpoint measurably differs from the base),
a metrics.jsonl and a summary.json. It registers the two alpaca tasks plus a task that raises
inside lm-eval, and ``run_post_train`` evaluates both models once; every test reads that run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")

from sftctl.plugins.alpaca import demo_data, demo_model  # noqa: E402
from sftctl.plugins.alpaca.tasks import CHOICE_TASK, EXACT_MATCH_TASK, alpaca_benchmarks  # noqa: E402
from sftctl.evals.runner import EXIT_BENCHMARK_FAILED, run_post_train  # noqa: E402
from sftctl.evals.spec import BenchmarkSpec  # noqa: E402

N_HELDOUT = 12
BROKEN = "broken_task"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32}
STEPS = 100


def _train_tiny(model, tok, records, steps: int, metrics_path: Path) -> None:
    """Full-batch SFT steps on prompt -> response (loss on the response only). A test fixture,
    not the product trainer: it only has to make the checkpoint answer its held-out prompts."""
    torch.manual_seed(0)
    lr0 = 5e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr0, weight_decay=0.0)
    pairs = [(tok(demo_data.format_prompt(r)).input_ids,
              tok(r["output"]).input_ids + [tok.eos_token_id]) for r in records]
    width = max(len(p) + len(o) for p, o in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id)  # [B, T]
    labels = torch.full((len(pairs), width), -100)  # [B, T]
    for i, (p, o) in enumerate(pairs):
        ids[i, :len(p) + len(o)] = torch.tensor(p + o)
        labels[i, len(p):len(p) + len(o)] = torch.tensor(o)
    t0 = time.time()
    with metrics_path.open("w", encoding="utf-8") as f:
        for step in range(1, steps + 1):
            lr = lr0 * min(1.0, step / 5)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            f.write(json.dumps({"kind": "train", "step": step, "epoch": 0, "loss": loss.item(),
                                "lr": lr, "tokens": int((labels != -100).sum()),
                                "tokens_total": 0, "tokens_per_s": 0.0, "grad_norm": None,
                                "time": time.time() - t0}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"kind": "val", "step": step, "val_loss": loss.item(),
                                    "val_ppl": float(torch.exp(loss).item())}) + "\n")


def _broken_task(work_dir: Path, data: Path) -> BenchmarkSpec:
    """A local task that raises inside lm-eval (its target template divides by zero)."""
    (work_dir / f"{BROKEN}.yaml").write_text(
        f"task: {BROKEN}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{ 1 // 0 }}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\nmetadata:\n  version: 1.0\n", encoding="utf-8")
    return BenchmarkSpec(name=BROKEN, include_path=str(work_dir), plugin="test",
                         description="raises on purpose")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    mp = pytest.MonkeyPatch()  # lm-eval's json data sets are cached privately, then forgotten
    mp.setenv("HF_DATASETS_CACHE", str(root / "hf_datasets_cache"))
    run_dir = root / "run"
    _, heldout = demo_data.default_splits(seed=0, n_train=0, n_heldout=N_HELDOUT)
    corpus = demo_data.generate(300, seed=5) + heldout
    tok = demo_model.build_tokenizer(corpus, vocab_size=600)
    base = demo_model.build_model(tok, seed=0, overrides=TINY)
    base.save_pretrained(run_dir / "base")
    tok.save_pretrained(run_dir / "base")
    _train_tiny(base, tok, heldout, steps=STEPS, metrics_path=run_dir / "metrics.jsonl")
    base.save_pretrained(run_dir / "model")  # now fine-tuned
    tok.save_pretrained(run_dir / "model")
    heldout_path = demo_data.write_jsonl(heldout, run_dir / "eval" / "alpaca_heldout.jsonl")
    specs = alpaca_benchmarks(heldout_path, run_dir / "eval" / "tasks")
    specs.append(_broken_task(run_dir / "eval" / "tasks",
                              run_dir / "eval" / "tasks" / "alpaca_heldout_eval.jsonl"))
    summary = {"model": "tiny llama (test)", "base_model": str(run_dir / "base"),
               "data": ["demo"], "examples": {"used": N_HELDOUT, "truncated": 0, "dropped": 0,
                                              "skipped": 0},
               "steps": STEPS, "tokens": 1234, "wall_time_s": 12.5, "tokens_per_s": 98.7,
               "peak_memory_bytes": 123456789, "loss_kernel": "torch", "device": "cpu",
               "versions": {"torch": torch.__version__},
               "benchmarks": [s.to_dict() for s in specs]}
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    rc = run_post_train(run_dir)
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    yield {"dir": run_dir, "rc": rc, "report": report, "heldout": heldout}
    mp.undo()


def _table(report, task, metric):
    rows = [r for r in report["benchmarks"]["table"] if r["task"] == task and r["metric"] == metric]
    assert len(rows) == 1, rows
    return rows[0]


def test_figures_match_lm_eval_results_files(run):
    report, eval_dir = run["report"], run["dir"] / "eval"
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    checked = 0
    for label in ("base", "sft"):
        for task, metrics in ((EXACT_MATCH_TASK, ["exact_match"]), (CHOICE_TASK, ["acc", "acc_norm"])):
            st = manifest["runs"][label][task]
            assert st["status"] == "ok", st
            files = sorted((eval_dir / label / task).glob("results_*.json"))
            assert [eval_dir / st["results_file"]] == files  # lm-eval's own file, one per run
            lm = json.loads(files[0].read_text())
            assert lm["n-samples"][task]["effective"] == N_HELDOUT
            for m in metrics:
                row = _table(report, task, m)
                assert row[label] == lm["results"][task][f"{m},none"]
                assert row[f"{label}_stderr"] == lm["results"][task][f"{m}_stderr,none"]
                checked += 1
    assert checked == 6
    em = _table(report, EXACT_MATCH_TASK, "exact_match")
    assert em["delta"] == pytest.approx(em["sft"] - em["base"])
    # the fine-tuned checkpoint answers held-out prompts it was tuned on; the untrained base can't
    assert em["base"] == 0.0
    assert em["sft"] >= 0.5
    assert report["benchmarks"]["lm_eval_version"]
    tasks = {t["name"]: t for t in report["benchmarks"]["tasks"]}
    assert tasks[EXACT_MATCH_TASK]["version"] == 1.0
    assert tasks[CHOICE_TASK]["stats"]["choice_records"] == N_HELDOUT


def test_side_by_side_samples_come_from_lm_eval_logs(run):
    report, run_dir = run["report"], run["dir"]
    samples = report["samples"]
    assert 0 < len(samples) <= 6 and all(s["task"] == EXACT_MATCH_TASK for s in samples)
    info = {t["name"]: t for t in report["benchmarks"]["tasks"]}[EXACT_MATCH_TASK]
    logged = {}
    for label in ("base", "sft"):
        with (run_dir / info["samples_files"][label]).open() as f:
            logged[label] = {json.loads(line)["doc_id"]: json.loads(line) for line in f}
    for s in samples:
        assert s["target"] == run["heldout"][s["doc_id"]]["output"]
        for label in ("base", "sft"):
            assert s["responses"][label] == logged[label][s["doc_id"]]["filtered_resps"][0]
            assert s["scores"][label] == logged[label][s["doc_id"]]["exact_match"]


def test_failing_benchmark_is_recorded_and_others_still_reported(run):
    assert run["rc"] == EXIT_BENCHMARK_FAILED
    report = run["report"]
    errors = {(e["model"], e["task"]): e for e in report["benchmarks"]["errors"]}
    assert set(errors) == {("base", BROKEN), ("sft", BROKEN)}
    assert "ZeroDivisionError" in errors[("sft", BROKEN)]["error"]
    assert "Traceback" in errors[("sft", BROKEN)]["traceback"]
    row = _table(report, BROKEN, "-")
    assert row["status"] == {"base": "error", "sft": "error"} and row["sft"] is None
    ok = [r for r in report["benchmarks"]["table"] if r["task"] != BROKEN]
    assert len(ok) == 3 and all(r["status"] == {"base": "ok", "sft": "ok"} for r in ok)
    md = (run["dir"] / "report.md").read_text()
    assert "Failed benchmarks" in md and BROKEN in md and "ZeroDivisionError" in md
    html = (run["dir"] / "report.html").read_text()
    assert "ZeroDivisionError" in html


def test_report_summary_and_training_sections(run):
    report = run["report"]
    assert report["schema_version"] == 1
    assert report["run"]["examples"] == {"used": N_HELDOUT, "truncated": 0, "dropped": 0,
                                         "skipped": 0}
    tr = report["training"]
    assert tr["train_points"] == STEPS and tr["val_points"] == STEPS // 10
    assert tr["final_train_loss"] < tr["first_train_loss"]
    assert set(report["plots"]) == {"loss", "lr", "benchmarks"}
    for rel in report["plots"].values():
        assert (run["dir"] / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run["dir"] / "report.md").read_text()
    for text in ("peak memory", "117.7 MiB", "loss kernel", "tokens/s", "![loss curves]"):
        assert text in md, text


def test_report_regenerates_from_the_run_dir_alone(run, tmp_path):
    moved = tmp_path / "moved_run"
    shutil.copytree(run["dir"], moved)
    for name in ("report.json", "report.md", "report.html"):
        (moved / name).unlink()
    shutil.rmtree(moved / "report_assets")
    env = {**os.environ, "SFTCTL_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "sftctl", "report", str(moved)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((moved / "report.json").read_text())
    first = run["report"]
    for key in ("benchmarks", "samples", "run", "training", "plots"):
        a, b = json.dumps(first[key], sort_keys=True), json.dumps(again[key], sort_keys=True)
        # eval/manifest.json keeps the absolute model paths of the original location
        b = b.replace(str(moved), "<RUN>").replace(str(run["dir"]), "<RUN>")
        assert a.replace(str(run["dir"]), "<RUN>") == b, key
    assert again["run_dir"] == str(moved)
    assert (moved / "report_assets" / "loss.png").read_bytes() == \
        (run["dir"] / "report_assets" / "loss.png").read_bytes()


def test_html_is_self_contained(run):
    html = (run["dir"] / "report.html").read_text()
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(imgs) == 3 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert 'id="benchmark-table"' in html and 'id="samples-table"' in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_PROBE = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({
    images: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 50).length,
    rows: document.querySelectorAll('#benchmark-table tbody tr').length,
    tableVisible: document.getElementById('benchmark-table').getBoundingClientRect().height > 50,
    errors: window.__errors});
  document.body.appendChild(out);
});
</script>
"""


def _chromium(args, tmp_path):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome-profile'}", "--hide-scrollbars"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run "
                                              "installs it; apt-get install chromium)")
def test_html_renders_in_headless_chromium(run, tmp_path):
    report_html = run["dir"] / "report.html"
    shot = tmp_path / "report.png"
    proc = _chromium(["--window-size=1200,2400", f"--screenshot={shot}",
                      report_html.as_uri()], tmp_path)
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    colors = img.resize((120, 240)).getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 50  # text, table lines and plots, not a blank page
    # The same page with a probe script appended: images decoded, table rows present, no errors.
    probe = tmp_path / "probe.html"
    probe.write_text(report_html.read_text().replace("</body>", _PROBE + "</body>"))
    proc = _chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path)
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, proc.stderr[-2000:]
    result = json.loads(m.group(1).replace("&quot;", '"'))
    assert result == {"images": 3, "loaded": 3, "rows": 4, "tableVisible": True, "errors": []}
    shutil.copy(shot, run["dir"] / "report_screenshot.png")  # kept for a person to look at


def test_eval_command_records_unavailable_models_and_data_and_still_scores(run, tmp_path):
    """`sftctl eval` with a base model that cannot be loaded and a standard lm-eval task whose
    data set is not in the (private, empty) cache: both are reported, the rest is scored."""
    out = tmp_path / "eval_out"
    env = {**os.environ, "SFTCTL_DISABLE_PLUGIN_AUTOLOAD": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "empty_cache"), "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "sftctl", "eval", str(run["dir"] / "model"),
         "--base", str(tmp_path / "no_such_model"), "--tasks", EXACT_MATCH_TASK, "lambada_openai",
         "--limit", "3", "--output-dir", str(out), "--quiet"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_BENCHMARK_FAILED, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    errors = {(e["model"], e["task"]): e["error"] for e in report["benchmarks"]["errors"]}
    assert set(errors) == {("base", EXACT_MATCH_TASK), ("base", "lambada_openai"),
                           ("sft", "lambada_openai")}
    assert "cannot load model" in errors[("base", EXACT_MATCH_TASK)]
    assert "no_such_model" in errors[("base", EXACT_MATCH_TASK)]
    assert "not in the local Hugging Face cache" in errors[("sft", "lambada_openai")]
    row = _table(report, EXACT_MATCH_TASK, "exact_match")
    assert row["status"] == {"base": "error", "sft": "ok"} and row["delta"] is None
    lm = json.loads(next((out / "eval" / "sft" / EXACT_MATCH_TASK).glob("results_*.json")).read_text())
    assert lm["n-samples"][EXACT_MATCH_TASK]["effective"] == 3
    assert row["sft"] == lm["results"][EXACT_MATCH_TASK]["exact_match,none"]
    assert (out / "eval" / "sft" / "worker_output.log").is_file()  # --quiet: output to the log


def test_checkpoint_only_evaluation_reports_without_a_base(run, tmp_path, monkeypatch):
    """Also as under torchrun (rank-0 evaluates): the worker must not join the training's
    process group through the inherited rendezvous variables."""
    import dataclasses

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}.items():
        monkeypatch.setenv(k, v)

    from sftctl.evals.report import write_report
    from sftctl.evals.runner import EvalOptions, evaluate_models

    summary = json.loads((run["dir"] / "summary.json").read_text())
    spec = next(BenchmarkSpec.from_dict(d) for d in summary["benchmarks"]
                if d["name"] == EXACT_MATCH_TASK)
    manifest = evaluate_models({"sft": str(run["dir"] / "model")},
                               [dataclasses.replace(spec, limit=2)], tmp_path,
                               EvalOptions(quiet=True, timeout_s=300))
    assert manifest["runs"]["sft"][EXACT_MATCH_TASK]["status"] == "ok"
    report = json.loads(write_report(tmp_path)["json"].read_text())
    (row,) = report["benchmarks"]["table"]
    assert "base" not in row and row["delta"] is None and row["sft"] is not None
    assert report["benchmarks"]["labels"] == ["sft"] and "benchmarks" in report["plots"]
    assert all(set(s["responses"]) == {"sft"} for s in report["samples"])


def test_loglikelihood_scores_exactly_the_response_tokens(run):
    """The worker's lm-eval model keeps the prompt whole when its tokens are a prefix of
    prompt + response, so the scored continuation is exactly the trained response tokens."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from sftctl.evals.runner import _hf_model_class

    model_dir = str(run["dir"] / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    # the project's tokenizer holds the response marker as one added token (demo_model.py):
    # the case where lm-eval's own split goes wrong
    assert "\n\n### Response:\n" in tok.get_vocab()
    lm = _hf_model_class()(pretrained=model_dir, device="cpu", batch_size=1, dtype="float32")
    for rec in run["heldout"][:4]:
        prompt, out = demo_data.format_prompt(rec), rec["output"]
        ctx, cont = lm._encode_pair(prompt, out)
        assert ctx == tok(prompt).input_ids and cont == tok(out).input_ids
        # lm-eval's own rule moves the prompt's final newline into the continuation and splits
        # inside the template token: the scored tokens are not the response's
        assert HFLM._encode_pair(lm, prompt, out)[1] != cont


def test_report_matches_the_published_schema(run):
    """The real report of this run (a failed benchmark included) validates against
    evals/report.schema.json, the schema the package ships (tests/test_steering.py checks that
    broken reports fail)."""
    jsonschema = pytest.importorskip("jsonschema")
    import sftctl.evals

    schema = json.loads((Path(sftctl.evals.__file__).parent / "report.schema.json").read_text())
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()) \
        .validate(run["report"])
    assert run["report"]["benchmarks"]["errors"] and run["report"]["steering"] is None


def test_eval_set_reaches_the_keys_eval_reads_and_refuses_the_others(tmp_path):
    """``sftctl eval --set KEY=VALUE``: the keys sftctl eval reads land in its config (after the
    flags); any other key is an error naming it, never silently ignored."""
    from sftctl.errors import ConfigError
    from sftctl.evals.cli import _eval_config
    from sftctl.run.cli import build_parser
    from sftctl.run.plugin_manager import get_plugin_manager

    pm = get_plugin_manager(entry_points=False)
    options = pm.config_options()
    parser = build_parser(pm, options)

    def cfg_of(*extra):
        args = parser.parse_args(["eval", str(tmp_path), "--limit", "7", *extra])
        return _eval_config(args, pm, options, None, tmp_path)[0]

    cfg = cfg_of("--set", "eval.limit=3", "--set", "eval.tasks=[a, b]", "--set",
                 "train.threads=1", "--set", "options.alpaca.heldout=/x/h.jsonl")
    assert (cfg.eval.limit, cfg.eval.tasks, cfg.train.threads) == (3, ["a", "b"], 1)
    assert cfg.option("alpaca.heldout") == "/x/h.jsonl"
    assert cfg_of().eval.limit == 7
    for item, message in (("optim.lr=1", "--set optim.lr: sftctl eval does not read this key"),
                          ("eval.limit", "--set 'eval.limit': expected KEY=VALUE"),
                          ("eval.limit=0", "eval.limit: 0 is below the minimum 1"),
                          ("options.alpaca.nope=1", "nope")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            cfg_of("--set", item)
