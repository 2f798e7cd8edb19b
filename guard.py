"""
The guard against reward hacking, beside neighbor_grpo.py's loop: after each held-out evaluation, whether a judge the
run never trains on (guard_rewards) has fallen, whether the model is the best so far, and whether the run stops
(docs/decisions.md). A pure function of the evaluation history, JSON in and out (checkpoints keep it); neighbor_grpo.py
exports the best model (checkpoints.export_best). Imports nothing of ours.
"""

import math


def guard(state, it, summary, cfg, weights):
    """The decision after the evaluation at iteration it (summary: {reward: dict(mean, std, se)}), given the state the
    evaluations before it left ({} before the first; JSON, kept in checkpoints). A guard has fallen when its mean
    lies more than guard_tolerance standard errors below its best so far. The model is the best so far when no guard
    has fallen and its held-out training score is the highest yet: each training reward's gain since the first
    evaluation in units of that evaluation's standard deviation, weighted as the advantages are. The run stops after
    guard_patience evaluations in a row with a fallen guard."""
    first = state.get("first") or {n: summary[n] for n in cfg.rewards}
    score = sum(w * (summary[n]["mean"] - first[n]["mean"]) / (first[n]["std"] or 1.0)
                for n, w in zip(cfg.rewards, weights))
    peaks = dict(state.get("peaks", {}))  # guard -> [best mean so far, its iteration]
    for g in cfg.guard_rewards:
        if g in summary and not math.isnan(summary[g]["mean"]) and summary[g]["mean"] > peaks.get(g, [-math.inf])[0]:
            peaks[g] = [summary[g]["mean"], it]
    fallen = {g: [*peaks[g], summary[g]["mean"], summary[g]["se"]] for g in peaks  # [best, at, now, se]
              if summary[g]["mean"] < peaks[g][0] - cfg.guard_tolerance * summary[g]["se"]}
    new_best = not fallen and score > state.get("best", {}).get("score", -math.inf)
    streak = state.get("streak", 0) + 1 if fallen else 0
    return dict(iteration=it, first=first, peaks=peaks, fallen=fallen, streak=streak, new_best=new_best,
                stop=bool(cfg.guard_patience) and streak >= cfg.guard_patience,
                best=dict(iteration=it, score=score, scores=summary) if new_best else state.get("best"))
