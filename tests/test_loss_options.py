"""--label-smoothing and --z-loss: ``token_loss`` (both impls) against float64 per element, and
through the real ``sftctl train`` CLI against an independent plain-PyTorch replay of the run.

The data make the replay exact without re-implementing batching: every record is the same
example, so every micro-batch is B identical unpadded rows, whose mean token loss (and gradient)
equals that of one row. Plain SGD (no momentum, clipping, decay or schedule) makes the optimizer a
one-line update. The replay computes the loss in float64 from ``log_softmax`` by the textbook
definition (smoothing: (1 - eps) NLL + eps mean_j(-log p_j); z-loss: c lse^2), without sftctl's
loss code; only the tokenization comes from sftctl's data layer (tested on its own elsewhere).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sftctl_testutil import (alpaca_records, build_tiny_base, cli_env, read_metrics, run_cli,
                             write_jsonl)

from sftctl.training.loss import IGNORE_INDEX, token_loss
from test_ops import ARITH_ULPS, check_close_rel, check_grad, grad_terms, ref_cross_entropy

STEPS, BATCH, LR = 4, 4, 0.5
# fp32 forward/backward vs the float64-loss replay, over a few SGD steps.
RTOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loss_options")
    base = build_tiny_base(tmp / "base")
    record = alpaca_records(1, seed=5)[0]
    data = write_jsonl(tmp / "train.jsonl", [record] * (BATCH * STEPS))
    return tmp, base, record, data


def cli_losses(setup, name, *extra) -> list[float]:
    tmp, base, _, data = setup
    out = tmp / name
    r = run_cli(["train", "--plugin", "alpaca", "--model", str(base), "--data", str(data),
                 "--format", "alpaca", "--output-dir", str(out), "--max-steps", str(STEPS),
                 "--batch-size", str(BATCH), "--grad-accum", "1", "--optimizer", "sgd",
                 "--momentum", "0", "--lr", str(LR), "--weight-decay", "0", "--scheduler",
                 "constant", "--warmup-steps", "0", "--grad-clip", "0", "--precision", "fp32",
                 "--device", "cpu", "--no-eval", "--no-initial-eval", "--quiet", *extra],
                env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    return [m["loss"] for m in read_metrics(out) if m["kind"] == "train"]


def replay_losses(setup, eps=0.0, z=0.0) -> list[float]:
    """The same SGD run in plain PyTorch on one row; the loss of each step before its update."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftctl.data import Source, collate, tokenize_split
    from sftctl.run.plugin_manager import get_plugin_manager

    _, base, record, _ = setup
    tok = AutoTokenizer.from_pretrained(base)
    fmt = get_plugin_manager(entry_points=False).dataset_formats()["alpaca"]
    split = tokenize_split("train", [(Source("mem", "one"), datasets.Dataset.from_list([record]))],
                           fmt, tok, max_seq_len=1024, train_on_prompt=False, skip_invalid=False,
                           num_proc=1, quiet=True)
    batch = collate(split, [[0]], pad_id=tok.pad_token_id, packing=False)
    ids = batch.input_ids  # [1, T], no padding
    assert bool(batch.attention_mask.all())
    trainable = batch.loss_mask[0, 1:] != 0  # logits[t] predicts ids[t + 1]
    targets = ids[0, 1:][trainable]
    assert targets.numel() > 0

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    model.train()
    losses = []
    for _ in range(STEPS):
        logits = model(input_ids=ids).logits[0, :-1][trainable].double()  # [n, V]
        logp = torch.log_softmax(logits, dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        nll = -logp.gather(1, targets[:, None])[:, 0]
        tok_loss = (1 - eps) * nll + eps * (-logp.mean(-1)) + z * lse * lse
        loss = tok_loss.mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-LR)
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="module")
def plain(setup):
    return cli_losses(setup, "plain")


def test_plain_run_matches_the_replay(setup, plain):
    """The anchor itself: without options the CLI run is the replay with eps = z = 0."""
    np.testing.assert_allclose(plain, replay_losses(setup), rtol=RTOL)


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_label_smoothing_run_matches_the_replay(setup, plain, impl):
    got = cli_losses(setup, f"smooth_{impl}", "--label-smoothing", "0.1", "--loss-impl", impl)
    np.testing.assert_allclose(got, replay_losses(setup, eps=0.1), rtol=RTOL)
    # every step's loss moves by 10x the tolerance or more: the option reached the loss
    assert min(abs(a - b) / b for a, b in zip(got, plain)) > 10 * RTOL


def test_z_loss_run_matches_the_replay(setup, plain):
    got = cli_losses(setup, "zloss", "--z-loss", "1e-2", "--loss-impl", "torch")
    np.testing.assert_allclose(got, replay_losses(setup, z=1e-2), rtol=RTOL)
    assert min(abs(a - b) / b for a, b in zip(got, plain)) > 10 * RTOL


# ------------------------------------------------------------------------- token_loss, per element

OPTION_CASES = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.25, 1e-2)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("eps,z", OPTION_CASES)
@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("v", [1000, 50257])
def test_token_loss_options_against_float64(impl, eps, z, reduction, v):
    g = torch.Generator().manual_seed(v + int(eps * 100) + int(z * 1e4))
    B, T = 2, 5
    logits = torch.randn(B, T, v, generator=g) * 3
    labels = torch.randint(0, v, (B, T), generator=g)
    labels[:, -1] = IGNORE_INDEX
    labels[0, 1] = IGNORE_INDEX
    count = int((labels != IGNORE_INDEX).sum())
    normalizer = torch.tensor(float(count + 3))  # a whole step's count, not this batch's
    leaf = logits.clone().requires_grad_()
    kw = {} if (eps, z) == (0.0, 0.0) else dict(label_smoothing=eps, z_loss=z)  # the defaults
    loss = token_loss(leaf, labels, normalizer if reduction == "mean" else None, impl,
                      reduction=reduction, **kw)
    loss.backward()

    x64 = logits.reshape(-1, v).double().requires_grad_()
    t = labels.reshape(-1)
    ref, _, _ = ref_cross_entropy(x64, t, reduction="sum", label_smoothing=eps, z_loss=z)
    scale = 1.0 / float(normalizer) if reduction == "mean" else 1.0
    ref = ref * scale
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    check_close_rel(loss, ref, what=f"{impl} loss")
    terms = grad_terms(logits.reshape(-1, v), t, scale, label_smoothing=eps, z_loss=z)
    # PyTorch's fp32 logsumexp sums V exponentials in fp32: its lse, hence every p_j, carries
    # ~sqrt(V) ulp (measured 90 at V=50257); the fused kernels sum blocks in double.
    ulps = ARITH_ULPS + (v ** 0.5 if impl == "torch" else 0.0)
    check_grad(leaf.grad.reshape(-1, v), x64.grad, torch.float32, *terms, what=f"{impl} grad",
               ulps=ulps)
    # the options change the loss (so the comparison above is not vacuous)
    if (eps, z) != (0.0, 0.0):
        plain = token_loss(logits, labels, normalizer if reduction == "mean" else None, impl,
                           reduction=reduction)
        assert abs(float(plain) - float(loss)) > 1e-4 * abs(float(plain))


def test_train_options_validated():
    from sftctl.errors import ConfigError
    from sftctl.run.config import build_config

    cfg = build_config([("t", {"train": {"label_smoothing": 0.999, "z_loss": 0.0}})])
    assert cfg.train.label_smoothing == 0.999
    assert build_config([]).train.label_smoothing == 0.0 and build_config([]).train.z_loss == 0.0
    for bad, msg in (({"label_smoothing": 1.0}, "must be below 1.0"),
                     ({"label_smoothing": -0.1}, "below the minimum"),
                     ({"z_loss": -1e-4}, "below the minimum")):
        with pytest.raises(ConfigError, match=msg):
            build_config([("t", {"train": bad})])
