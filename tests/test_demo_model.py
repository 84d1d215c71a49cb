"""The project-built tokenizer and tiny Llama: determinism, round trips, save/load equality."""

import json

import pytest
import torch

from sftctl.plugins.alpaca import demo_data, demo_model


@pytest.fixture(scope="module")
def corpus():
    # A small corpus keeps the tests fast; the default build uses the full training split.
    return demo_data.generate(1300, seed=0)


@pytest.fixture(scope="module")
def tok(corpus):
    return demo_model.build_tokenizer(corpus)


def test_tokenizer_is_deterministic(corpus, tok):
    again = demo_model.build_tokenizer(corpus)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_special_tokens_and_no_automatic_specials(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    # Encoding adds nothing: training (which appends EOS itself) and lm-eval see the same ids.
    assert tok("apple")["input_ids"] == tok("apple", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", [
    "Héllo wörld! 12345 \t tabs\n\nnew line ✓ 😀",
    "def f(x):\n    return x ** 2  # comment",
    "   leading and trailing spaces   ",
    "混合 текст and ### Response:\n inside",
    "",
])
def test_arbitrary_text_round_trips_without_unk(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_words_and_template_are_compact_digits_split(tok, corpus):
    for w in demo_data.WORDS:
        for form in (w, w.upper(), w.capitalize()):
            assert len(tok(form)["input_ids"]) == 1, form
    ids = tok("12 345")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:2] == ["1", "2"] and len(ids) == 6
    rec = next(r for r in corpus if r["input"])
    # The fixed template text costs three tokens, whatever the instruction.
    n_fields = sum(len(tok(rec[f])["input_ids"]) for f in ("instruction", "input"))
    assert len(tok(demo_data.format_prompt(rec))["input_ids"]) == n_fields + 3


def test_prompt_response_boundary_is_stable(tok, corpus):
    for rec in corpus[:300]:
        p = demo_data.format_prompt(rec)
        assert tok(p + rec["output"])["input_ids"] == tok(p)["input_ids"] + tok(rec["output"])["input_ids"]


def test_tokenizer_save_load_round_trip(tok, corpus, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok)
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id
    for rec in corpus[:50]:
        text = demo_data.format_prompt(rec) + rec["output"]
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(tok(text)["input_ids"]) == text


def test_bad_corpus_record_is_named(corpus):
    bad = list(corpus[:3]) + [{"instruction": "x", "input": 5, "output": "y"}]
    with pytest.raises(ValueError, match=r"record 3: field 'input'"):
        demo_model.build_tokenizer(bad)


def test_model_config_and_unknown_config():
    cfg = demo_model.load_model_config()
    assert cfg["model_type"] == "llama"
    with pytest.raises(FileNotFoundError, match="tiny_llama"):
        demo_model.load_model_config("nope")


def test_build_model_is_seeded_and_leaves_global_rng_alone(tok):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = demo_model.build_model(tok, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = demo_model.build_model(tok, seed=0)
    c = demo_model.build_model(tok, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert a.config.vocab_size == len(tok)
    assert a.config.eos_token_id == tok.eos_token_id and a.config.pad_token_id == tok.pad_token_id


def test_default_base_reloads_with_identical_logits(tmp_path, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = demo_model.build_default_base(tmp_path / "base", seed=0, corpus_records=corpus)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    fresh = demo_model.build_model(demo_model.build_tokenizer(corpus), seed=0).eval()
    batch = tok([demo_data.format_prompt(r) for r in corpus[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = model(**batch).logits    # [B, T, V]
        want = fresh(**batch).logits   # [B, T, V]
    assert torch.equal(got, want)
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_untrained_model_does_not_solve_tasks(tmp_path, tok, corpus):
    model = demo_model.build_model(tok, seed=0).eval()
    rec = corpus[0]
    enc = tok(demo_data.format_prompt(rec), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.split("\n")[0].strip() != rec["output"]
