"""bench/stp_ablation.py helpers on a tiny random Llama: the cached split is the same model; the report renders."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "stp_ablation.py")


@pytest.fixture(scope="module")
def sa():
    spec = importlib.util.spec_from_file_location("stp_ablation", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny():
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def test_split_model_is_the_same_model(sa, tiny):
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    bottom, top = sa.split_model(tiny, 2)
    assert len(tiny.model.layers) == 4 and tiny.config.num_hidden_layers == 4  # the original is untouched
    assert top.model.layers[0] is tiny.model.layers[2]  # shared parameters
    with torch.no_grad():
        full = tiny(ids, use_cache=False).logits
        split = top(inputs_embeds=bottom(input_ids=ids, use_cache=False).last_hidden_state, use_cache=False).logits
    torch.testing.assert_close(split, full)
    # Hooks on the split do not leak into the original.
    from trajops.hf_stp import LayerCapture

    before = len(tiny.model._forward_pre_hooks)
    with LayerCapture(top, [0]):
        assert len(tiny.model._forward_pre_hooks) == before


def test_make_batches_are_fixed(sa):
    ids = torch.arange(1000)
    a, b = sa.make_batches(ids, 3, 2, 8, seed=5), sa.make_batches(ids, 3, 2, 8, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape == (2, 8)
    assert torch.equal(a[1][0], a[1][0, 0] + torch.arange(8))  # contiguous windows of the stream


def test_report_renders(sa, tmp_path):
    ev = {"lm_loss": 2.0, "stp_dense_L20": 1.4, "stp_dense_L25": 1.3, "stp_dense_L29": 1.2, "stp_dense_mean": 1.3}
    run = {"step_times_s": [1.0, 1.0, 1.0], "train_lm_loss": [2.5, 2.4, 2.3], "after": ev}
    res = {
        "config": {"note": "NOTE", "batch": 4, "seq": 64},
        "before": ev,
        "runs": {"baseline": dict(run, train_stp_raw=[]), "n3 @20,25,29": dict(run, train_stp_raw=[1.3, 1.2])},
        "stp_term_time_s": 1e-3,
    }
    sa.write_report(res, str(tmp_path / "r"))
    md = (tmp_path / "r.md").read_text()
    assert "NOTE" in md and "| n3 @20,25,29 | 2.0000 | +0.0000 | 1.3000 |" in md and "1.00 ms" in md
    assert all(line.count("|") == 12 for line in md.splitlines() if line.startswith("|"))
