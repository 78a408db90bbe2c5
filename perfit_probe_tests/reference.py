"""pyreft's positions, as an oracle for ``perfit_probe.sites`` (pyreft from the ``pyreft`` fixture)."""

from __future__ import annotations


def pyreft_locations(pyreft, spec: str, n: int, *, share_weights: bool, pad_mode: str = "first") -> tuple[list, list]:
    """pyreft's own ``get_intervention_locations`` for one prompt of ``n`` tokens, as its
    generation datasets call it (``last_position = n``), its padding slots dropped.

    With one intervention per layer (``f{p}`` or ``l{s}``, or shared weights) pyreft gets
    ``num_interventions = layers``; for ``f{p}+l{s}`` without shared weights its training
    scripts double the layers. Returns the positions of the first and of the last half of the
    interventions (equal when they are all given the same list). ``last`` is read as ``l1``.
    """
    text = "l1" if spec == "last" else spec
    separate = "+" in text and not share_weights
    locations = pyreft.get_intervention_locations(last_position=n, positions=text,
                                                  num_interventions=2 if separate else 1,
                                                  share_weights=share_weights, pad_mode=pad_mode)
    pad = -1 if pad_mode == "first" else n
    real = [[p for p in row if p != pad] for row in locations]
    assert all(0 <= p < n for row in real for p in row)
    return real[0], real[-1]
