"""triton_kernels/_common.py: the launch planner and its OutOfResources fallback, without a GPU.

A fake kernel stands in for a ``@triton.jit`` function (``kernel[grid](*args, **kwargs)``): the
planner's choices, its fallback on OutOfResources, the memory of the working choice per variant and
the ValueError for a variant no configuration serves are plain Python and are tested here.
"""
from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from trajops.triton_kernels import _common  # noqa: E402
from trajops.triton_kernels._common import Config, DeviceSpec  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="plans for a real device (the interpreter takes every config)")

SPEC = DeviceSpec((9, 0), 232448, 132)


class FakeKernel:
    """Records launches; raises OutOfResources for configs whose BLOCK_M is in `fail`."""

    def __init__(self, fail=()):
        self.fail, self.launches = set(fail), []
        self.fn = self  # _common names kernels by fn.__qualname__

    __qualname__ = "FakeKernel"

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, kwargs["BLOCK_M"], kwargs["num_stages"]))
            if kwargs["BLOCK_M"] in self.fail:
                raise OutOfResources(262144, 232448, "shared memory")
        return run


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(_common, "_chosen", {})
    monkeypatch.setattr(_common, "device_spec", lambda device: SPEC)


CANDS = (Config.make(300_000, 8, 3, BLOCK_M=128), Config.make(200_000, 8, 2, BLOCK_M=64),
         Config.make(100_000, 4, 2, BLOCK_M=32), Config.make(50_000, 4, 1, BLOCK_M=16))


def test_first_candidate_that_fits_the_shared_memory_is_launched():
    k = FakeKernel()
    cfg = _common.launch(k, lambda c: (c["BLOCK_M"],), (1, 2), CANDS, ("v",), "cuda", "op")
    assert cfg["BLOCK_M"] == 64 and k.launches == [((64,), 64, 2)]


def test_out_of_resources_falls_back_once_warns_and_remembers():
    k = FakeKernel(fail={64})
    with pytest.warns(RuntimeWarning, match="smaller ones"):
        cfg = _common.launch(k, lambda c: (1,), (), CANDS, ("v",), "cuda", "op")
    assert cfg["BLOCK_M"] == 32 and [b for _, b, _ in k.launches] == [64, 32]
    # the next call of the same variant goes straight to the config that worked
    k.launches.clear()
    cfg = _common.launch(k, lambda c: (1,), (), CANDS, ("v",), "cuda", "op")
    assert cfg["BLOCK_M"] == 32 and [b for _, b, _ in k.launches] == [32]
    # another variant plans afresh
    k.launches.clear()
    _common.launch(FakeKernel(), lambda c: (1,), (), CANDS, ("w",), "cuda", "op")
    assert k.launches == []


def test_no_configuration_fits_raises_value_error_before_any_launch():
    k = FakeKernel()
    big = tuple(Config.make(400_000 + i, 4, 1, BLOCK_M=16) for i in range(2))
    with pytest.raises(ValueError, match=r"no kernel configuration fits .*232448 bytes"):
        _common.launch(k, lambda c: (1,), (), big, ("v",), "cuda", "temperature_attention on cuda:0 (D=4096)")
    assert k.launches == []


def test_every_candidate_out_of_resources_raises_value_error():
    k = FakeKernel(fail={128, 64, 32, 16})
    with pytest.raises(ValueError, match="no kernel configuration fits this GPU"):
        _common.launch(k, lambda c: (1,), (), CANDS, ("v",), "cuda", "op")


def test_measured_first_candidate_wins_over_register_estimate():
    # the first candidate is the sweep's fastest: taken even when its register estimate is high
    cands = (Config.make(100_000, 4, 3, 300, BLOCK_M=64), Config.make(90_000, 4, 3, 100, BLOCK_M=32))
    assert _common.plan(FakeKernel(), cands, ("v",), "cuda", "op")["BLOCK_M"] == 64
    # later candidates must also fit the register budget when the first does not fit shared memory
    cands = (Config.make(999_999, 4, 3, 100, BLOCK_M=128), Config.make(100_000, 4, 3, 300, BLOCK_M=64),
             Config.make(90_000, 4, 3, 100, BLOCK_M=32))
    assert _common.plan(FakeKernel(), cands, ("v",), "cuda", "op")["BLOCK_M"] == 32


def test_attention_tiles_count_the_mask_tile_and_the_stages():
    from trajops.triton_kernels import temperature_attention as ta

    if _common.INTERPRET:
        pytest.skip("interpreter tiles")
    # the configuration of the OutOfResources report: masked D=128 bf16, 128x128 tiles, 3 stages
    est = ta._estimate("fwd", 2, 128, 128, 3, 128, 128, 2)
    assert est > 232448  # 3 x (K + V + mask tiles) + q: over the sm_90 limit, as the compiler said
    first = next(c for c in ta._candidates("fwd", 2, 128, 128, 2, 4096) if c.smem <= 232448)
    assert first.num_stages < 3 or first["BLOCK_N"] < 128
    # a key-padding mask is read as one vector per key block: no tile, the unmasked plan
    assert ta._candidates("fwd", 2, 128, 128, 1, 4096)[0].smem == ta._candidates("fwd", 2, 128, 128, 0, 4096)[0].smem


def test_host_cdiv_and_next_power_of_2_equal_tritons():
    # the launchers use these plain-Python twins of triton's constexpr_functions (~2 us each per host
    # call); a difference would change tiles and grids
    for n in list(range(0, 4100)) + [2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 40 + 3]:
        assert _common.next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in list(range(0, 600, 7)) + [2 ** 31 + 5, 2 ** 40]:
        for b in (1, 2, 3, 16, 64, 127, 128):
            assert _common.cdiv(a, b) == triton.cdiv(a, b), (a, b)
