"""Site names and position specs."""

from __future__ import annotations

import pytest
import torch

from perfit_probe.errors import SiteError
from perfit_probe.sites import (Site, batch_last_mask, batch_positions, gather_positions, parse_positions, parse_site,
                                parse_sites)
from perfit_probe_tests.reference import pyreft_locations


def test_parse_site_forms_and_negative_layers():
    assert parse_site("blocks.3.hook_resid_pre") == Site(3, "resid_pre")
    assert parse_site(2) == Site(2, "resid_post")
    assert parse_site("-1", n_layers=30) == Site(29)
    assert parse_sites("1, 2,blocks.2.hook_resid_post", n_layers=4) == [Site(1), Site(2)]
    for bad in ("layer3", "blocks.1.hook_banana", "blocks.x.hook_resid_post"):
        with pytest.raises(SiteError):
            parse_site(bad, n_layers=4)
    with pytest.raises(SiteError, match="out of range"):
        parse_site(4, n_layers=4)


# the grammar of pyreft; "last" is ours (= l1)
SPECS = ("f1", "l1", "last", "f1+l1", "f2+l2", "f3+l5", "f5+l3", "f1+l4", "l3", "f4", "f7+l7")


@pytest.mark.parametrize("share_weights", [True, False])
@pytest.mark.parametrize("pad_mode", ["first", "last"])
def test_pyreft_clamp_equals_pyreft(pyreft, pad_mode, share_weights):
    """Every spec, prompts of 1..12 tokens: the ``pyreft`` rule selects pyreft's positions, and
    without shared weights the first-p and last-s groups are pyreft's two interventions' lists."""
    for text in SPECS:
        spec = parse_positions(text)
        for n in range(1, 13):
            first, last = pyreft_locations(pyreft, text, n, share_weights=share_weights, pad_mode=pad_mode)
            ours = spec.offsets(n, "pyreft")
            assert sorted(ours) == sorted(set(first) | set(last)), (text, n)
            p, s = spec.counts(n, "pyreft")
            if "+" in text and not share_weights:
                if first == last:  # pyreft's shared branch when a side clamps to 0: only for n <= 1
                    assert first == [] and ours == [], (text, n)
                else:
                    assert (ours[:p], ours[p:]) == (first, last), (text, n)


@pytest.mark.parametrize("spec,n,expected", [  # pyreft: each side min(., n // 2), even alone
    ("last", 5, [4]),
    ("l1", 1, []),                    # a one-token prompt is not edited
    ("f2", 1, []),
    ("f3+l3", 10, [0, 1, 2, 7, 8, 9]),
    ("f3+l3", 3, [0, 2]),             # the middle token of an odd prompt is never selected
    ("f3+l3", 4, [0, 1, 2, 3]),
    ("l5", 3, [2]),
    ("mean", 3, [0, 1, 2]),
])
def test_pyreft_clamp_by_hand(spec, n, expected):
    assert parse_positions(spec).offsets(n, "pyreft") == expected


@pytest.mark.parametrize("spec,n,expected", [  # cover: p to n // 2, s to ceil(n / 2) together; alone to n
    ("last", 5, [4]),
    ("l1", 1, [0]),
    ("f3+l3", 10, [0, 1, 2, 7, 8, 9]),
    ("f3+l3", 3, [0, 1, 2]),          # p clamped to 1, s clamped to 2
    ("f3+l3", 4, [0, 1, 2, 3]),       # p 2, s 2
    ("f1+l5", 4, [0, 2, 3]),          # p 1, s 2: the second token is left out
    ("f2", 1, [0]),
    ("l5", 3, [0, 1, 2]),
    ("mean", 3, [0, 1, 2]),
])
def test_cover_clamp_by_hand(spec, n, expected):
    assert parse_positions(spec).offsets(n, "cover") == expected
    assert parse_positions(spec).offsets(n) == expected  # reading positions use cover


@pytest.mark.parametrize("clamp", ["pyreft", "cover"])
def test_clamping_never_overlaps(clamp):
    for text in SPECS:
        for n in range(1, 20):
            offsets = parse_positions(text).offsets(n, clamp)
            assert len(offsets) == len(set(offsets)) and offsets == sorted(offsets)
    with pytest.raises(SiteError, match="position clamp"):
        parse_positions("l1").offsets(3, "reft")


def test_bad_position_specs():
    for bad in ("", "first", "f0+l0", "l", "x3"):
        with pytest.raises(SiteError):
            parse_positions(bad)


def _padding_mask(lengths: list[int], side: str) -> torch.Tensor:
    """Attention mask of prompts of ``lengths`` tokens, padded on ``side``."""
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, width - n:] = 1
        else:
            mask[i, :n] = 1
    return mask


@pytest.mark.parametrize("clamp,expected", [
    # prompts of 5, 2, 7 and 1 tokens, spec f1+l2: (first-p offsets, last-s offsets) per row
    ("cover", [([0], [3, 4]), ([0], [1]), ([0], [5, 6]), ([], [0])]),
    ("pyreft", [([0], [3, 4]), ([0], [1]), ([0], [5, 6]), ([], [])]),
])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_positions_under_padding(side, clamp, expected):
    lengths = [5, 2, 7, 1]
    width = max(lengths)
    mask = _padding_mask(lengths, side)
    spec = parse_positions("f1+l2")
    index, valid = batch_positions(spec, mask, clamp)
    last = batch_last_mask(spec, mask, clamp)
    assert index.shape == valid.shape == last.shape == (4, 3)
    for i, (n, (first_exp, last_exp)) in enumerate(zip(lengths, expected)):
        start = width - n if side == "left" else 0
        assert index[i][valid[i]].tolist() == [start + o for o in first_exp + last_exp]
        assert index[i][valid[i] & ~last[i]].tolist() == [start + o for o in first_exp]
        assert index[i][last[i]].tolist() == [start + o for o in last_exp]
    hidden = torch.randn(len(lengths), width, 4)
    last_read = gather_positions(hidden, parse_positions("last"), mask)
    mean = gather_positions(hidden, parse_positions("mean"), mask)
    for i, n in enumerate(lengths):
        start = width - n if side == "left" else 0
        assert torch.equal(last_read[i], hidden[i, start + n - 1])
        assert torch.allclose(mean[i], hidden[i, start:start + n].mean(0), atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("share_weights", [True, False])
def test_batch_positions_equal_pyreft_under_padding(pyreft, side, share_weights):
    """A padded batch of prompts of 1..12 tokens selects, row by row, pyreft's positions of
    each prompt alone, shifted by the row's padding; the last-s mask marks pyreft's second list."""
    lengths = list(range(1, 13))
    width = max(lengths)
    mask = _padding_mask(lengths, side)
    for text in SPECS:
        spec = parse_positions(text)
        index, valid = batch_positions(spec, mask, "pyreft")
        last = batch_last_mask(spec, mask, "pyreft")
        for i, n in enumerate(lengths):
            start = width - n if side == "left" else 0
            first_ref, last_ref = pyreft_locations(pyreft, text, n, share_weights=share_weights, pad_mode="first")
            got = index[i][valid[i]].tolist()
            assert sorted(got) == sorted(start + o for o in set(first_ref) | set(last_ref)), (text, n)
            if "+" in text and not share_weights and first_ref != last_ref:
                assert index[i][valid[i] & ~last[i]].tolist() == [start + o for o in first_ref], (text, n)
                assert index[i][last[i]].tolist() == [start + o for o in last_ref], (text, n)
