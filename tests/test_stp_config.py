"""STPLoss.from_config / parse_stp_config: the seed's STP config keys, defaults and errors."""
from __future__ import annotations

import math

import pytest
import torch

import trajops
from trajops.nn import STPLoss
from trajops.nn.stp_loss import STP_CONFIG_DEFAULTS, parse_stp_config


def states(n=13, B=2, T=10, D=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(n)]


def test_seed_config_builds_the_policy():
    cfg = {"stp_enabled": True, "stp_weight": 0.02, "start_step": 1000, "stp_n_spans": 4, "stp_layers": "4,8,12"}
    m = STPLoss.from_config(cfg)
    assert (m.weight, m.n_spans, m.layers, m.start_step, m.enabled) == (0.02, 4, (4, 8, 12), 1000, True)
    hs = states()
    triples = trajops.sample_stp_triples(2, 10, 4, generator=torch.Generator().manual_seed(1))
    assert float(m(hs, step=999, triples=triples)) == 0.0
    torch.testing.assert_close(
        m(hs, step=1000, triples=triples), 0.02 * trajops.stp_loss([hs[4], hs[8], hs[12]], triples=triples)
    )


def test_defaults_are_the_seed_values_and_off():
    assert STP_CONFIG_DEFAULTS == {
        "stp_enabled": False, "stp_weight": 0.02, "start_step": 1000, "stp_n_spans": 4, "stp_layers": "4,8,12"
    }
    m = STPLoss.from_config({})
    assert (m.weight, m.n_spans, m.layers, m.start_step, m.enabled) == (0.02, 4, (4, 8, 12), 1000, False)
    # disabled: a connected exact zero at every step, even past start_step
    hs = [h.requires_grad_() for h in states()]
    out = m(hs, step=10**6)
    assert float(out.detach()) == 0.0 and out.grad_fn is not None
    assert repr(m).endswith("enabled=False)")


@pytest.mark.parametrize(
    "layers,want",
    [("4,8,12", (4, 8, 12)), (" 4 , 8,12 ", (4, 8, 12)), ("-1", (-1,)), ("0,-2", (0, -2)), ([3, 5], (3, 5)),
     ((7,), (7,))],
)
def test_layer_forms(layers, want):
    assert parse_stp_config({"stp_layers": layers})["stp_layers"] == want
    assert STPLoss.from_config({"stp_enabled": True, "stp_layers": layers}).layers == want


@pytest.mark.parametrize(
    "cfg,exc,match",
    [
        ({"stp_wieght": 0.1}, ValueError, r"unknown key\(s\) \['stp_wieght'\]"),
        ({"stp_enabled": True, "layers": "4"}, ValueError, "unknown key"),
        ({"stp_weight": -0.02}, ValueError, "stp_weight must be a finite number >= 0"),
        ({"stp_weight": math.nan}, ValueError, "stp_weight must be a finite number >= 0"),
        ({"stp_weight": math.inf}, ValueError, "stp_weight must be a finite number >= 0"),
        ({"stp_weight": "0.02"}, TypeError, "stp_weight must be a real number"),
        ({"stp_enabled": "false"}, TypeError, "stp_enabled must be a bool"),
        ({"stp_enabled": 1}, TypeError, "stp_enabled must be a bool"),
        ({"stp_n_spans": 0}, ValueError, "stp_n_spans must be >= 1"),
        ({"stp_n_spans": 2.0}, TypeError, "stp_n_spans must be an int"),
        ({"start_step": -1}, ValueError, "start_step must be >= 0"),
        ({"start_step": True}, TypeError, "start_step must be an int"),
        ({"stp_layers": ""}, ValueError, "comma-separated ints"),
        ({"stp_layers": "4,,8"}, ValueError, "comma-separated ints"),
        ({"stp_layers": "4;8"}, ValueError, "comma-separated ints"),
        ({"stp_layers": "4.5"}, ValueError, "comma-separated ints"),
        ({"stp_layers": "all"}, ValueError, "comma-separated ints"),
        ({"stp_layers": []}, ValueError, "at least one layer"),
        ({"stp_layers": [4, 4]}, ValueError, "names a layer twice"),
        ({"stp_layers": "8, 8"}, ValueError, "names a layer twice"),
        ({"stp_layers": [4, 8.0]}, ValueError, "list of ints"),
        ({"stp_layers": [True]}, ValueError, "list of ints"),
        ({"stp_layers": 4}, TypeError, "string such as"),
    ],
)
def test_bad_config(cfg, exc, match):
    with pytest.raises(exc, match=match):
        STPLoss.from_config(cfg)


def test_layers_out_of_range_for_the_model():
    # SmolLM2-135M: 30 blocks -> 31 hidden states (index 0 is the embeddings)
    assert STPLoss.from_config({"stp_layers": "4,8,30,-31"}, num_hidden_states=31).layers == (4, 8, 30, -31)
    with pytest.raises(ValueError, match=r"stp_layers \[31\] out of range for 31 hidden state tensors"):
        STPLoss.from_config({"stp_layers": "4,31"}, num_hidden_states=31)
    with pytest.raises(ValueError, match=r"stp_layers \[13, -14\] out of range for 13"):
        STPLoss.from_config({"stp_layers": [4, 13, -14]}, num_hidden_states=13)
    with pytest.raises(ValueError, match="num_hidden_states must be >= 1"):
        STPLoss.from_config({}, num_hidden_states=0)
    # without num_hidden_states the range is checked at the call, as before
    m = STPLoss.from_config({"stp_enabled": True, "start_step": 0, "stp_layers": "4,8,12"})
    with pytest.raises(IndexError, match="out of range"):
        m(states(n=12))


def test_not_a_mapping():
    with pytest.raises(TypeError, match="expected a mapping"):
        STPLoss.from_config([("stp_weight", 0.1)])


def test_constructor_rejects_bad_weight_too():
    for w in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="STPLoss: weight must be a finite number >= 0"):
            STPLoss(weight=w)
    assert STPLoss(weight=0).weight == 0.0
