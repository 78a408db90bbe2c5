"""Hand-built prompts shared by tests of several modules (cache, deltas, backends)."""

from __future__ import annotations

from perfit_probe.data.records import Example

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu user query profile".split()

BACKEND_PROMPTS = [
    "The user rated the movie Star Wars (1977) five stars.",
    "alpha beta",
    "Predict the rating from 1 to 5 that this user gives to the movie Fargo.",
]
"""Three prompts of different lengths (so a batch of them is padded), for the backend checks."""


def make_examples(n_users: int = 3, n_queries: int = 3, variants=("plain", "enhanced", "control")) -> list[Example]:
    """Hand-built prompts of mixed lengths (2 to ~30 tokens)."""
    out = []
    for u in range(n_users):
        for q in range(n_queries):
            for v, variant in enumerate(variants):
                n = 2 + (u * 7 + q * 5 + v * 11) % 17
                text = " ".join(WORDS[(u + 2 * q + 3 * v + i) % len(WORDS)] for i in range(n))
                out.append(Example(f"u{u}", f"q{q}", variant, text))
    return out
