"""demo.data: the offline corpus and the character-level dataset."""
from __future__ import annotations

import pytest
import torch

from demo.data import DEFAULT_MAX_BYTES, CharDataset, load_text


def test_default_corpus_is_stdlib_source_deterministic_and_capped():
    text = load_text()
    assert text == load_text()
    n = len(text.encode("utf-8"))
    assert 1_000_000 < n <= DEFAULT_MAX_BYTES
    assert text.startswith("# file: ") and "\ndef " in text and "\nclass " in text
    assert "site-packages" not in text.split("\n", 1)[0]
    small = load_text(max_bytes=50_000)
    assert len(small.encode("utf-8")) <= 50_000 and text.startswith(small)  # same order, a prefix


def test_user_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo wörld\n", encoding="utf-8")
    assert load_text(str(p)) == "héllo wörld\n"
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text(str(tmp_path / "e.txt"))
    with pytest.raises(ValueError, match="max_bytes"):
        load_text(max_bytes=0)


def test_char_dataset_round_trip_and_vocab():
    text = "abracadabra – ünïcode ✓\n"
    ds = CharDataset(text)
    assert ds.chars == sorted(set(text)) and ds.vocab_size == len(set(text)) and len(ds) == len(text)
    assert ds.data.dtype == torch.int64 and ds.data.shape == (len(text),)
    assert ds.decode(ds.data) == text
    assert ds.decode(ds.encode("cab")) == "cab" and ds.encode("").numel() == 0
    assert ds.encode("a").tolist() == [ds.stoi["a"]]
    with pytest.raises(KeyError, match="'z'"):
        ds.encode("abz")


def test_batch_is_next_char_shifted_and_seeded():
    ds = CharDataset(load_text(max_bytes=200_000))
    x, y = ds.batch(4, 64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # every row is a real window of the text, and y extends it by one character
    for row_x, row_y in zip(x, y):
        window = ds.decode(row_x) + ds.decode(row_y[-1:])
        assert window in ds.decode(ds.data)
    x2, y2 = ds.batch(4, 64, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = ds.batch(4, 64, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)


def test_batch_covers_the_last_window():
    ds = CharDataset("0123456789")
    seen_last = False
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x, y = ds.batch(3, 9, g)
        seen_last |= bool((y[:, -1] == ds.stoi["9"]).any())
        assert ds.decode(x[0]) == "012345678" and ds.decode(y[0]) == "123456789"  # the only valid start
    assert seen_last


@pytest.mark.parametrize("B, T", [(0, 4), (2, 0), (2.0, 4), (True, 4), (2, 10), (2, 11)])
def test_bad_batch_args(B, T):
    ds = CharDataset("0123456789")
    with pytest.raises(ValueError, match="B|T"):
        ds.batch(B, T)


def test_bad_text():
    with pytest.raises(TypeError):
        CharDataset(b"bytes")
    with pytest.raises(ValueError):
        CharDataset("a")
