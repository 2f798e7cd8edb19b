"""Tests for sde_grpo.py, the SDE-GRPO (DanceGRPO) baseline, and its side-by-side run with Neighbor GRPO."""

import copy
import dataclasses
import math
import types

import pytest
import torch

import flux
import neighbor_grpo as ng
import sde_grpo as sde
from conftest import FLUX_SCHEDULER, assert_same_figures, fixed_tiny_run, read_log, update_gradients


def sde_cfg(tmp_path=None, *args):
    return sde.parse_config(["--preset=tiny", *args] + ([f"--out_dir={tmp_path}"] if tmp_path else []))


def test_sde_step_matches_an_independent_evaluation():
    """DanceGRPO writes the step through the score s = -(x - (1 - t) x0) / t^2; the paper through eps_hat."""
    gen = torch.Generator().manual_seed(14)
    x, v = torch.randn(3, 16, 8, generator=gen), torch.randn(3, 16, 8, generator=gen)
    t, t_next, eta = 0.7, 0.55, 0.3
    x0 = x - t * v
    score = -(x - x0 * (1 - t)) / t**2
    expected_mean = x + (t_next - t) * v + (-0.5 * eta**2 * score) * (t_next - t)
    mean, std = sde.sde_step(x, v, t, t_next, eta)
    assert std == pytest.approx(eta * math.sqrt(t - t_next)) and torch.allclose(mean, expected_mean, atol=1e-6)
    sample = mean + std * torch.randn(mean.shape, generator=gen)
    log_prob = torch.distributions.Normal(mean, std).log_prob(sample).flatten(1).mean(1)
    assert torch.allclose(sde.gaussian_log_prob(sample, mean, std), log_prob, atol=1e-5)


@pytest.mark.parametrize("mu,s", [(2.0, 0.5), (0.5, 1.0)])
def test_sde_sampling_keeps_the_ode_marginal_on_a_gaussian_flow(mu, s):
    def v_exact(x, t):
        var = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - (1 - t) * mu) - mu

    n, grid = 200_000, ng.time_grid(100, 256, FLUX_SCHEDULER, shift=3.0)
    x1 = torch.randn(n, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    ode = ng.rollout(v_exact, x1, grid, "euler")[0][:, -1].flatten()
    states, log_probs = sde.sde_rollout(v_exact, x1, grid, 0.3, torch.Generator().manual_seed(16))
    final = states[:, -1].flatten()
    se_mean, se_var = s / math.sqrt(n), s**2 * math.sqrt(2 / n)
    assert abs(final.mean() - ode.mean()) < 3 * se_mean and abs(final.var() - ode.var()) < 3 * se_var
    assert log_probs.shape == (n, 99) and torch.isfinite(log_probs).all()  # the last step is deterministic
    x, gen = x1.float(), torch.Generator().manual_seed(16)  # the same noise without eq. 5's drift correction
    for k in range(100):
        std = 0.3 * math.sqrt(grid[k] - grid[k + 1])
        x = ng.euler_step(x, v_exact(x, grid[k]), grid[k], grid[k + 1]) + std * torch.randn(x.shape, generator=gen)
    assert x.flatten().var() - ode.var() > 20 * se_var


def test_sde_baseline_trains_every_sample_on_its_own_steps(tmp_path):
    cfg = sde_cfg(tmp_path, "--num_steps=6", "--num_train_steps=3", "--iterations=2", "--sample_every=0",
                  "--eval_every=0", "--group_size=4")
    steps = []
    spy = dataclasses.replace(sde.SDE, objective=lambda *args: steps.extend((j, k) for _, j, k in args[0]) or
                              sde.sde_objective(*args))
    ng.train(cfg, spy)
    assert len(steps) == 2 * 4 * 3 and {j for j, _ in steps} == {0, 1, 2, 3} and max(k for _, k in steps) <= 4
    log = read_log(tmp_path)
    assert log[0]["nfe_theta"] == 3 and log[0]["first_anchor_abs_log_ratio"] < 1e-5  # rho = 1 at theta_old
    with pytest.raises(ng.ConfigError, match="num_train_steps"):
        sde_cfg(None, "--num_steps=8", "--num_train_steps=8")


def test_sde_step_on_a_group_is_one_step_on_the_mean_of_its_per_sample_gradients(tiny_pipe):
    """DanceGRPO's accumulation: sde_samples_per_step = G is one optimizer step on the averaged gradient; 1 is G
    steps."""
    cfg = sde_cfg(None, "--group_size=4", "--num_steps=4", "--num_train_steps=2", "--sde_samples_per_step=4",
                  "--max_grad_norm=1e9")
    grid, gen = ng.pipeline_grid(tiny_pipe, cfg, 4), torch.Generator().manual_seed(20)
    cond = flux.encode_prompt(tiny_pipe, "a blue sphere", cfg, {})
    states, logp_old = sde.sde_group_rollout(tiny_pipe, cond, cfg, grid, gen, torch.float32)
    adv = sde.std_advantages(torch.randn(4, generator=gen))
    anchors, steps = sde.sample_sde_steps(4, 4, 2, gen)
    group = sde.SDEGroup("a blue sphere", cond, states, logp_old, torch.zeros(1, 4), adv, anchors, steps)
    model = copy.deepcopy(tiny_pipe.transformer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = types.SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), method=sde.SDE,
                                grid=grid, dtype=torch.float32, reference=None)
    ng.policy_update(run.model, run.optimizer, run.method, [group], run.grid, cfg, run.dtype)
    reference = copy.deepcopy(tiny_pipe.transformer)  # per-sample gradients of -J / K, averaged over the group
    for b, j in enumerate(anchors):
        for k in steps[b]:
            terms = [(group, j, k)]
            J = sde.sde_objective(terms, *ng.transition_velocities(reference, terms, grid, torch.float32), grid, cfg)[0]
            (-J.sum() / (2 * 4)).backward()
    moved = 0.0
    for n, p in model.named_parameters():
        g = dict(reference.named_parameters())[n].grad
        expected = before[n] - (g if g is not None else 0)
        assert torch.allclose(p.detach(), expected, rtol=1e-4, atol=1e-7), n
        moved += (p.detach() - before[n]).abs().sum().item()
    assert moved > 0
    calls = []
    run.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    run.optimizer.register_step_pre_hook(lambda *_: calls.append(1))
    ng.policy_update(run.model, run.optimizer, run.method, [group], run.grid,
                     dataclasses.replace(cfg, sde_samples_per_step=1), run.dtype)
    assert len(calls) == 4


def test_batched_sde_update_has_the_gradient_of_one_transition_per_call():
    """2 groups x 4 samples x K = 3 transitions per optimizer step, in calls of 5 or 1."""
    args = ["--group_size=4", "--num_steps=5", "--num_train_steps=3", "--sde_samples_per_step=2"]
    batched, single = (update_gradients(sde.parse_config, sde.SDE, n, *args) for n in (5, 1))
    assert len(batched) == len(single) == 2
    for step_b, step_1 in zip(batched, single, strict=True):
        scale = max(g.abs().max() for g in step_1)
        assert scale > 0 and max((a - b).abs().max() for a, b in zip(step_b, step_1)) < 1e-5 * scale


def test_std_advantages_are_eq_3():
    r = torch.tensor([0.31, 0.35, 0.29, 0.40, 0.33, 0.30])
    assert torch.allclose(sde.std_advantages(r), (r - r.mean()) / r.std(), atol=1e-6)
    assert torch.equal(sde.std_advantages(torch.full((12,), 0.3)), torch.zeros(12))
    assert torch.allclose(ng.group_advantages(sde.std_advantages(torch.stack([r, 2 * r])), (1.0, 1.0)),
                          2 * sde.std_advantages(r))




def test_nfe_theta_of_the_sde_baseline_is_table_3s():
    assert ng.nfe_theta(B=12, G=12, K=sde.SDEConfig().num_train_steps) == 14.0  # DanceGRPO trains all G samples


@pytest.mark.parametrize("args,field", [(["--sde_samples_per_step=0"], "sde_samples_per_step"),
                                        (["--sde_eta=0"], "sde_eta"), (["--num_train_steps=25"], "num_train_steps")])
def test_bad_sde_config_fails_with_one_line_naming_the_field(args, field, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sde.main(["--preset=tiny", f"--out_dir={tmp_path}", *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and field in err


def test_help_prints_the_baselines_fields_too(capsys):
    with pytest.raises(SystemExit):
        sde.parse_config(["--help"])
    out = capsys.readouterr().out
    assert all(f.name in out for f in dataclasses.fields(sde.SDEConfig)) and "SDE-GRPO" in out


# (loss, mean training reward, clip fraction) of the fixed tiny run as the baseline, recorded before the split
SDE_RECORDED = [(-8.41100700199604e-09, 0.5063787698745728, 0.0),
                        (-7.741618901491165e-09, 0.5137047171592712, 0.0),
                        (-2.0780134946107864e-08, 0.5109555125236511, 0.0)]


def test_a_fixed_tiny_sde_run_reproduces_its_recorded_numbers(tmp_path):
    assert_same_figures(fixed_tiny_run(tmp_path, sde.parse_config, sde.SDE), SDE_RECORDED)


def test_every_sample_is_trained_on_its_own_steps_never_the_last():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        samples, sde_steps = sde.sample_sde_steps(12, 25, 14, gen)
        assert sorted(samples) == list(range(12)) and len(sde_steps) == 12
        assert all(len(set(s)) == 14 and max(s) < 24 for s in sde_steps)  # never the last transition
        assert len({tuple(s) for s in sde_steps}) > 1
