"""Site names and position specs."""

from __future__ import annotations

import math

import pytest
import torch

from perfit_probe.errors import SiteError
from perfit_probe.sites import Site, batch_positions, gather_positions, parse_positions, parse_site, parse_sites


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


@pytest.mark.parametrize("spec,n,expected", [
    ("last", 5, [4]),
    ("l1", 1, [0]),
    ("f3+l3", 10, [0, 1, 2, 7, 8, 9]),
    ("f3+l3", 3, [0, 1, 2]),          # p clamped to 1, s clamped to 2
    ("f3+l3", 4, [0, 1, 2, 3]),       # p 2, s 2
    ("f2", 1, [0]),
    ("l5", 3, [0, 1, 2]),
    ("mean", 3, [0, 1, 2]),
])
def test_offsets_follow_the_reft_clamping_rule(spec, n, expected):
    assert parse_positions(spec).offsets(n) == expected


def test_clamping_never_overlaps():
    spec = parse_positions("f7+l7")
    for n in range(1, 20):
        offsets = spec.offsets(n)
        assert len(offsets) == len(set(offsets))
        assert len(offsets) == min(7, n // 2) + min(7, math.ceil(n / 2))


def test_bad_position_specs():
    for bad in ("", "first", "f0+l0", "l", "x3"):
        with pytest.raises(SiteError):
            parse_positions(bad)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_positions_under_padding(side):
    lengths = [5, 2, 7]
    width = max(lengths)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, width - n:] = 1
        else:
            mask[i, :n] = 1
    hidden = torch.randn(3, width, 4)
    index, valid = batch_positions(parse_positions("f1+l2"), mask)
    for i, n in enumerate(lengths):
        start = width - n if side == "left" else 0
        expected = [start + o for o in parse_positions("f1+l2").offsets(n)]
        assert index[i][valid[i]].tolist() == expected
    last = gather_positions(hidden, parse_positions("last"), mask)
    mean = gather_positions(hidden, parse_positions("mean"), mask)
    for i, n in enumerate(lengths):
        start = width - n if side == "left" else 0
        assert torch.equal(last[i], hidden[i, start + n - 1])
        assert torch.allclose(mean[i], hidden[i, start:start + n].mean(0), atol=1e-6)
