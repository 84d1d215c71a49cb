"""The chat plugin: masks against hand-derived spans for six template families, the property that
trained tokens decode to the assistant contents plus end markers, record errors, and the real CLI
(training with a template saved in the checkpoint, ``sftctl data preview``).

The expected spans are written out by hand from each family's published format (the text the
model must produce after its generation prompt), independently of how ``masks.py`` finds them.
Tokenizers are built locally: a byte-level BPE with every template's markers as special tokens.
"""

from __future__ import annotations

import json
import random

import pytest

import sftctl.plugins.chat.conversation as conv_mod
from sftctl.plugins.chat.masks import TemplateError, render_with_mask
from sftctl.plugins.chat.templates import MARKERS, TEMPLATES
from sftctl_testutil import build_tiny_base, cli_env, run_cli, write_jsonl


@pytest.fixture(scope="module")
def tok():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator(["hello there how are you today", "the answer is 42 or 7",
                           "call the weather tool for Paris"] * 3, trainer)
    specials = sorted({m for ms in MARKERS.values() for m in ms} | {"<think>", "</think>"})
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


SYSTEM = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "Hi there"}
A1 = {"role": "assistant", "content": "Hello!"}
U2 = {"role": "user", "content": "2+2?"}
A2 = {"role": "assistant", "content": "4"}
TOOL_CALL = {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function",
                             "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
TOOL_RESULT = {"role": "tool", "content": "sunny"}
A3 = {"role": "assistant", "content": "It is sunny."}


def _train(*msgs):
    return [dict(m, trainable=m["role"] == "assistant") for m in msgs]


# (template, conversation, expected decoded trained spans): what each family's model writes
# after its generation prompt, end-of-turn marker included, nothing after it
CASES = [
    ("chatml", _train(SYSTEM, U1, A1, U2, A2), ["Hello!<|im_end|>", "4<|im_end|>"]),
    ("qwen2.5", _train(U1, A1, U2, A2), ["Hello!<|im_end|>", "4<|im_end|>"]),
    ("qwen2.5", _train(U1, TOOL_CALL, TOOL_RESULT, A3),
     ['<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
      "It is sunny.<|im_end|>"]),
    # Qwen3: the final turn writes a (here empty) think block; the earlier turn is rendered
    # without one in the whole conversation, and its span is that rendering
    ("qwen3", _train(SYSTEM, U1, A1, U2, A2),
     ["Hello!<|im_end|>", "<think>\n\n</think>\n\n4<|im_end|>"]),
    ("qwen3", _train(U1, dict(A1, reasoning_content="greet back"), U2,
                     dict(A2, reasoning_content="2 plus 2")),
     ["Hello!<|im_end|>", "<think>\n2 plus 2\n</think>\n\n4<|im_end|>"]),
    ("llama3", _train(SYSTEM, U1, A1, U2, A2), ["Hello!<|eot_id|>", "4<|eot_id|>"]),
    ("llama3", _train(U1, TOOL_CALL, TOOL_RESULT, A3),
     ['{"name": "weather", "arguments": {"city": "Paris"}}<|eot_id|>', "It is sunny.<|eot_id|>"]),
    ("gemma", _train(SYSTEM, U1, A1, U2, A2), ["Hello!<end_of_turn>", "4<end_of_turn>"]),
    ("mistral", _train(U1, A1, U2, A2), [" Hello!</s>", " 4</s>"]),
    ("phi3", _train(SYSTEM, U1, A1, U2, A2), ["Hello!<|end|>", "4<|end|>"]),
]


@pytest.mark.parametrize("name,msgs,expected", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_masks_match_hand_derived_spans(tok, name, msgs, expected):
    r = render_with_mask(tok, msgs, template=TEMPLATES[name], template_name=name)
    assert [tok.decode(r.ids[s:e]) for s, e in r.spans] == expected
    # the mask is exactly the union of the spans, and nothing else is trained
    want = [0] * len(r.ids)
    for s, e in r.spans:
        want[s:e] = [1] * (e - s)
    assert r.mask == want
    # the ids are the template's own rendering, tokenized as the model will see it
    text = tok.apply_chat_template([{k: v for k, v in m.items() if k != "trainable"}
                                    for m in msgs], tokenize=False, chat_template=TEMPLATES[name])
    assert r.ids == tok(text, add_special_tokens=False)["input_ids"]


def test_untrained_turns_and_last_only(tok):
    msgs = _train(U1, A1, U2, A2)
    msgs[1]["trainable"] = False
    r = render_with_mask(tok, msgs, template=TEMPLATES["chatml"])
    assert [tok.decode(r.ids[s:e]) for s, e in r.spans] == ["4<|im_end|>"]
    rec = {"messages": [U1, dict(A1, weight=0), U2, A2]}
    parsed = conv_mod.to_conversation(rec, conv_mod.LAYOUTS["messages"])
    assert [m["trainable"] for m in parsed] == [False, False, False, True]
    parsed = conv_mod.to_conversation({"messages": [U1, A1, U2, A2]},
                                      conv_mod.LAYOUTS["messages"], train_on="last")
    assert [m["trainable"] for m in parsed] == [False, False, False, True]


WORDS = "alpha beta gamma delta the answer is 42 hello there".split()


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trained_tokens_decode_to_contents_and_end_markers(tok, name, seed):
    """Property: on random multi-turn conversations the trained tokens decode exactly to each
    assistant turn's text as the family writes it, then its end marker."""
    rng = random.Random(seed)
    end = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
           "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>",
           "phi3": "<|end|>"}[name]
    msgs = [] if name == "mistral" else [{"role": "system", "content": "Be brief."}]
    turns = rng.randint(1, 4)
    for _ in range(turns):
        msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 5)))})
        msgs.append({"role": "assistant",
                     "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 5)))})
    msgs = _train(*msgs)
    r = render_with_mask(tok, msgs, template=TEMPLATES[name], template_name=name)
    got = [tok.decode(r.ids[s:e]) for s, e in r.spans]
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    lead = " " if name == "mistral" else ""
    want = [lead + a + end for a in answers]
    if name == "qwen3":  # the final turn carries an empty think block
        want[-1] = "<think>\n\n</think>\n\n" + want[-1]
    assert got == want


def test_template_that_moves_the_system_prompt_is_refused_by_turn(tok):
    """Mistral puts the system prompt before the last user message, so the history of turn 1
    differs from what the whole conversation shows: refused, naming the turn."""
    with pytest.raises(TemplateError, match="not a token prefix") as e:
        render_with_mask(tok, _train(SYSTEM, U1, A1, U2, A2), template=TEMPLATES["mistral"],
                         template_name="mistral")
    assert e.value.turn == 2


def test_role_order_the_template_rejects_is_a_record_error(tok):
    """Gemma's template raises on two user turns in a row: a record error naming the turn (via
    the format's to_tokens), not a crash."""
    from sftctl import RecordError
    from sftctl.plugins.chat import to_tokens

    saved = tok.chat_template
    tok.chat_template = TEMPLATES["gemma"]
    try:
        with pytest.raises(RecordError) as e:
            to_tokens({"messages": [U1, U2, A2]}, tok, {})
        assert "alternate" in e.value.message and e.value.field.startswith("turn")
        ids, mask = to_tokens({"messages": [U1, A2]}, tok, {})
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4<end_of_turn>"
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize("record,field,message", [
    ({"messages": [U1, {"role": "robot", "content": "x"}]}, "messages[1].role", "unknown role"),
    ({"messages": [U1, {"role": "assistant", "content": ""}]}, "messages[1].content", "empty"),
    ({"messages": [U1, {"role": "assistant", "content": 5}]}, "messages[1].content",
     "expected a string"),
    ({"messages": [U1, A1, U2]}, "messages[2]", "must end with an assistant turn"),
    ({"messages": [U1, dict(A1, weight=0.5)]}, "messages[1].weight", "0 or 1"),
    ({"messages": [U1, dict(A1, train=False)]}, "messages", "no assistant turn is trained"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]},
     "conversations[1].value", "missing"),
])
def test_bad_records_name_turn_and_field(record, field, message):
    from sftctl import RecordError
    from sftctl.plugins.chat import parse_record as parse

    with pytest.raises(RecordError) as e:
        parse(record, {})
    assert e.value.field == field and message in e.value.message


def test_layouts_give_the_same_conversation():
    from sftctl.plugins.chat import parse_record as parse

    want = [{"role": "system", "content": "S", "trainable": False},
            {"role": "user", "content": "q", "trainable": False},
            {"role": "assistant", "content": "a", "trainable": True}]
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]}
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a"}]}
    pc = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
          "completion": [{"role": "assistant", "content": "a"}]}
    custom = {"dialog": [{"speaker": "narrator", "text": "S"}, {"speaker": "me", "text": "q"},
                         {"speaker": "ai", "text": "a"}]}
    assert parse(openai, {}) == parse(sharegpt, {}) == parse(pc, {}) == want
    opts = {"chat.layout": "messages", "chat.messages_field": "dialog", "chat.role_field":
            "speaker", "chat.content_field": "text",
            "chat.role_map": "narrator=system,me=user,ai=assistant"}
    assert parse(custom, opts) == want


# ------------------------------------------------------------------------------ the real CLI


def _chat_records(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"messages": [
            {"role": "system", "content": "Answer with digits."},
            {"role": "user", "content": f"add {a} and {b}"},
            {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": "and times two?"},
            {"role": "assistant", "content": str(2 * (a + b))}]})
    return out


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    base = build_tiny_base(tmp / "base")
    data = write_jsonl(tmp / "train.jsonl", _chat_records(48))
    out = tmp / "run"
    r = run_cli(["train", "--plugin", "chat", "--model", str(base), "--data", str(data),
                 "--chat-template", "chatml", "--max-steps", "6", "--batch-size", "4",
                 "--output-dir", str(out), "--no-eval", "--seed", "1"], env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    return {"tmp": tmp, "base": base, "data": data, "out": out, "stderr": r.stderr}


def test_cli_trains_chat_and_saves_the_template(chat_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = chat_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["format"] == "chat" and summary["steps"] == 6
    assert summary["tokens_added"] == 2  # <|im_start|>, <|im_end|>
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template == TEMPLATES["chatml"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # trained tokens per example: 2 answers of 1-2 digits, each with its <|im_end|>
    trained = summary["examples_detail"]["train"]["trainable_tokens"]
    records = _chat_records(48)
    digits = sum(len(tok(m["content"], add_special_tokens=False)["input_ids"])
                 for r in records for m in r["messages"] if m["role"] == "assistant")
    # the loss op skips position 0 only; each example's trained tokens are its answers + markers
    assert trained == digits + 2 * len(records)


def test_preview_shows_exactly_the_trained_tokens(chat_run):
    r = run_cli(["data", "preview", "--plugin", "chat", "--model", str(chat_run["base"]),
                 "--data", str(chat_run["data"]), "--chat-template", "chatml", "-n", "2",
                 "--json"], env=cli_env(chat_run["tmp"]))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    rec = _chat_records(48)[0]["messages"]
    trained = [t for t, m in zip(rows[0]["tokens"], rows[0]["loss_mask"]) if m]
    assert trained.count("<|im_end|>") == 2
    text = r.stdout
    assert "<|im_start|>assistant" in rows[0]["text"] and rec[2]["content"] in text
    r = run_cli(["data", "preview", "--plugin", "chat", "--model", str(chat_run["base"]),
                 "--data", str(chat_run["data"]), "--chat-template", "chatml", "-n", "1"],
                env=cli_env(chat_run["tmp"]))
    assert r.returncode == 0
    assert f"[[{rec[2]['content']}<|im_end|>]]" in r.stdout  # no colour when piped


def test_parquet_and_per_message_flags_through_arrow(chat_run, tmp_path):
    """Parquet (and JSONL) load through Arrow, which gives every message the union of the keys:
    a `train: false` on one message must not make the others invalid, and it is honoured."""
    import pandas as pd

    recs = _chat_records(6)
    recs[0]["messages"][2]["train"] = False          # only this message carries the key
    path = tmp_path / "chats.parquet"
    pd.DataFrame(recs).to_parquet(path)
    r = run_cli(["data", "preview", "--plugin", "chat", "--model", str(chat_run["base"]),
                 "--data", str(path), "--chat-template", "chatml", "-n", "2", "--json"],
                env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    trained = [[t for t, m in zip(row["tokens"], row["loss_mask"]) if m] for row in rows]
    assert trained[0].count("<|im_end|>") == 1      # the first answer opted out
    assert trained[1].count("<|im_end|>") == 2


def test_cli_bad_record_names_file_record_and_turn(chat_run, tmp_path):
    bad = _chat_records(4)
    bad[2]["messages"][3]["role"] = "narrator"
    data = write_jsonl(tmp_path / "bad.jsonl", bad)
    r = run_cli(["train", "--plugin", "chat", "--model", str(chat_run["base"]), "--data",
                 str(data), "--chat-template", "chatml", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "o"), "--no-eval"], env=cli_env(tmp_path))
    assert r.returncode == 2
    assert "bad.jsonl" in r.stderr and "record 2" in r.stderr
    assert "messages[3].role" in r.stderr and "narrator" in r.stderr
    assert not (tmp_path / "o" / "model").exists()


def test_cli_base_model_without_template_is_a_clear_error(chat_run, tmp_path):
    r = run_cli(["train", "--plugin", "chat", "--model", str(chat_run["base"]), "--data",
                 str(chat_run["data"]), "--max-steps", "1", "--output-dir", str(tmp_path / "o"),
                 "--no-eval"], env=cli_env(tmp_path))
    assert r.returncode == 2 and "--chat-template" in r.stderr, r.stderr[-1500:]


# ------------------------------------------------------------- golden run of the embedded default

GOLDEN_YAML = __import__("pathlib").Path(__file__).resolve().parent / "golden" / "chat_golden.yaml"


def _assistant_spans_by_text(tok, text: str) -> list[tuple[int, int]]:
    """Independent of masks.py: character spans of ChatML assistant answers plus their
    <|im_end|>, found by string search on the rendered text."""
    spans, head, end = [], "<|im_start|>assistant\n", "<|im_end|>"
    pos = 0
    while (i := text.find(head, pos)) >= 0:
        s = i + len(head)
        e = text.index(end, s) + len(end)
        spans.append((s, e))
        pos = e
    return spans


def plain_chat_val_loss(model_dir, records) -> float:
    """Token-mean cross-entropy of every assistant answer (+ <|im_end|>) of ``records`` under the
    model, one conversation at a time with F.cross_entropy; the trained tokens come from character
    offsets of the rendered ChatML text, not from the plugin's mask code."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for rec in records:
        text = tok.apply_chat_template(rec["messages"], tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        spans = _assistant_spans_by_text(tok, text)
        trained = [any(s <= a and b <= e for s, e in spans) for a, b in offsets]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        target = torch.tensor(ids[1:])
        mask = torch.tensor(trained[1:])
        losses = F.cross_entropy(logits[:-1], target, reduction="none")
        total += float(losses[mask].sum())
        count += int(mask.sum())
    return total / count


@pytest.fixture(scope="module")
def chat_golden_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat_golden")
    out = tmp / "run"
    r = run_cli(["train", "--config", str(GOLDEN_YAML), "--output-dir", str(out)],
                env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, out


def test_chat_golden_curve_and_independent_anchors(chat_golden_run):
    """The embedded chat run's per-step losses match the stored curve; independently of it, the
    untrained model starts at ln(V) and the final validation loss equals plain PyTorch's over
    the answers found by text search."""
    import math

    from test_cli import check_golden, curve

    from sftctl.plugins.chat import demo_data, demo_model

    tmp, out = chat_golden_run
    got = curve(out)
    check_golden("chat_tiny_fused", got)
    v = len(demo_model.build_tokenizer())
    assert got["train_loss"][0] == pytest.approx(math.log(v), abs=0.1)
    assert got["val_loss"][0] == [0, pytest.approx(math.log(v), abs=0.1)]
    assert got["val_loss"][-1][1] < math.log(v) - 1.0
    opts = yaml_options()
    heldout = demo_data.default_splits(seed=opts["chat.demo_seed"],
                                       n_train=opts["chat.demo_train_size"],
                                       n_heldout=opts["chat.demo_heldout_size"])[1]
    assert got["val_loss"][-1][1] == pytest.approx(plain_chat_val_loss(out / "model", heldout),
                                                   rel=1e-5)


def yaml_options() -> dict:
    import yaml

    return yaml.safe_load(GOLDEN_YAML.read_text())["options"]


def test_chat_packing_keeps_conversations_apart(chat_golden_run, tmp_path):
    """A conversation is a document: packed, the untrained model's validation loss over the same
    conversations equals the unpacked one (attention and targets never cross conversations)."""
    tmp, out0 = chat_golden_run
    out = tmp_path / "packed"
    r = run_cli(["train", "--config", str(GOLDEN_YAML), "--output-dir", str(out), "--packing",
                 "--max-steps", "1", "--model", str(out0 / "base")], env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["packing"] is True
    from test_cli import curve

    packed0 = curve(out)["val_loss"][0]
    plain0 = curve(out0)["val_loss"][0]
    assert packed0[0] == plain0[0] == 0
    assert packed0[1] == pytest.approx(plain0[1], rel=1e-5)


def test_embedded_chat_default_is_benchmarked_with_the_chat_template(tmp_path):
    """`sftctl train --plugin chat` (shortened) ends with lm-eval's multi-turn benchmark on base
    and SFT: prompts are the conversation so far in the model's chat template, ending with the
    assistant header, and the score is the last answer's exact match."""
    out = tmp_path / "run"
    r = run_cli(["train", "--plugin", "chat", "--max-steps", "3", "--eval-limit", "3",
                 "--chat-demo-train-size", "60", "--chat-demo-heldout-size", "6",
                 "--output-dir", str(out), "--quiet"], env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = [b for b in report["benchmarks"]["table"] if b["task"] == "chat_multiturn_exact_match"]
    assert [(b["metric"], b["status"]) for b in rows] == [("exact_match",
                                                          {"base": "ok", "sft": "ok"})]
    assert rows[0]["base"] is not None and rows[0]["sft"] is not None
    samples = sorted((out / "eval" / "sft" / "chat_multiturn_exact_match").glob("samples_*"))
    assert samples, list((out / "eval").rglob("*"))
    first = json.loads(samples[0].read_text().splitlines()[0])
    prompt = first["arguments"]["gen_args_0"]["arg_0"]
    history = first["doc"]["history"]
    assert prompt.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{history[-1]['content']}<|im_end|>\n" in prompt
    assert first["target"] == first["doc"]["answer"] and "exact_match" in first
    for model in ("base", "sft"):
        status = json.loads((out / "eval" / model / "chat_multiturn_exact_match" /
                             "status.json").read_text())
        assert status["status"] == "ok", status
