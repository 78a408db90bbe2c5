"""``RUN/interpret/report.md``: the interpretation read-outs as a markdown section.

A pure function of an ``InterpretResult`` (``perfit_probe.evaluation.interpret``): tables of
the steering KL, the alignment of the learned interventions with the delta subspace, the
logit-lens read-outs and the monitoring correlations, with the settings used and the notes
on what was skipped.
"""

from __future__ import annotations

import pandas as pd

from perfit_probe.evaluation.interpret import InterpretResult
from perfit_probe.stages.markdown import markdown_table


def _kl_table(kl: pd.DataFrame) -> str:
    shown = kl.copy()
    shown["KL [95% CI]"] = [f"{m:.4f} [{lo:.4f}, {hi:.4f}]" for m, lo, hi in zip(shown["mean"], shown.lo, shown.hi)]
    wide = shown.pivot_table(index=["site", "method"], columns="alpha", values="KL [95% CI]", aggfunc="first")
    wide.columns = [f"alpha={a:g}" for a in wide.columns]
    return markdown_table(wide.reset_index())


def render_report(result: InterpretResult) -> str:
    """The markdown report of an ``InterpretResult``."""
    st = result.settings
    lines = ["# From shift to steering and back", "",
             f"Sites: {', '.join(st.get('sites') or []) or 'none'}; {st.get('n_users')} test users, "
             f"{st.get('n_queries')} held-out queries; delta subspace: top {st.get('k')} centred PCs of the "
             f"users' delta vectors (positions `{st.get('delta_positions')}`); prompts as evaluated: "
             f"{st.get('prompts')}.", ""]
    if result.notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in result.notes] + [""]
    lines += ["## Training-free steering with the measured shifts", ""]
    if result.kl.empty:
        lines += ["Not run (see the notes).", ""]
    else:
        lines += [f"KL(p_enhanced || p_steered) over the label set, nats; mean over users with a "
                  f"{st.get('n_boot')}-resample bootstrap 95% interval. alpha=0 is the unsteered plain prompt; "
                  "`full` adds the user's delta, `personal` its deviation from the mean delta, `pca` its "
                  "projection on the delta subspace; `other_user` (a derangement) and `random` (norm-matched) "
                  "are controls. The deltas were measured on the users' cached queries, which may include "
                  "these held-out queries.", "", _kl_table(result.kl), ""]
    lines += ["## Do the learned interventions live where the shifts live?", ""]
    if result.alignment.empty:
        lines += ["Not run (see the notes).", ""]
    else:
        summary = (result.alignment.groupby(["site", "bank", "group", "rank"], sort=False)
                   .agg(users=("user_id", "size"), overlap=("overlap", "mean"), null_overlap=("null_overlap", "mean"),
                        percentile=("percentile", "mean"), min_angle_deg=("min_angle_deg", "mean")).reset_index())
        lines += [f"Principal angles between the delta subspace and the row space of the learned R; overlap = "
                  f"mean cos^2 of the angles, against {st.get('n_null')} random subspaces of R's dimension "
                  "(percentile of the observed overlap among them; stage 2 averaged over users).", "",
                  markdown_table(summary), ""]
        if not result.energy.empty:
            energy = result.energy.groupby("site").agg(share=("share", "mean"), chance=("chance", "first"),
                                                       users=("user_id", "size")).reset_index()
            lines += ["Share of the personal edits' energy inside the delta subspace (mean over users) "
                      "against chance (k/d):", "", markdown_table(energy), ""]
    lines += ["## What do the directions say?", ""]
    if result.lens_tokens.empty:
        lines += ["Not run (see the notes).", ""]
    else:
        tokens = result.lens_tokens[(result.lens_tokens.direction != "user") & (result.lens_tokens["rank"] <= 5)]
        shown = (tokens.groupby(["site", "direction", "sign"], sort=False)["token"]
                 .apply(lambda t: " ".join(repr(x) for x in t)).reset_index())
        lines += ["Logit lens (final norm, then unembedding) of each direction added to the mean plain state "
                  "of the site: top promoted and demoted tokens.", "", markdown_table(shown), ""]
        if not result.lens_labels.empty:
            lab = result.lens_labels[result.lens_labels.direction != "user"]
            wide = lab.pivot_table(index=["site", "direction"], columns="label", values="logprob_shift").reset_index()
            lines += ["Shift of each label's log-probability:", "", markdown_table(wide), ""]
    if not result.stats.empty:
        lines += ["Correlations (two-sided p-values): the lens' expected-rating shift of each user's personal "
                  "direction against the user's mean history rating; the held-out plain state projected on "
                  "the user's personal direction against the gold rating (per query and per user).", "",
                  markdown_table(result.stats), ""]
    return "\n".join(lines) + "\n"
