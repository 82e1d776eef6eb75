"""demo: the trajectory-guided char LM, its KV-cache decoder and the training entry point."""
from __future__ import annotations

import json

import pytest
import torch

from demo.generate import CachedDecoder, generate
from demo.model import TrajectoryCharLM
from demo.train import compute_loss, main
from trajops.nn import STPLoss

V, E, H, L = 23, 32, 4, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **kw) -> TrajectoryCharLM:
    torch.manual_seed(seed)
    return TrajectoryCharLM(V, embedding_dim=E, num_heads=H, num_layers=L, num_experts=3, **kw).eval()


def test_forward_backward_shapes_and_every_parameter_learns():
    m = _model().train()
    idx = torch.randint(0, V, (3, 17))
    logits, hidden = m(idx)
    assert logits.shape == (3, 17, V) and logits.dtype == torch.float32
    assert len(hidden) == L and all(h.shape == (3, 17, E) for h in hidden)
    assert hidden[-1] is not hidden[0]
    total, ce, term, _ = compute_loss(m, idx[:, :-1], idx[:, 1:], STPLoss(weight=0.5))
    assert total.shape == () and torch.isfinite(total) and float(term.detach()) > 0
    torch.testing.assert_close(total, ce + term)
    total.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_forward_is_causal():
    m = _model()
    idx = torch.randint(0, V, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % V
    with torch.no_grad():
        a, ha = m(idx)
        b, hb = m(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12] - b[:, 12]).abs().max() > 1e-3


def test_bad_input():
    m = _model()
    with pytest.raises(ValueError, match=r"idx must be an int64 tensor of shape \(B, T\)"):
        m(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="idx"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TrajectoryCharLM(V, embedding_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        TrajectoryCharLM(0)
    dec = CachedDecoder(m, batch=2, capacity=8)
    with pytest.raises(ValueError, match=r"tokens must be int64 of shape \(2,\)"):
        dec.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(m, torch.zeros(0, dtype=torch.long), 3, 8)


@pytest.mark.parametrize("capacity,page_size", [(40, 8), (64, 16), (37, 5)])
def test_cached_decode_equals_full_forward(capacity, page_size):
    """With room for every token, decoding one token at a time through the cache is the forward."""
    m = _model(1)
    idx = torch.randint(0, V, (2, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = m(idx)
    dec = CachedDecoder(m, batch=2, capacity=capacity, page_size=page_size)
    stepped = torch.stack([dec.step(idx[:, t]) for t in range(idx.shape[1])], 1)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    stats = dec.cache.stats()
    assert stats["live"].tolist() == [37, 37] and stats["evicted_total"].tolist() == [0, 0]


def test_small_capacity_keeps_live_within_capacity_and_evicts():
    m = _model(3)
    idx = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = m(idx)
    cap = 10
    dec = CachedDecoder(m, batch=2, capacity=cap, page_size=4)
    outs = []
    for t in range(idx.shape[1]):
        outs.append(dec.step(idx[:, t]))
        assert dec.cache.stats()["live"].tolist() == [min(t + 1, cap)] * 2
    stepped = torch.stack(outs, 1)
    assert torch.isfinite(stepped).all()
    assert dec.cache.stats()["evicted_total"].tolist() == [30 - cap] * 2
    # Until the cache is full the decode is exact; after evictions it attends to fewer keys.
    torch.testing.assert_close(stepped[:, :cap], full[:, :cap], rtol=1e-5, atol=1e-5)
    assert (stepped[:, cap + 2:] - full[:, cap + 2:]).abs().max() > 1e-4


def test_generate_greedy_matches_full_forward_argmax_and_is_seeded():
    m = _model(5)
    prompt = torch.tensor([1, 2, 3, 4], dtype=torch.long)
    ids, cache = generate(m, prompt, 12, 64, temperature=0)
    assert ids.shape == (16,) and torch.equal(ids[:4], prompt)
    with torch.no_grad():
        logits, _ = m(ids[None])
    torch.testing.assert_close(ids[4:], logits[0, 3:-1].argmax(-1))
    assert int(cache.stats()["live"][0]) == 16 and not m.training

    a, _ = generate(m, prompt[None].repeat(2, 1), 20, 8, generator=torch.Generator().manual_seed(0), top_k=5)
    b, cache = generate(m, prompt[None].repeat(2, 1), 20, 8, generator=torch.Generator().manual_seed(0), top_k=5)
    assert a.shape == (2, 24) and torch.equal(a, b)
    assert cache.stats()["live"].tolist() == [8, 8]


def test_train_entry_point_smoke(tmp_path, capsys):
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(120))
    data = tmp_path / "tiny.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    res = main(["--data", str(data), "--steps", "3", "--minutes", "5", "--batch", "2", "--seq-len", "16",
                "--embedding-dim", "16", "--num-heads", "2", "--out", str(out), "--gen-chars", "24",
                "--cache-capacity", "8", "--prompt", "def ", "--threads", "1"])
    assert res["steps"] == 3
    for key in ("with_stp", "without_stp"):
        assert len(res["curves"][key]["ce"]) == 3 and len(res["curves"][key]["stp"]) == 3
        assert all(v == v for v in res["curves"][key]["ce"])
    # Same init, same first batch: the first CE is the same for both runs.
    assert res["curves"]["with_stp"]["ce"][0] == res["curves"]["without_stp"]["ce"][0]
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "curves.json").read_text())
    assert saved["curves"] == res["curves"] and saved["steps"] == 3
    gen = res["generation"]
    assert gen["text"].startswith("def ") and len(gen["text"]) == 4 + 24
    assert gen["cache_stats"]["live"] == [8] and gen["cache_stats"]["evicted_total"] == [28 - 8]
    printed = capsys.readouterr()
    assert "CE with STP" in printed.out and "held-out" in printed.out and "cache stats" in printed.out
    assert "\r[" in printed.err  # the progress bar

    res = main(["--data", str(data), "--steps", "2", "--batch", "2", "--seq-len", "16", "--embedding-dim", "16",
                "--num-heads", "2", "--out", str(out), "--no-generate", "--optimizer", "trajectory", "--threads", "1"])
    assert res["steps"] == 2 and "generation" not in res
    assert torch.get_num_threads() == 1  # run() restores the caller's thread count
