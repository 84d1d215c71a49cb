"""The fused output layer (sftctl.training.head): loss and gradients equal the model's own forward.

What is checked
- For real transformers architectures built from tiny configs (Llama, Qwen2, Gemma-2 with its
  final logit softcap, Cohere with its logit scale, Granite with its logits divisor), tied and
  untied: the loss the fused head computes inside the model's forward, and the gradient of every
  parameter, equal ``model(...).logits`` + a float64 cross-entropy of those logits (the model's
  own transforms included), per element. With label smoothing and z-loss too.
- The setup probe: a model that changes its head's output in a way the config does not declare,
  or a head that is not a plain ``nn.Linear`` (peft's ``modules_to_save``/LoRA on ``lm_head``),
  is refused with a reason; the trainer then counts the fallback (log, summary.json) and trains
  on logits + cross-entropy; ``--fused-head on`` makes it an error.
- The real CLI on the golden config: the per-step losses of the default path (fused head) equal
  ``--loss-impl torch`` within 1e-5 relative, and summary.json names the path.
- CUDA (skipped without): bf16 autocast, the fused loss against a float64 loss of the same bf16
  hidden states and weight, and against the model's own bf16 forward.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sftctl_testutil import (alpaca_records, build_tiny_base, cli_env, read_metrics, run_cli,
                             write_jsonl)
from sftctl_testutil import no_installed_plugins  # noqa: F401 (autouse)

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHS = ["llama", "qwen2", "gemma2", "cohere", "granite"]


def tiny_model(arch: str, tied: bool, seed: int = 0):
    import transformers as tf

    extra = {}
    if arch == "gemma2":  # softcap low enough that it bends the logits of this test
        extra = dict(final_logit_softcapping=1.5, attn_logit_softcapping=50.0, sliding_window=8,
                     query_pre_attn_scalar=8)
    elif arch == "cohere":
        extra = dict(logit_scale=0.37)
    elif arch == "granite":
        extra = dict(logits_scaling=2.5, embedding_multiplier=3.0, residual_multiplier=0.5,
                     attention_multiplier=0.2)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "gemma2": tf.Gemma2Config,
           "cohere": tf.CohereConfig, "granite": tf.GraniteConfig}[arch]
    cfg = cls(**COMMON, tie_word_embeddings=tied, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger logits than the default init, so the transforms matter
        model.get_output_embeddings().weight.mul_(40.0)
        if not tied:
            model.get_input_embeddings().weight.normal_(0, 1.0)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    return model


def batch(seed: int = 1, B: int = 3, T: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)                    # [B, T]
    labels = torch.randint(0, V, (B, T), generator=g)                 # [B, T]
    labels[torch.rand(B, T, generator=g) < 0.35] = -100               # a prompt-like mask
    labels[0, :4] = -100
    return ids, labels


def reference_loss(model, ids, labels, eps=0.0, z=0.0):
    """The model's own logits (its transforms included), a float64 loss, token mean."""
    from sftctl.training.loss import _torch_loss_sum_with_options

    logits = model(input_ids=ids, use_cache=False).logits            # [B, T, V]
    x = logits.reshape(-1, V).double()
    t = labels.reshape(-1)
    total = _torch_loss_sum_with_options(x, t, eps, z) if (eps or z) else \
        torch.nn.functional.cross_entropy(x, t, ignore_index=-100, reduction="sum")
    return total / (t != -100).sum()


def fused_loss(fused, model, ids, labels, eps=0.0, z=0.0, rows=True):
    from sftctl.training.head import HeadRequest, posted, target_rows

    n = (labels != -100).sum().float()
    req = HeadRequest(labels=labels, rows=target_rows(labels) if rows else None, normalizer=n,
                      label_smoothing=eps, z_loss=z)
    with posted(fused, req):
        out = model(input_ids=ids, use_cache=False)
    assert out.logits.shape == (*ids.shape, 0)  # no logits were made
    return req.loss


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_head_equals_the_models_forward(arch, tied):
    from sftctl.training.head import FusedHead

    model = tiny_model(arch, tied)
    ids, labels = batch()
    ref = reference_loss(model, ids, labels)
    ref.backward()
    g_ref = grads(model)
    model.zero_grad(set_to_none=True)

    fused, why = FusedHead.plan(model)
    assert why is None and fused is not None
    assert fused.tied == tied
    t = fused.transform
    if arch == "gemma2":
        assert t == {"softcap": 1.5, "logit_scale": None}
    elif arch == "cohere":
        assert t == {"softcap": None, "logit_scale": pytest.approx(0.37)}
    elif arch == "granite":
        assert t == {"softcap": None, "logit_scale": pytest.approx(1 / 2.5)}
    else:
        assert t == {"softcap": None, "logit_scale": None}
    loss = fused_loss(fused, model, ids, labels)
    loss.backward()
    g = grads(model)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=2e-6)
    assert g.keys() == g_ref.keys() and len(g) > 10
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name].float(), rtol=1e-4, atol=1e-6, msg=name)
    # the transform matters at these logits: without it the loss would be visibly different
    if arch != "llama" and arch != "qwen2":
        saved = dict(model.get_output_embeddings()._sftctl_transform)
        model.get_output_embeddings()._sftctl_transform.update(softcap=None, logit_scale=None)
        plain = fused_loss(fused, model, ids, labels)
        model.get_output_embeddings()._sftctl_transform.update(saved)
        assert abs(float(plain.detach()) - float(ref.detach())) > 1e-3 * abs(float(ref.detach()))
    # off again: a plain linear, same logits as before the install
    fused.uninstall()
    assert type(model.get_output_embeddings()) is torch.nn.Linear


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fused_head_with_label_smoothing_and_z_loss_and_all_rows(arch):
    from sftctl.training.head import FusedHead

    model = tiny_model(arch, tied=arch == "llama")
    ids, labels = batch(seed=5)
    ref = reference_loss(model, ids, labels, eps=0.1, z=1e-3)
    ref.backward()
    g_ref = grads(model)
    model.zero_grad(set_to_none=True)
    fused, _ = FusedHead.plan(model)
    loss = fused_loss(fused, model, ids, labels, eps=0.1, z=1e-3, rows=False)  # every row
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=2e-6)
    for name, gr in grads(model).items():
        torch.testing.assert_close(gr, g_ref[name].float(), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "granite"])
def test_tied_embedding_rows_go_into_the_head_gradient(arch, device):
    """route_embedding_grad: every parameter's gradient still equals the model's own forward +
    a float64 loss, over two accumulated backward passes and with the padding id among the
    inputs (its row takes no embedding gradient); the tied weight's AccumulateGrad has one
    incoming edge (the head's), so autograd builds no dense [V, H] embedding gradient; the
    lookup without grad and after uninstalling is the plain one."""
    from sftctl.training.head import FusedHead, RowsIntoHeadGradEmbedding

    model = tiny_model(arch, tied=True).to(device)
    pad = model.get_input_embeddings().padding_idx
    assert pad == 0
    batches = [batch(seed=7), batch(seed=8)]
    for ids, _lab in batches:
        ids[0, 1] = ids[1, 5] = pad  # the padding id is looked up (and its row not updated)
    batches = [(ids.to(device), lab.to(device)) for ids, lab in batches]
    for ids, labels in batches:
        reference_loss(model, ids, labels).backward()
    g_ref = grads(model)
    model.zero_grad(set_to_none=True)

    fused, why = FusedHead.plan(model)
    assert why is None and fused.tied
    assert fused.route_embedding_grad(model) is None
    emb = model.get_input_embeddings()
    assert type(emb) is RowsIntoHeadGradEmbedding and "embedding rows added" in fused.describe()
    for ids, labels in batches:
        loss = fused_loss(fused, model, ids, labels)
        w_edges = [fn for fn, _ in _accumulate_grad_edges(loss) if fn.variable is emb.weight]
        assert len(w_edges) == 1  # the head's edge only: no dense gradient from the lookup
        loss.backward()
    g = grads(model)
    assert g.keys() == g_ref.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name].float(), rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        plain = torch.nn.functional.embedding(batches[0][0], emb.weight, pad)
        assert torch.equal(emb(batches[0][0]), plain)
    fused.uninstall_embedding_route()
    fused.uninstall()
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert "_sftctl_anchor" not in model.get_input_embeddings().__dict__
    # an untied head has nothing to route; Gemma's scaled embedding class is left alone
    untied, _ = FusedHead.plan(tiny_model(arch, tied=False))
    assert "not tied" in untied.route_embedding_grad(untied.head)
    gemma = tiny_model("gemma2", tied=True)
    other, _ = FusedHead.plan(gemma)
    assert "ScaledWordEmbedding, not a plain" in other.route_embedding_grad(gemma)
    # a weight with gradient hooks keeps autograd's path (the hook would miss the rows)
    for register in ("register_hook", "register_post_accumulate_grad_hook"):
        hooked = tiny_model(arch, tied=True)
        getattr(hooked.get_input_embeddings().weight, register)(lambda *a: None)
        h, _ = FusedHead.plan(hooked)
        assert "gradient hooks" in h.route_embedding_grad(hooked)
        assert type(hooked.get_input_embeddings()) is torch.nn.Embedding


def _accumulate_grad_edges(t: torch.Tensor):
    """(AccumulateGrad node, its parent) for every leaf edge reachable from ``t``'s graph."""
    seen, stack, out = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is not None and type(nxt).__name__ == "AccumulateGrad":
                out.append((nxt, fn))
            else:
                stack.append(nxt)
    return out


def test_the_probe_refuses_an_undeclared_transform_and_a_wrapped_head():
    import transformers as tf

    from sftctl.training.head import FusedHead

    class Doubled(tf.LlamaForCausalLM):  # changes its logits in a way no config declares
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    cfg = tf.LlamaConfig(**COMMON)
    model = Doubled(cfg)
    fused, why = FusedHead.plan(model)
    assert fused is None and "transforms its head's logits" in why
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # left as it was

    # peft: modules_to_save on lm_head wraps the output layer
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", tied=False)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"],
                                                 modules_to_save=["lm_head"]))
    fused, why = FusedHead.plan(peft_model)
    assert fused is None and "not a plain torch.nn.Linear" in why and "peft" in why

    # a LoRA that leaves lm_head alone: fused, with a frozen head weight
    base = tiny_model("llama", tied=False)
    ids, labels = batch()
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ref = reference_loss(peft_model, ids, labels)
    ref.backward()
    g_ref = grads(peft_model)
    peft_model.zero_grad(set_to_none=True)
    fused, why = FusedHead.plan(peft_model)
    assert why is None
    assert not fused.head.weight.requires_grad
    loss = fused_loss(fused, peft_model, ids, labels)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=2e-6)
    g = grads(peft_model)
    assert g.keys() == g_ref.keys() and all("lora" in n for n in g)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name].float(), rtol=1e-4, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------ the real CLI

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused_head")
    base = build_tiny_base(tmp / "base")
    data = write_jsonl(tmp / "train.jsonl", alpaca_records(24, seed=4))
    return tmp, base, data


def train(tiny, out, *extra):
    tmp, base, data = tiny
    r = run_cli(["train", "--model", str(base), "--data", str(data), "--output-dir", str(out),
                 "--no-eval", "--no-initial-eval", "--max-steps", "4", "--batch-size", "4",
                 "--lr", "3e-3", "--seed", "3", *extra], env=cli_env(tmp))
    return r


def losses(out):
    return [x["loss"] for x in read_metrics(out) if x["kind"] == "train"]


def test_cli_lora_on_the_output_layer_is_a_counted_fallback(tiny, tmp_path):
    r = train(tiny, tmp_path / "fb", "--plugin", "lora", "--lora-modules-to-save", "lm_head")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "fb" / "summary.json").read_text())
    assert s["loss_head"]["fused"] is False
    assert [(f["what"], f["asked"], f["used"]) for f in s["fallbacks"]] == \
        [("fused_head", "auto", "logits + cross_entropy")]
    assert "not a plain torch.nn.Linear" in s["fallbacks"][0]["reason"]
    assert "fallback: the output layer is a" in r.stderr                   # at the start
    assert "fallback during this run: fused_head (asked auto" in r.stderr  # and at the end
    assert s["loss_kernel"] == "sftctl._C cross_entropy + sft_labels (cpu)"
    # the same run asked to use the fused head: refused before training
    r = train(tiny, tmp_path / "on", "--plugin", "lora", "--lora-modules-to-save", "lm_head",
              "--fused-head", "on")
    assert r.returncode == 2 and "train.fused_head: on, but the fused head cannot be used" \
        in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "on" / "summary.json").exists()


def test_cli_fused_head_chunk_rows_changes_memory_not_the_losses(tiny, tmp_path):
    """--fused-head-chunk-rows 5 splits every step's trained rows into many chunks: the same
    losses as the default (one chunk at this vocabulary) up to fp32 summation order, and the
    chunk size in summary.json (default: the op's plan for a full micro-batch, which at this
    vocabulary is all of its rows in one chunk)."""
    runs = {}
    for name, extra in (("default", []), ("rows5", ["--fused-head-chunk-rows", "5"])):
        r = train(tiny, tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = tmp_path / name
    s = {k: json.loads((d / "summary.json").read_text()) for k, d in runs.items()}
    vocab = json.loads((tiny[1] / "config.json").read_text())["vocab_size"]
    head = s["default"]["loss_head"]
    assert head["chunk_rows"] == head["chunk_rows_at"] and head["chunk_rows_at"] > 5
    assert head["chunk_rows_at"] * 4 * vocab <= 3 << 29  # within the op's one-chunk budget
    assert s["rows5"]["loss_head"]["chunk_rows"] == 5
    trained = [x["tokens"] for x in read_metrics(runs["rows5"]) if x["kind"] == "train"]
    assert min(trained) > 5 * 3  # several chunks per step
    a, b = losses(runs["default"]), losses(runs["rows5"])
    assert len(a) == 4 and a != [] and np.isfinite(a).all()
    np.testing.assert_allclose(b, a, rtol=2e-6)
    r = train(tiny, tmp_path / "bad", "--fused-head-chunk-rows", "-1")
    assert r.returncode == 2 and "train.fused_head_chunk_rows: -1 is below" in r.stderr, \
        r.stderr[-2000:]


def test_cli_golden_default_path_equals_the_torch_loss_within_1e_5(tmp_path):
    """The golden config (tests/golden): the default loss path (fused head) against
    --loss-impl torch (logits + F.cross_entropy in fp32), per step, within 1e-5 relative."""
    from test_cli import GOLDEN_YAML, curve

    runs = {}
    base = None
    for impl in ("fused", "torch"):
        out = tmp_path / impl
        args = ["train", "--config", str(GOLDEN_YAML), "--output-dir", str(out),
                "--loss-impl", impl, "--no-initial-eval", "--eval-every", "0", "--quiet"]
        if base is not None:
            args += ["--model", str(base)]
        r = run_cli(args, env=cli_env(tmp_path))
        assert r.returncode == 0, r.stderr[-3000:]
        base = base or out / "base"
        runs[impl] = out
    fused, ref = curve(runs["fused"])["train_loss"], curve(runs["torch"])["train_loss"]
    assert len(fused) == len(ref) == 12
    np.testing.assert_allclose(fused, ref, rtol=1e-5)
    s = json.loads((runs["fused"] / "summary.json").read_text())
    assert s["loss_head"]["fused"] is True and s["loss_head"]["tied"] is True
    assert s["loss_head"]["embedding_grad"] == "into the head's gradient"
    assert "linear_cross_entropy" in s["loss_kernel"] and s["fallbacks"] == []
    assert json.loads((runs["torch"] / "summary.json").read_text())["loss_head"]["fused"] is False


# ------------------------------------------------------------------------------------ CUDA

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@_CUDA
@pytest.mark.parametrize("arch", ["llama", "gemma2", "cohere"])
def test_cuda_bf16_fused_head_against_fp64_and_the_models_own_forward(arch):
    from sftctl.training.head import FusedHead, HeadRequest, posted, target_rows

    dev = torch.device("cuda")
    model = tiny_model(arch, tied=arch != "cohere").to(dev)
    ids, labels = batch(B=4, T=64)
    ids, labels = ids.to(dev), labels.to(dev)
    fused, why = FusedHead.plan(model)
    assert why is None
    n = (labels != -100).sum().float()
    # the fused loss, and the hidden states it saw (bf16 under autocast)
    seen = {}
    def keep(module, args):  # returns None: the input reaches the head unchanged
        seen["h"] = args[0].detach()

    h = fused.head.register_forward_pre_hook(keep)
    req = HeadRequest(labels=labels, rows=target_rows(labels.cpu()).to(dev), normalizer=n)
    with torch.autocast("cuda", dtype=torch.bfloat16), posted(fused, req):
        model(input_ids=ids, use_cache=False)
    h.remove()
    loss = req.loss
    loss.backward()
    g_fused = grads(model)
    model.zero_grad(set_to_none=True)
    # float64 of the same GEMM inputs (bf16 hidden and weight), the config's transform
    from sftctl.training.head import apply_transform

    hid = seen["h"].to(torch.bfloat16).double().reshape(-1, seen["h"].shape[-1])
    w = fused.head.weight.detach().to(torch.bfloat16).double()
    z = apply_transform(hid @ w.T, fused.transform)
    want = torch.nn.functional.cross_entropy(z, labels.reshape(-1), ignore_index=-100,
                                             reduction="sum") / n.double()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    # the model's own bf16 forward (bf16 logits, fp32 CE): equal to bf16 rounding of the logits
    fused.uninstall()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids, use_cache=False).logits
    own = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1),
                                            ignore_index=-100, reduction="sum") / n
    own.backward()
    g_own = grads(model)
    assert float(loss.detach()) == pytest.approx(float(own.detach()), rel=2e-2)
    flat = lambda g: torch.cat([v.float().reshape(-1) for _, v in sorted(g.items())])  # noqa
    cos = torch.nn.functional.cosine_similarity(flat(g_fused), flat(g_own), dim=0)
    assert float(cos) > 0.999


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_a_micro_batch_without_targets_gives_zero_loss_and_zero_gradients(device):
    """A micro-batch with no target at all (a distributed filler row): loss 0 and a zero (not
    missing) gradient for every parameter, so DDP's reducer sees every weight (bf16 autocast on
    CUDA)."""
    from sftctl.training.head import FusedHead

    model = tiny_model("llama", tied=False).to(device)
    ids, labels = batch()
    ids, labels = ids.to(device), labels.to(device)
    labels[:] = -100
    fused, _ = FusedHead.plan(model)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = fused_loss(fused, model, ids, labels, rows=False)
    loss.backward()
    assert float(loss.detach()) == 0.0
    for n, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), n
