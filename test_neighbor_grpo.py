"""Tests for neighbor_grpo.py: the math on tiny tensors, the solvers against diffusers, the loop on a tiny FLUX."""

import dataclasses
import importlib.util
import json
import math
import os
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import evaluate
import flux
import models
import neighbor_grpo as ng
import preflight
import report
from conftest import (FLUX_SCHEDULER, assert_same_figures, exported, fixed_tiny_run, launch, max_abs_diff, read_log,
                      tiny_cfg, update_gradients)


def smooth_velocity(x, t):
    """A nonlinear, time-dependent velocity field for solver comparisons."""
    return torch.tanh(x) * (1.5 - t) + math.sin(3 * t) * x - 0.3


# ---------------------------------------------------------------------------- neighborhood noise (eq. 7, Sec. 3.4.1)


def test_perturbed_noise_keeps_unit_variance_and_neighbors_are_equidistant():
    gen = torch.Generator().manual_seed(0)
    G, D, sigma = 12, 2025 * 64, 0.3
    x = ng.perturbed_noise(torch.randn(1, D, generator=gen), torch.randn(G, D, generator=gen), sigma)
    assert abs(x.var().item() - 1) < 0.01 and abs(x.mean().item()) < 0.01
    d = torch.cdist(x, x).pow(2) / D  # mean squared distance per element between neighbors
    off = d[~torch.eye(G, dtype=torch.bool)]
    # Johnson-Lindenstrauss: every pair sits at 2 sigma^2 to within a fraction of a percent
    assert torch.allclose(off, torch.full_like(off, 2 * sigma**2), rtol=0.02)
    assert off.std() / off.mean() < 0.01


# ---------------------------------------------------------------------------- advantages (eq. 11)


def test_quasi_norm_keeps_sign_and_order_and_sums_to_zero():
    r = torch.tensor([0.31, 0.35, 0.29, 0.40, 0.33, 0.30])
    a = ng.quasi_norm_advantages(r, 0.8)
    c = r - r.mean()
    assert torch.equal(torch.sign(a), torch.sign(c))
    assert torch.equal(torch.argsort(a), torch.argsort(r))
    assert abs(a.sum().item()) < 1e-6
    assert abs(a.abs().pow(0.8).sum().item() - 1) < 1e-5  # unit L_0.8 quasi-norm


def test_quasi_norm_p2_is_std_normalised_grpo_up_to_a_constant():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(5, 12, generator=gen) * torch.rand(5, 1, generator=gen)  # groups of different spread
    std_grpo = (rewards - rewards.mean(1, keepdim=True)) / rewards.std(1, keepdim=True)  # eq. 3
    ratio = ng.quasi_norm_advantages(rewards, 2.0) / std_grpo
    assert torch.allclose(ratio, torch.full_like(ratio, ratio[0, 0].item()), rtol=1e-5)
    assert math.isclose(ratio[0, 0].item(), 1 / math.sqrt(11), rel_tol=1e-5)  # 1 / sqrt(G - 1)


def test_quasi_norm_down_weights_a_flat_group_against_a_sparse_one():
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    sparse = torch.tensor([1.0, -1.0] + [0.0] * 10)
    for p, shrinks in ((0.8, True), (0.5, True), (2.0, False)):
        a_flat, a_sparse = ng.quasi_norm_advantages(flat, p), ng.quasi_norm_advantages(sparse, p)
        ratio = a_flat.norm() / a_sparse.norm()  # the size of the update each group drives
        assert (ratio < 0.5) if shrinks else math.isclose(ratio.item(), 1.0, rel_tol=1e-5)


def test_all_equal_group_gives_zero_advantages_never_nan():
    for p in (0.5, 0.8, 2.0):
        a = ng.quasi_norm_advantages(torch.full((12,), 0.3), p)
        assert torch.equal(a, torch.zeros(12))
    rewards = torch.stack([torch.full((4,), 2.0), torch.tensor([1.0, 2.0, 3.0, 4.0])])
    a = ng.group_advantages(ng.quasi_norm_advantages(rewards, 0.8), (1.0, 1.0))
    assert torch.isfinite(a).all() and torch.equal(a, ng.quasi_norm_advantages(torch.tensor([1.0, 2, 3, 4]), 0.8))


def test_multi_reward_advantages_are_the_weighted_sum_of_per_model_advantages():
    gen = torch.Generator().manual_seed(2)
    rewards = torch.stack([torch.rand(12, generator=gen) * 0.1, torch.randn(12, generator=gen) * 3])  # unlike scales
    a = ng.group_advantages(ng.quasi_norm_advantages(rewards, 0.8), (1.0, 0.5))
    expected = ng.quasi_norm_advantages(rewards[0], 0.8) + 0.5 * ng.quasi_norm_advantages(rewards[1], 0.8)
    assert torch.allclose(a, expected)



def test_eq_11_by_value_on_a_hand_worked_group():
    """rewards 1, 2, 4: centred -4/3, -1/3, 5/3; L_1 norm 10/3; L_0.5 (sqrt(4/3) + sqrt(1/3) + sqrt(5/3))^2 = 9.138803;
    L_2 sqrt(42) / 3."""
    r = torch.tensor([1.0, 2.0, 4.0])
    assert ng.quasi_norm_advantages(r, 1.0).tolist() == pytest.approx([-0.4, -0.1, 0.5], abs=1e-7)
    assert ng.quasi_norm_advantages(r, 0.5).tolist() == pytest.approx([-0.1458980, -0.0364745, 0.1823725], abs=1e-6)
    assert ng.quasi_norm_advantages(r, 2.0).tolist() == pytest.approx([-4 / 42**0.5, -1 / 42**0.5, 5 / 42**0.5])


def test_nfe_theta_reproduces_table_3():
    assert round(ng.nfe_theta(B=4, G=12, K=4), 2) == 1.33
    assert ng.nfe_theta(B=4, G=12, K=9) == 3.0
    assert ng.nfe_theta(B=12, G=12, K=4) == 4.0


def test_anchors_and_steps_are_distinct_and_in_range():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        anchors, steps = ng.sample_anchors_and_steps(12, 4, 8, 4, gen)
        assert len(set(anchors)) == 4 and all(0 <= j < 12 for j in anchors)
        assert all(s == steps[0] for s in steps) and len(steps) == 4  # the transitions are shared by the anchors
        assert len(set(steps[0])) == 4 and steps[0] == sorted(steps[0]) and all(0 <= k < 8 for k in steps[0])


# ---------------------------------------------------------------------------- surrogate and objective (eqs. 8, 9)


def neighborhood(G=6, D=4096, sigma=0.3, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return ng.perturbed_noise(torch.randn(1, D, generator=gen), torch.randn(G, D, generator=gen), sigma)


def objective_at(anchor, candidates, j, adv, distance="mean", clip_range=1e-4):
    logp = ng.surrogate_log_probs(ng.neighbor_distances(candidates, anchor, reduction=distance))
    logp_old = ng.surrogate_log_probs(ng.neighbor_distances(candidates, candidates[j], reduction=distance))
    return ng.grpo_objective(adv, logp, logp_old, clip_range)[0]


def test_eq_8_and_eq_9_by_value_on_a_hand_worked_neighborhood():
    """Candidates (0, 0), (1, 0), (0, 2) around the anchor (0, 0): squared L2 summed 0, 1, 4 (mean: 0, 0.5, 2), L1
    summed 0, 1, 2; log softmax(-d) of 0, 1, 4 is -d - log(1 + e^-1 + e^-4) = -d - 0.3265626. Eq. 9 with A = -0.4,
    -0.1, 0.5, log rho = 0.1, 0, -0.1 and eps = 0.05: min(A rho, A clip(rho)) = -0.4 e^0.1, -0.1, 0.5 e^-0.1."""
    X, anchor = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]), torch.zeros(2)
    assert ng.neighbor_distances(X, anchor, "squared_l2", "sum").tolist() == [0.0, 1.0, 4.0]
    assert ng.neighbor_distances(X, anchor).tolist() == [0.0, 0.5, 2.0]  # the defaults: squared L2, mean
    assert ng.neighbor_distances(X, anchor, "l1", "sum").tolist() == [0.0, 1.0, 2.0]
    logp = ng.surrogate_log_probs(torch.tensor([0.0, 1.0, 4.0]))
    assert logp.tolist() == pytest.approx([-0.3265626, -1.3265626, -4.3265626], abs=1e-6)
    adv, log_ratio = torch.tensor([-0.4, -0.1, 0.5]), torch.tensor([0.1, 0.0, -0.1])
    J, clip_frac = ng.grpo_objective(adv, log_ratio, torch.zeros(3), 0.05)
    assert J.item() == pytest.approx(-0.4 * math.exp(0.1) - 0.1 + 0.5 * math.exp(-0.1), abs=1e-6)
    assert J.item() == pytest.approx(-0.0896497, abs=1e-6) and clip_frac.item() == pytest.approx(2 / 3)


def test_the_distance_metric_and_reduction_are_fields_and_older_names_still_parse():
    cfg = tiny_cfg(None, "--distance_metric=l1", "--distance=sum")  # --distance: distance_reduction's older name
    assert (cfg.distance_metric, cfg.distance_reduction) == ("l1", "sum")
    assert "distance l1 (sum)" in ng.NEIGHBOR.describe(cfg)
    X = neighborhood(G=4, D=64)
    l1, l2 = (ng.neighbor_distances(X, X[0] + 0.1, m) for m in ng.DISTANCE_METRICS)
    assert not torch.allclose(l1, l2) and torch.argmin(l1) == torch.argmin(l2) == 0


def test_positive_advantage_pulls_the_anchor_and_negative_pushes_it_away():
    X, j, a, b = neighborhood(), 0, 2, 4
    adv = torch.zeros(6)
    adv[a], adv[b] = 1.0, -1.0
    anchor = X[j].clone().requires_grad_(True)
    objective_at(anchor, X, j, adv).backward()
    stepped = X[j] + 1e-3 * anchor.grad  # a small step of gradient ascent on J
    d_before, d_after = ng.neighbor_distances(X, X[j]), ng.neighbor_distances(X, stepped)
    assert d_after[a] < d_before[a]  # pulled towards the high-reward candidate
    assert d_after[b] > d_before[b]  # pushed away from the low-reward one


def test_clip_zeroes_the_gradient_exactly_where_ppo_says():
    eps = 0.1
    rho = torch.tensor([1 - 2 * eps, 1 - eps / 2, 1 + eps / 2, 1 + 2 * eps] * 2)
    adv = torch.tensor([1.0] * 4 + [-1.0] * 4)
    logp = torch.log(rho).requires_grad_(True)
    J, clip_frac = ng.grpo_objective(adv, logp, torch.zeros(8), eps)
    J.backward()
    # PPO: the clip removes the gradient of A > 0 with rho > 1 + eps and of A < 0 with rho < 1 - eps, nothing else
    zero = torch.tensor([False, False, False, True, True, False, False, False])
    assert torch.equal(logp.grad == 0, zero)
    assert torch.allclose(logp.grad[~zero], (adv * rho)[~zero])
    assert clip_frac.item() == 0.5


def test_summed_distance_on_1e5_elements_stays_finite():
    X = neighborhood(G=12, D=2025 * 64)
    drift = 0.05 * torch.randn(2025 * 64, generator=torch.Generator().manual_seed(5))
    anchor = (X[0] + drift).requires_grad_(True)  # log-ratios of O(1e3): exp would overflow fp32
    adv = ng.quasi_norm_advantages(torch.randn(12, generator=torch.Generator().manual_seed(6)), 0.8)
    J = objective_at(anchor, X, 0, adv, distance="sum")
    J.backward()
    assert torch.isfinite(J) and torch.isfinite(anchor.grad).all()


def test_rho_is_one_and_gradient_is_minus_sum_adv_grad_distance_at_theta_old(tiny_pipe):
    cfg = tiny_cfg(None, "--rollout_solver=euler", "--group_size=6")
    grid = ng.time_grid(cfg.num_steps, flux.latent_shape(tiny_pipe, cfg.resolution)[0], tiny_pipe.scheduler.config)
    cond = flux.encode_prompt(tiny_pipe, "a red cube", cfg, {})
    states, train_next = ng.neighborhood_rollout(tiny_pipe, cond, cfg, grid, torch.Generator().manual_seed(7),
                                                 torch.float32, 6, 0.3)
    adv = ng.quasi_norm_advantages(torch.randn(6, generator=torch.Generator().manual_seed(8)), 0.8)
    model, j, k = tiny_pipe.transformer, 2, 5
    params = [p for p in model.parameters() if p.requires_grad]
    group = ng.Group("a red cube", cond, states, states[:, 1:], torch.zeros(1, 6), adv, [j], [[k]])
    terms = [(group, j, k)]
    J, _, abs_log_ratio = ng.anchor_objective(terms, *ng.transition_velocities(model, terms, grid, torch.float32),
                                              grid, cfg)
    grad_J = torch.autograd.grad(J.sum(), params, allow_unused=True)
    assert abs_log_ratio < 1e-5  # matching solvers at theta = theta_old: rho = 1
    x = states[j, k].unsqueeze(0)
    x_theta = ng.euler_step(x, flux.velocity(model, x, grid[k], cond), grid[k], grid[k + 1])[0]
    grad_d = torch.autograd.grad(-(adv * ng.neighbor_distances(states[:, k + 1], x_theta)).sum(), params,
                                 allow_unused=True)
    pairs = [(a, b) for a, b in zip(grad_J, grad_d) if a is not None]
    assert pairs and all(torch.allclose(a, b, rtol=1e-3, atol=1e-9) for a, b in pairs)
    assert sum(a.abs().sum() for a, _ in pairs) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_solver_old_anchor_gives_rho_one_at_theta_old_for_dpm_rollouts(tiny_pipe, dtype):
    """pi_old anchored at theta_old's own DDIM step (batched in the rollout) = pi_theta's (batch 1) before any
    update; anchored at the stored DPM++ state it is not, wherever the second-order step differs from Euler."""
    cfg = tiny_cfg(None, "--group_size=6", "--rollout_batch_size=6")
    grid = ng.pipeline_grid(tiny_pipe, cfg, cfg.num_steps)
    cond = flux.encode_prompt(tiny_pipe, "a red cube", cfg, {})
    states, train_next = ng.neighborhood_rollout(tiny_pipe, cond, cfg, grid, torch.Generator().manual_seed(7),
                                                 dtype, 6, 0.3)
    adv = ng.quasi_norm_advantages(torch.randn(6, generator=torch.Generator().manual_seed(8)), 0.8)
    ddim, stored = (ng.Group("a red cube", cond, states, old_next, torch.zeros(1, 6), adv, [], [])
                    for old_next in (train_next, states[:, 1:]))
    velocities = lambda terms: ng.transition_velocities(tiny_pipe.transformer, terms, grid, dtype)  # noqa: E731
    for j, k in [(0, 0), (1, 3), (4, 5), (5, 7)]:
        assert ng.anchor_objective([(ddim, j, k)], *velocities([(ddim, j, k)]), grid, cfg)[2] < 1e-6
    stored = ng.anchor_objective([(stored, 1, 4)], *velocities([(stored, 1, 4)]), grid, cfg)[2]
    assert stored > 1e-5  # the DPM++ / DDIM offset, already a tenth of the 1e-4 clip at initialisation
    for k in (0, -1):  # DPM++'s first-order steps out of t = 1 and into t = 0 are Euler steps
        assert torch.allclose(states[:, k + 1 if k == 0 else k], train_next[:, k], atol=1e-5)


def test_old_anchors_give_identical_updates_with_euler_rollouts(tmp_path):
    args = ["--rollout_solver=euler", "--iterations=2", "--sample_every=0", "--eval_every=0"]
    ng.train(tiny_cfg(tmp_path / "stored", *args, "--old_anchor=rollout"))
    ng.train(tiny_cfg(tmp_path / "ddim", *args, "--old_anchor=train_solver"))
    assert max_abs_diff(exported(tmp_path / "stored"), exported(tmp_path / "ddim")) == 0
    assert read_log(tmp_path / "stored")[1]["loss"] == read_log(tmp_path / "ddim")[1]["loss"]


# ---------------------------------------------------------------------------- time grid and solvers


@pytest.mark.parametrize("steps,seq_len", [(8, 2025), (16, 4096), (25, 256), (4, 1024)])
def test_time_grid_matches_flux_pipeline(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as FluxPipeline
    grid = ng.time_grid(steps, seq_len, scheduler.config)
    assert len(grid) == steps + 1 and grid[0] == 1.0 and grid[-1] == 0.0
    assert torch.allclose(torch.tensor(grid, dtype=torch.float64), scheduler.sigmas.double(), atol=1e-6)


def test_static_shift_replaces_the_dynamic_one():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 16, 16))
    grid = ng.time_grid(16, 2025, FLUX_SCHEDULER, shift=3.0)
    assert torch.allclose(torch.tensor(grid, dtype=torch.float64), scheduler.sigmas.double(), atol=1e-6)


def test_euler_matches_flow_match_euler_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    grid = ng.time_grid(8, 2025, FLUX_SCHEDULER)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    scheduler.set_timesteps(sigmas=grid[:-1], mu=0.0)  # mu = 0 leaves our already-shifted sigmas as they are
    x = x_ref = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(9))
    for k, t in enumerate(scheduler.timesteps):
        x_ref = scheduler.step(smooth_velocity(x_ref, grid[k]), t, x_ref).prev_sample
    ours, _ = ng.rollout(smooth_velocity, x, grid, "euler")
    assert ours.shape == (3, 9, 64, 16)
    assert torch.allclose(ours[:, -1], x_ref, atol=1e-5)


@pytest.mark.parametrize("steps", [3, 8, 16])
def test_dpm_solver_pp_2m_matches_diffusers(steps):
    from diffusers import DPMSolverMultistepScheduler

    grid = ng.time_grid(steps, 2025, FLUX_SCHEDULER)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(steps)
    scheduler.sigmas = torch.tensor(grid, dtype=torch.float32)  # the same sigmas as ours
    scheduler.timesteps = scheduler.sigmas[:-1] * 1000
    x = x_ref = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(10))
    for k, t in enumerate(scheduler.timesteps):
        x_ref = scheduler.step(smooth_velocity(x_ref, grid[k]), t, x_ref).prev_sample
    ours = ng.rollout(smooth_velocity, x, grid, "dpm++2m")[0][:, -1]
    assert torch.allclose(ours, x_ref, atol=1e-4)
    # out of t = 1 (r = inf), the step after it and the last step are first order: with 3 steps DPM++(2M) is Euler
    euler = ng.rollout(smooth_velocity, x, grid, "euler")[0][:, -1]
    assert torch.allclose(ours, euler, atol=1e-6) == (steps == 3)


@pytest.mark.parametrize("mu,s", [(2.0, 0.5), (0.5, 1.0)])
def test_dpm_solver_pp_2m_beats_euler_on_a_gaussian_flow(mu, s):
    """Data N(mu, s^2): the velocity E[eps - x0 | x_t] is analytic and the exact ODE maps noise z to mu + s z."""

    def v_exact(x, t):
        var = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - (1 - t) * mu) - mu

    z = torch.randn(16, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    err = {}
    for T in (8, 16, 32):
        for solver in ng.SOLVERS:
            final = ng.rollout(v_exact, z, ng.time_grid(T, 2025, FLUX_SCHEDULER), solver)[0][:, -1].double()
            err[solver, T] = (final - (mu + s * z)).pow(2).mean().sqrt().item()
    for T in (8, 16, 32):
        assert err["dpm++2m", T] < err["euler", T]
    order = {solver: math.log2(err[solver, 8] / err[solver, 32]) / 2 for solver in ng.SOLVERS}
    assert 0.8 < order["euler"] < 1.1  # first order
    assert order["dpm++2m"] > 1.2  # higher order, despite first-order first and last steps


def test_inference_sampler_is_flux_pipeline_sampling(tiny_pipe):
    """sigma = 0, G = 1 is plain ODE sampling: with Euler it reproduces FluxPipeline's latents."""
    cfg = tiny_cfg(None, "--rollout_solver=euler")
    grid = ng.time_grid(cfg.num_steps, flux.latent_shape(tiny_pipe, cfg.resolution)[0], tiny_pipe.scheduler.config)
    prompt = "a hamster resembling a horse"
    cond = flux.encode_prompt(tiny_pipe, prompt, cfg, {})
    ours = ng.neighborhood_rollout(tiny_pipe, cond, cfg, grid, torch.Generator().manual_seed(12),
                                   torch.float32, 1, 0.0)[0][:, -1]
    noise = ng.draw_noise(tiny_pipe, 1, cfg.resolution, torch.Generator().manual_seed(12), torch.device("cpu"))
    ref = tiny_pipe(prompt, height=cfg.resolution, width=cfg.resolution, num_inference_steps=cfg.num_steps,
                    guidance_scale=cfg.guidance_scale, latents=noise, output_type="latent",
                    max_sequence_length=cfg.max_sequence_length).images
    assert torch.allclose(ours, ref, atol=1e-5)


# ---------------------------------------------------------------------------- config and bad input


@pytest.mark.parametrize("args,field", [
    (["--num_anchors=13"], "num_anchors"),
    (["--num_train_steps=9"], "num_train_steps"),
    (["--noise_sigma=1.0"], "noise_sigma"),
    (["--noise_sigma=0"], "noise_sigma"),
    (["--adv_p=0"], "adv_p"),
    (["--adv_p=2.5"], "adv_p"),
    (["--clip_range=0"], "clip_range"),
    (["--group_size=1", "--num_anchors=1"], "group_size"),
    (["--rollout_solver=heun"], "rollout_solver"),
    (["--distance=l1"], "distance_reduction"),
    (["--distance_metric=cosine"], "distance_metric"),
    (["--old_anchor=stored"], "old_anchor"),
    (["--lora_rank=-1"], "lora_rank"),
    (["--lora_rank=4", "--parallel=fsdp"], "parallel"),
    (["--lora_path=/tmp"], "lora_path"),
    (["--lora_rank=4", "--lora_targets=to_nothing"], "lora_targets"),
    (["--lora_rank=4", "--lora_path=/nonexistent/lora"], "lora_path"),
    (["--rewards=aesthetics"], "rewards"),
    (["--reward_weights=1,2"], "reward_weights"),
    (["--resolution=100"], "resolution"),
    (["--lr=fast"], "lr"),
    (["--num_anchor=4"], "num_anchors"),
    (["--preset=huge"], "preset"),
    (["--prompt_file=/nonexistent/prompts.txt"], "prompt_file"),
    (["--update_batch_size=-1"], "update_batch_size"),  # 0 is auto
    (["--fp8=half"], "fp8"),
    (["--lora_rank=4", "--base_quantization=nf4", "--fp8=rollout"], "fp8"),
    (["--rewards=brightness", "--guard_rewards=brightness,jpeg_incompressibility"], "guard_rewards"),
    (["--guard_rewards=brightness", "--eval_every=0"], "guard_rewards"),
    (["--guard_rewards=realism"], "guard_rewards"),
    (["--kl_coef=-0.1"], "kl_coef"),
    (["--guard_tolerance=0"], "guard_tolerance"),
    (["--guard_patience=-1"], "guard_patience"),
    (["--out_dir=/dev/null/run"], "out_dir"),
    (["--base_quantization=nf4"], "base_quantization"),
    (["--lora_rank=4", "--base_quantization=nf4", "--parallel=fsdp"], "base_quantization"),
    (["--lora_rank=4", "--base_quantization=nf4", "--export_merged"], "base_quantization"),
    (["--lora_rank=4", "--base_quantization=int4"], "base_quantization"),
])
def test_bad_config_fails_with_one_line_naming_the_field(args, field, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        ng.main(["--preset=tiny", f"--out_dir={tmp_path}", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and err.startswith("error: ")


def test_command_line_overrides_presets_and_types():
    cfg = ng.parse_config(["--lr=3e-4", "--preset=tiny", "--rewards=jpeg_compressibility,mod:fn",
                           "--reward_weights=1,0.5", "--overwrite", "--num-steps=16"])
    assert cfg.model_path == "tiny" and cfg.lr == 3e-4 and cfg.num_steps == 16 and cfg.overwrite is True
    assert cfg.rewards == ("jpeg_compressibility", "mod:fn") and cfg.reward_weights == (1.0, 0.5)
    assert ng.Config().group_size == 12 and ng.Config().num_anchors == 4 and ng.Config().adv_p == 0.8


def test_help_prints_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ng.parse_config(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f.name in out for f in ng.dataclasses.fields(ng.SystemConfig))
    assert out.index("class Config") < out.index("num_anchors") < out.index("class SystemConfig") < out.index("lora_rank")


def test_empty_or_undecodable_prompt_files_are_one_line_errors_naming_the_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n")
    with pytest.raises(ng.ConfigError, match="prompt_file"):
        ng.load_prompts(str(path))
    path.write_text("a cat\n\na dog\n")
    assert ng.load_prompts(str(path)) == ["a cat", "a dog"]
    path.write_bytes("a caf\u00e9\n".encode("latin-1"))  # not UTF-8
    with pytest.raises(SystemExit):
        ng.main(["--preset=tiny", f"--out_dir={tmp_path / 'run'}", f"--prompt_file={path}"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"prompt_file={path}: not UTF-8" in err
    monkeypatch.setattr(ng, "HPDV2_FILES", dict(prompt_file=tmp_path / "missing.txt"))
    with pytest.raises(ng.ConfigError, match="prompt_file=hpdv2: .*missing.txt is missing; run python data/hpdv2/prep"):
        ng.load_prompts("hpdv2")


def nan_reward(images, prompts):
    return torch.full((len(images),), float("nan"))


def test_reward_returning_nan_fails_naming_the_reward_and_keeps_the_log(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ng.main(["--preset=tiny", f"--out_dir={tmp_path}", "--rewards=test_neighbor_grpo:nan_reward",
                 "--sample_every=0", "--iterations=2"])
    err = capsys.readouterr().err
    assert "test_neighbor_grpo:nan_reward" in err and "non-finite" in err
    assert (tmp_path / "config.json").exists()


def test_out_dir_holding_a_run_is_not_overwritten(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"iter": 0}\n')
    with pytest.raises(checkpoints.CheckpointError, match="out_dir"):
        ng.train(tiny_cfg(tmp_path))
    assert (tmp_path / "log.jsonl").read_text() == '{"iter": 0}\n'


# ---------------------------------------------------------------------------- the loop on the tiny preset


def test_tiny_run_writes_log_samples_and_a_diffusers_checkpoint(tmp_path, capsys):
    from diffusers import FluxTransformer2DModel
    from PIL import Image

    cfg = tiny_cfg(tmp_path, "--iterations=2", "--sample_every=1", "--num_samples=2", "--eval_every=2",
                   "--eval_size=3")
    ng.train(cfg)
    log = read_log(tmp_path)
    assert [r["iter"] for r in log] == [0, 1, 2]  # the last record is the final evaluation
    assert "eval/jpeg_compressibility" in log[0] and "eval/jpeg_compressibility" not in log[1]
    assert set(log[2]) == {"iter", "eval/jpeg_compressibility", "guard/fallen", "best_iter"}
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        f"iter_00000{i}.{ext}" for i in (0, 2) for ext in ("json", "md", "png")]
    for key in ("reward/jpeg_compressibility", "reward_std/jpeg_compressibility", "loss", "clip_frac",
                "first_anchor_abs_log_ratio", "nfe_old", "nfe_theta", "time/rollout", "time/reward",
                "time/update", "time/total"):
        assert key in log[0] and math.isfinite(log[0][key])
    assert log[0]["nfe_old"] == 8 and round(log[0]["nfe_theta"], 2) == 1.33
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(tmp_path / "samples/000002.png").size == (2 * 128, 128)  # 64 px images scaled up to be seen
    assert Image.open(tmp_path / "curves.png").size[0] > 0  # redrawn at each evaluation
    out = capsys.readouterr().out.splitlines()
    evals = [line for line in out if line.startswith("eval ")]
    assert len(evals) == 2 and evals[1].startswith("eval    2 | jpeg_compressibility -") and "± 0.0" in evals[1]
    assert evals[1].endswith("| 3 held-out prompts | best so far")
    first, last = log[0]["eval/jpeg_compressibility"], log[2]["eval/jpeg_compressibility"]
    assert out[-1] == (f"done | held-out (iterations 0 -> 2): jpeg_compressibility {first:.4f} -> {last:.4f} "
                       f"({last - first:+.4f}) | best model (iteration 2: jpeg_compressibility {last:.4f}) in "
                       f"{tmp_path / 'best'} | in {tmp_path}: samples, curves.png, eval, transformer")
    banner, code = out[0], report.source_of(ng.NEIGHBOR)  # which choices and which code ran: a fork names itself
    assert banner.startswith("Neighbor GRPO | B=4 sigma=0.3 p=0.8 | distance squared_l2 (mean), pi_old at train_solver")
    assert code.startswith("neighbor_grpo.py sha256:") and f"| {code} |" in banner
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["code"] == code and saved["distance_metric"] == "squared_l2" and saved["distance_reduction"] == "mean"
    trained = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    initial = flux.build_random_flux(cfg.seed, **flux.TINY).transformer
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters()))


def test_tiny_preset_learns_and_lr_zero_does_not_move(tmp_path):
    """Mean reward of the last iterations clearly above the first; the same seeds with lr = 0 stay put.
    A sign error in the objective would make the reward fall instead."""
    means = {}
    for lr, iterations in (("1e-3", 48), ("0", 16)):  # the control: its first 8 iterations against its next 8
        out = tmp_path / lr
        ng.train(tiny_cfg(out, f"--iterations={iterations}", "--sample_every=0", "--eval_every=0", f"--lr={lr}"))
        r = [rec["reward/jpeg_compressibility"] for rec in read_log(out)]
        means[lr] = (sum(r[:8]) / 8, sum(r[-8:]) / 8, r[0])
    first, last, r0 = means["1e-3"]
    assert last - first > 0.3  # kB of JPEG saved per 64x64 image
    first0, last0, r0_frozen = means["0"]
    assert abs(last0 - first0) < 0.1
    assert r0 == r0_frozen  # the same prompts and noise: only the update differs


# (loss, mean training reward, clip fraction) per iteration of a fixed tiny run (brightness, seed 0, 3 iterations).
# A change to the algorithm changes them, as it should: re-record with `python conftest.py` (it prints these).
RECORDED = dict(
    train_solver=[(-4.000426270067692e-05, 0.5065285563468933, 0.5781250055879354),
                  (-3.7427060306072235e-05, 0.5129918456077576, 0.5260416595265269),
                  (-3.6665238440036774e-05, 0.5155649185180664, 0.4895833367481828)],
    rollout=[(-4.0717655792832375e-05, 0.5065285563468933, 0.5729166697710752),
             (-3.787269815802574e-05, 0.5129918456077576, 0.5468749948777258),
             (-3.5286881029605865e-05, 0.515647828578949, 0.5000000013969839)])


@pytest.mark.parametrize("old_anchor", ["train_solver", "rollout"])
def test_a_fixed_tiny_run_reproduces_its_recorded_numbers(tmp_path, old_anchor):
    """Fails on any change to the numbers: expected after an algorithm change (re-record), a bug after a refactoring."""
    assert_same_figures(fixed_tiny_run(tmp_path, ng.parse_config, ng.NEIGHBOR, f"--old_anchor={old_anchor}"),
                        RECORDED[old_anchor])


@pytest.mark.parametrize("args", [["--old_anchor=train_solver"], ["--old_anchor=rollout"],
                                  ["--lora_rank=4", "--lora_alpha=8", "--grad_checkpointing=true"]],
                         ids=["train_solver", "rollout", "lora with checkpointing"])
def test_batched_update_has_the_gradient_of_one_transition_per_call(args):
    """2 groups x K = 4 transitions per optimizer step in calls of 3 (calls that mix the groups' prompts) or 1."""
    batched, single = (update_gradients(ng.parse_config, ng.NEIGHBOR, n, *args) for n in (3, 1))
    assert len(batched) == len(single) == 4  # an optimizer step per anchor
    for step_b, step_1 in zip(batched, single, strict=True):
        scale = max(g.abs().max() for g in step_1)
        assert scale > 0 and max((a - b).abs().max() for a, b in zip(step_b, step_1)) < 1e-5 * scale


@pytest.mark.parametrize("base", [[], ["--lora_rank=8", "--lora_alpha=16", "--base_quantization=nf4"]],
                         ids=["bf16 base", "nf4 base"])
def test_lora_learns_and_lr_zero_does_not_move(tmp_path, base):
    """Adapters on the attention projections alone lift the mean brightness within a few iterations, on the
    full-precision base and on a 4-bit one (QLoRA)."""
    curves = {}
    for lr in ("3e-2", "0"):
        ng.train(tiny_cfg(tmp_path / lr, "--lora_rank=4", "--lora_alpha=8", f"--lr={lr}", "--rewards=brightness",
                          "--iterations=12", "--sample_every=0", "--eval_every=0", "--ckpt_every=0", *base))
        curves[lr] = [rec["reward/brightness"] for rec in read_log(tmp_path / lr)]
    assert sum(curves["3e-2"][-4:]) / 4 - curves["3e-2"][0] > 0.03  # measured: 0.507 -> 0.58
    assert abs(sum(curves["0"][-4:]) / 4 - curves["0"][0]) < 0.01
    assert curves["3e-2"][0] == curves["0"][0]


# ---------------------------------------------------------------------------- QLoRA: LoRA on a 4-bit base


def test_nf4_base_velocity_is_within_16_percent_of_the_bf16_bases_on_the_digits_model():
    """Every nn.Linear of the digits transformer in NF4, bf16 compute as on a GPU: the velocity's relative error
    against the bf16 base's (measured 0.154; the model is small, so a block of 64 weights spans few rows), beside
    bf16's own against fp32 for scale (0.077). Every NF4 layer hands on bf16, as nn.Linear does under autocast."""
    import bitsandbytes as bnb

    v, dtypes = {}, {}
    for name, quantization, dtype in (("fp32", "", torch.float32), ("bf16", "", torch.bfloat16),
                                      ("nf4", "nf4", torch.bfloat16)):
        cfg = ng.parse_config(["--preset=digits", "--lora_rank=4", f"--base_quantization={quantization}"])
        pipe = models.load_pipeline(cfg, torch.device("cpu"), dtype)
        cond = flux.encode_prompt(pipe, "a handwritten digit 3, three", cfg, {})
        x = torch.randn(6, *flux.latent_shape(pipe, cfg.resolution), generator=torch.Generator().manual_seed(0))
        for m in pipe.transformer.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.register_forward_hook(lambda m, args, out: dtypes.update({out.dtype: m}) and None)
        with torch.no_grad():
            v[name] = flux.velocity(pipe.transformer, x, 0.6, cond, dtype)
    assert list(dtypes) == [torch.bfloat16]  # bitsandbytes' own returns fp32 after FLUX's fp32 LayerNorms
    error = lambda a, b: ((v[a] - v[b]).norm() / v[b].norm()).item()  # noqa: E731
    assert 0.10 < error("nf4", "bf16") < 0.16 and error("bf16", "fp32") < 0.09
    assert isinstance(pipe.transformer.proj_out, bnb.nn.Linear4bit)
    assert all(type(m) is not torch.nn.Linear or m.weight.requires_grad for m in pipe.transformer.modules())


def test_a_qlora_run_resumes_exactly_and_its_adapter_loads_onto_the_full_precision_base(tmp_path):
    args = ["--lora_rank=4", "--lora_alpha=8", "--lr=1e-2", "--base_quantization=nf4", "--sample_every=0",
            "--eval_every=0", "--ckpt_every=2"]
    ng.train(tiny_cfg(tmp_path / "straight", *args, "--iterations=4"))
    ng.train(tiny_cfg(tmp_path / "resumed", *args, "--iterations=2"))
    ng.train(tiny_cfg(tmp_path / "resumed", *args, "--iterations=4", "--resume"))
    assert max_abs_diff(exported(tmp_path / "straight"), exported(tmp_path / "resumed")) == 0
    pipe = flux.build_random_flux(0, **flux.TINY)  # the same random base, unquantized
    pipe.load_lora_weights(tmp_path / "straight/lora")  # every adapter tensor lands (diffusers checks the keys)
    adapted = {n for n, _ in pipe.transformer.named_parameters() if "lora_B" in n}
    assert len(adapted) == len([k for k in exported(tmp_path / "straight") if "lora_B" in k]) > 0


def test_without_bitsandbytes_a_4_bit_base_is_a_one_line_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ng.ConfigError, match="base_quantization=nf4 needs the bitsandbytes package"):
        tiny_cfg(None, "--lora_rank=4", "--base_quantization=nf4")


# ---------------------------------------------------------------------------- the guard and the pull (kl_coef)


def guard_history(guard_means, train_means, tolerance=2.0, patience=2, se=0.01):
    """ng.guard over a synthetic history: a training reward and a guard g, each with standard error se."""
    cfg = types.SimpleNamespace(rewards=("r",), guard_rewards=("g",), guard_tolerance=tolerance,
                                guard_patience=patience)
    state, states = {}, []
    for e, (g, r) in enumerate(zip(guard_means, train_means)):
        summary = {"r": dict(mean=r, std=0.1, se=se), "g": dict(mean=g, std=0.1, se=se)}
        state = ng.guard(state, 25 * e, summary, cfg, (1.0,))
        states.append(state)
    return states


def test_guard_falls_two_standard_errors_below_its_best_and_stops_after_patience():
    states = guard_history([0.30, 0.32, 0.31, 0.279, 0.27, 0.26], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert [bool(s["fallen"]) for s in states] == [False, False, False, True, True, True]  # 0.279 < 0.32 - 0.02
    assert [s["stop"] for s in states] == [False, False, False, False, True, True]
    assert [s["best"]["iteration"] for s in states] == [0, 25, 50, 50, 50, 50]  # the reward rose; the guard fell
    assert states[4]["fallen"] == {"g": [0.32, 25, 0.27, 0.01]}  # from its best (at 25) to now, with its s.e.


def test_a_guard_wobbling_within_its_standard_error_never_falls():
    states = guard_history([0.30, 0.31, 0.292, 0.305, 0.291, 0.31], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert not any(s["fallen"] for s in states) and states[-1]["best"]["iteration"] == 125


def test_a_guard_that_recovers_resets_the_count_and_never_stops_a_run():
    states = guard_history([0.30, 0.32, 0.25, 0.33, 0.26, 0.34], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert [s["streak"] for s in states] == [0, 0, 1, 0, 1, 0] and not any(s["stop"] for s in states)
    assert [s["new_best"] for s in states] == [True, True, False, True, False, True]
    assert not guard_history([0.3, 0.2, 0.1, 0.0], [0, 1, 2, 3], patience=0)[-1]["stop"]  # 0: never stop


def test_the_best_models_score_weighs_each_training_reward_in_its_own_spread():
    cfg = types.SimpleNamespace(rewards=("hps", "imagereward"), guard_rewards=(), guard_tolerance=2.0,
                                guard_patience=2)
    first = {"hps": dict(mean=0.30, std=0.01, se=0.001), "imagereward": dict(mean=1.0, std=1.0, se=0.1)}
    state = ng.guard({}, 0, first, cfg, (0.5, 0.5))
    hps_up = ng.guard(state, 25, {**first, "hps": dict(mean=0.32, std=0.01, se=0.001)}, cfg, (0.5, 0.5))
    ir_up = ng.guard(state, 25, {**first, "imagereward": dict(mean=1.5, std=1.0, se=0.1)}, cfg, (0.5, 0.5))
    assert hps_up["best"]["score"] == pytest.approx(1.0) and ir_up["best"]["score"] == pytest.approx(0.25)


def test_a_guarded_run_stops_exports_its_best_and_a_resumed_one_decides_alike(tmp_path, capsys):
    """Training makes images JPEG-compressible, which a guard scoring JPEG incompressibility sees falling."""
    args = ["--guard_rewards=jpeg_incompressibility", "--eval_every=2", "--eval_size=6", "--sample_every=0",
            "--ckpt_every=2", "--lr=3e-3", "--iterations=30"]
    ng.train(tiny_cfg(tmp_path / "straight", *args))
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    log = read_log(tmp_path / "straight")
    stop = log[-1]["iter"]
    assert stop < 30 and log[-1]["guard/fallen"] == 1 and log[-3]["guard/fallen"] == 1  # patience 2
    assert closing.startswith(f"stopped by the guard at iteration {stop}: jpeg_incompressibility fell from ")
    best = json.loads((tmp_path / "straight/best/best.json").read_text())
    assert f"best model (iteration {best['iteration']}: jpeg_compressibility " in closing
    assert closing.endswith(f") in {tmp_path / 'straight/best'} | in {tmp_path / 'straight'}: curves.png, eval, transformer")
    assert best["iteration"] == log[-1]["best_iter"] < stop and "jpeg_incompressibility" in best["scores"]
    assert (tmp_path / "straight/checkpoints/latest").read_text() == f"step-{stop:06d}"
    ng.train(tiny_cfg(tmp_path / "resumed", *args[:-1], f"--iterations={stop - 2}"))
    ng.train(tiny_cfg(tmp_path / "resumed", *args, "--resume"))
    assert [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_log(tmp_path / "resumed")] == [
        {k: v for k, v in r.items() if not k.startswith("time/")} for r in log]
    assert json.loads((tmp_path / "resumed/best/best.json").read_text()) == best
    assert max_abs_diff(exported(tmp_path / "straight/best"), exported(tmp_path / "resumed/best")) == 0


def kl_run(*args):
    cfg = tiny_cfg(None, "--kl_coef=1", "--eval_every=0", "--sample_every=0", "--rewards=brightness", *args)
    run = ng.build(dataclasses.replace(cfg, overwrite=True, out_dir=str(Path(tempfile.mkdtemp()))))
    group = ng.make_group(run, cfg, "a red cube", torch.Generator().manual_seed(3))
    return run, cfg, [(group, j, k) for j in group.anchors[:2] for k in group.steps[0]]


@pytest.mark.parametrize("lora", [[], ["--lora_rank=4", "--lora_alpha=8"]], ids=["full", "lora"])
def test_the_pulls_gradient_is_zero_at_the_reference_and_pulls_back_once_moved(lora):
    run, cfg, terms = kl_run(*lora)
    params = [p for p in run.model.parameters() if p.requires_grad]
    pull = lambda: ng.transitions_loss(run.model, run.method, terms, run.grid, cfg, run.dtype, run.reference)[3]  # noqa
    kl = pull()
    assert kl.abs().max() == 0 and all(g is None or g.abs().max() == 0 for g in
                                       torch.autograd.grad(kl.sum(), params, allow_unused=True))
    with torch.no_grad():
        for p in params:
            p.add_(1e-2 * torch.randn_like(p))  # theta moves away from where it started (LoRA: B != 0)
    kl = pull()
    grads = torch.autograd.grad(kl.sum(), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(1e-3 * g if g is not None else 0)
    assert kl.min() > 0 and pull().sum() < kl.sum()  # a step down the pull's gradient moves theta back


def test_with_lora_the_reference_is_the_base_with_the_adapters_off():
    run, cfg, terms = kl_run("--lora_rank=4", "--lora_alpha=8")
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)  # the adapters now change the velocity
    base = flux.build_random_flux(cfg.seed, **flux.TINY).transformer  # the same random base, no adapters
    with torch.no_grad(), run.reference() as reference:
        v_ref = ng.transition_velocities(reference, terms, run.grid, run.dtype)[1]
    with torch.no_grad():
        v_base = ng.transition_velocities(base, terms, run.grid, run.dtype)[1]
        v_theta = ng.transition_velocities(run.model, terms, run.grid, run.dtype)[1]
    assert torch.allclose(v_ref, v_base, atol=1e-6) and (v_theta - v_base).abs().max() > 1e-3
    assert all(p.requires_grad == ("lora" in n) for n, p in run.model.named_parameters())  # adapters back on


def test_kl_coef_zero_is_the_papers_objective_exactly(tmp_path):
    assert_same_figures(fixed_tiny_run(tmp_path, ng.parse_config, ng.NEIGHBOR, "--kl_coef=0"),
                        RECORDED["train_solver"])


# ---------------------------------------------------------------------------- distributed, checkpoints, resume

DRIVER = """
import os, pathlib, sys, torch, torch.distributed as dist
import neighbor_grpo as ng
out = sys.argv[1]
pathlib.Path(f"{out}.pid{os.environ.get('RANK', 0)}").write_text(str(os.getpid()))  # for the signal tests
model = ng.train(ng.parse_config(sys.argv[2:] + ["--out_dir=" + out]))
rank = dist.get_rank() if dist.is_initialized() else 0
full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
torch.save({n.removeprefix("module."): full(p) for n, p in model.named_parameters()}, f"{out}/params_rank{rank}.pt")
if dist.is_initialized():
    dist.destroy_process_group()
"""


LORA = ["--lora_rank=4", "--lora_alpha=8", "--lr=1e-2"]


GRADIENT_DRIVER = """
import sys, torch, torch.distributed as dist
import neighbor_grpo as ng
out = sys.argv[1]
cfg = ng.parse_config(sys.argv[2:] + ["--out_dir=" + out])
run = ng.build(cfg)
groups = [ng.make_group(run, cfg, *ng.group_prompt(run.prompts, cfg, 0, g, run.world))
          for g in run.group_ids]
unsharded, real = [], ng.transitions_loss
def spy(*args):  # FSDP2 keeps a gradient accumulated unsharded on its parameters' unsharded side
    params = [p for m in run.model.modules() if hasattr(m, "_get_fsdp_state")
              for p in getattr(m._get_fsdp_state()._fsdp_param_group, "fsdp_params", [])]
    unsharded.append(sum(t.numel() for p in params for t in (getattr(p, "unsharded_accumulated_grad", None),
                         getattr(getattr(p, "_unsharded_param", None), "grad", None)) if t is not None))
    return real(*args)
ng.transitions_loss = spy
calls = ng.step_gradient(run.model, run.method, [(g, g.anchors[0], k) for g in groups for k in g.steps[0]], run.grid,
                         cfg, run.dtype, run.reference)
full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu()
loss = torch.cat([c[0] for c in calls]).sum()
dist.all_reduce(loss)
torch.save(dict(loss=loss, unsharded=unsharded, rewards=torch.cat([g.rewards for g in groups], 1),
                grads={n.removeprefix("module."): full(p.grad) for n, p in run.model.named_parameters()}),
           f"{out}.rank{dist.get_rank()}.pt")
dist.barrier()  # no rank tears the group down while another still talks to it
dist.destroy_process_group()
"""


def test_fsdp_equals_ddp_in_bf16_and_holds_no_unsharded_gradient_between_calls(tmp_path):
    """One optimizer step of four calls in bf16 on two ranks: FSDP2 gives DDP's rollout rewards, loss and gradient to
    bf16 round-off (FSDP's default input cast puts the timestep and RoPE in bf16: 0.4 % here, against 0.05 %), and
    between its calls no parameter holds an unsharded gradient (it reduce-scatters each)."""
    import subprocess

    (tmp_path / "driver.py").write_text(GRADIENT_DRIVER)
    for parallel in ("ddp", "fsdp"):
        command, env = launch(2, tmp_path / "driver.py", tmp_path / parallel, "--preset=tiny", "--rewards=brightness",
                              "--mixed_precision=bf16", "--update_batch_size=1", "--eval_every=0",
                              f"--parallel={parallel}")
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    ddp, fsdp = (torch.load(tmp_path / f"{p}.rank0.pt") for p in ("ddp", "fsdp"))
    assert len(fsdp["unsharded"]) == 4 and fsdp["unsharded"] == [0, 0, 0, 0]
    assert torch.allclose(ddp["rewards"], fsdp["rewards"], rtol=1e-2)
    assert abs(ddp["loss"] - fsdp["loss"]) < 1e-6  # rho = 1 at theta_old: the loss is round-off in both
    norm = lambda grads: sum(g.pow(2).sum() for g in grads.values()).sqrt()  # noqa: E731
    diff = norm({k: ddp["grads"][k] - fsdp["grads"][k] for k in ddp["grads"]})
    assert 0 < diff < 2e-3 * norm(ddp["grads"])


@pytest.mark.parametrize("lora", [[], LORA], ids=["full", "lora"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, lora):
    args = ["--iterations=4", "--sample_every=0", "--ckpt_every=2", *lora]
    ng.train(tiny_cfg(tmp_path / "straight", *args))
    ng.train(tiny_cfg(tmp_path / "resumed", "--iterations=2", "--sample_every=0", *lora))
    assert (tmp_path / "resumed/checkpoints/latest").read_text() == "step-000002"
    ng.train(tiny_cfg(tmp_path / "resumed", *args, "--resume"))
    assert max_abs_diff(exported(tmp_path / "straight"), exported(tmp_path / "resumed")) == 0
    assert read_log(tmp_path / "straight") == [
        {**r, **{k: v for k, v in s.items() if k.startswith("time/")}}
        for r, s in zip(read_log(tmp_path / "resumed"), read_log(tmp_path / "straight"))]
    assert [p.name for p in (tmp_path / "straight/checkpoints").iterdir()] == ["latest", "step-000004"]


def test_an_interrupted_save_leaves_the_last_checkpoint_loadable(tmp_path, monkeypatch):
    ng.train(tiny_cfg(tmp_path, "--iterations=1", "--sample_every=0", "--eval_every=0"))
    real_export = models.export_transformer

    def crash_after_partial_write(model, path, rank, dtype):
        real_export(model, path, rank, dtype)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(models, "export_transformer", crash_after_partial_write)
    with pytest.raises(KeyboardInterrupt):
        ng.train(tiny_cfg(tmp_path, "--iterations=2", "--sample_every=0", "--eval_every=0", "--resume"))
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-000001" and (root / "tmp-000002").exists()
    monkeypatch.undo()
    ng.train(tiny_cfg(tmp_path, "--iterations=2", "--sample_every=0", "--eval_every=0", "--resume"))  # from step 1
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]
    assert [r["iter"] for r in read_log(tmp_path) if "loss" in r] == [0, 1]  # one training record per iteration


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="resume"):
        ng.train(tiny_cfg(tmp_path, "--resume"))


def test_exported_transformer_loads_into_diffusers_and_matches_the_trained_model(tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    model = ng.train(tiny_cfg(tmp_path / "run", "--iterations=2", "--sample_every=0"))
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "run/transformer")
    pipe = flux.build_random_flux(0, **flux.TINY)
    pipe.save_pretrained(tmp_path / "pipe")  # a FLUX-layout pipeline directory, as FLUX.1-dev ships
    pipe = FluxPipeline.from_pretrained(tmp_path / "pipe", transformer=loaded)
    cfg = tiny_cfg()
    cond = flux.encode_prompt(pipe, "a cat", cfg, {})
    x = torch.randn(2, *flux.latent_shape(pipe, cfg.resolution), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        assert torch.allclose(flux.velocity(loaded, x, 0.7, cond), flux.velocity(model, x, 0.7, cond), atol=1e-6)
    images = pipe("a cat", height=64, width=64, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 64, 64)


def test_lora_starts_as_a_no_op_and_trains_only_the_adapter(tmp_path):
    cfg = tiny_cfg(tmp_path, *LORA, "--iterations=2", "--sample_every=0", "--eval_every=0")
    base = flux.build_random_flux(cfg.seed, **flux.TINY)
    pipe = models.load_pipeline(cfg, torch.device("cpu"), torch.float32)
    cond = flux.encode_prompt(pipe, "a cat", cfg, {})
    x = torch.randn(2, *flux.latent_shape(pipe, cfg.resolution), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        assert torch.equal(flux.velocity(pipe.transformer, x, 0.6, cond), flux.velocity(base.transformer, x, 0.6, cond))
    trainable = {n for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model = ng.train(cfg)
    initial = dict(base.transformer.named_parameters())
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.dtype == torch.float32
        else:  # the frozen base, under peft's names
            assert torch.equal(p, initial[name.replace(".base_layer", "")]), name
    assert all(dict(model.named_parameters())[n].abs().max() > 0 for n in trainable if "lora_B" in n)


def test_lora_adapter_loads_with_load_lora_weights_and_merges(tmp_path):
    """out_dir/lora into a fresh pipeline with FluxPipeline.load_lora_weights, the merged export, and evaluate.py
    with --lora_path: all the trained model."""
    out = tmp_path / "run"
    model = ng.train(tiny_cfg(out, *LORA, "--iterations=2", "--sample_every=0", "--eval_every=0"))
    cfg = tiny_cfg()
    pipe = flux.build_random_flux(0, **flux.TINY)
    pipe.load_lora_weights(out / "lora")
    cond = flux.encode_prompt(pipe, "a cat", cfg, {})
    x = torch.randn(2, *flux.latent_shape(pipe, cfg.resolution), generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        trained = flux.velocity(model, x, 0.7, cond)
        assert torch.allclose(flux.velocity(pipe.transformer, x, 0.7, cond), trained, atol=1e-6)
        base = flux.build_random_flux(0, **flux.TINY).transformer
        assert not torch.allclose(flux.velocity(base, x, 0.7, cond), trained, atol=1e-4)
    ng.train(tiny_cfg(tmp_path / "merged", *LORA, "--iterations=2", "--sample_every=0", "--eval_every=0",
                      "--export_merged"))
    assert max_abs_diff(exported(tmp_path / "merged"), exported(out)) == 0  # the same run: the same adapter
    from diffusers import FluxTransformer2DModel

    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "merged/transformer")
    with torch.no_grad():
        assert torch.allclose(flux.velocity(merged, x, 0.7, cond), trained, atol=1e-5)
    means = {}
    for name, args in (("adapter", [*LORA, f"--lora_path={out / 'lora'}"]),
                       ("merged", [f"--transformer_path={tmp_path / 'merged/transformer'}"])):
        summary = evaluate.evaluate_model(evaluate.parse_config(["--preset=tiny", f"--out_dir={tmp_path / name}", *args]))
        means[name] = {k: v["mean"] for k, v in summary.items()}
    assert means["adapter"] == pytest.approx(means["merged"], abs=1e-3)


def test_model_path_loads_a_pipeline_directory_with_from_pretrained(tmp_path):
    flux.build_random_flux(0, **flux.TINY).save_pretrained(tmp_path / "pipe")
    ng.train(tiny_cfg(tmp_path / "run", f"--model_path={tmp_path / 'pipe'}", "--iterations=1", "--sample_every=0"))
    assert read_log(tmp_path / "run")[0]["iter"] == 0
    with pytest.raises(models.ModelError, match="model_path"):
        ng.train(tiny_cfg(tmp_path / "bad", f"--model_path={tmp_path / 'missing'}"))


def test_model_path_with_missing_tokenizer_files_is_an_error(tmp_path):
    flux.build_random_flux(0, **flux.TINY).save_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe/tokenizer_2/tokenizer.json").unlink()
    with pytest.raises(models.ModelError, match="model_path=.*tokenizer_2 .T5Tokenizer. loaded with no vocabulary"):
        models.load_pipeline(tiny_cfg(None, f"--model_path={tmp_path / 'pipe'}"), torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------- prompts and evaluation


def test_the_papers_prompt_draw_uses_each_prompt_once_reproducibly_and_differs_per_seed():
    prompts = [f"prompt {i}" for i in range(100)]
    cfg, other = tiny_cfg(None, "--prompt_draw=subset"), tiny_cfg(None, "--prompt_draw=subset", "--seed=1")
    draw = lambda c, order=range(10): {(it, g): ng.group_prompt(prompts, c, it, g, 8)[0]  # noqa: E731
                                       for it in order for g in range(8)}
    first = draw(cfg)
    assert len(set(first.values())) == 80  # 10 iterations x 8 groups: 80 prompts, none twice
    assert draw(cfg, reversed(range(10))) == first  # a function of (seed, iteration, group): resume draws the same
    assert draw(other) != first and len(set(draw(other).values())) == 80
    short = [ng.group_prompt(prompts[:12], cfg, it, 0, 1)[0] for it in range(24)]  # a short file: one pass per epoch
    assert sorted(short[:12]) == sorted(short[12:]) == sorted(prompts[:12]) and short[:12] != short[12:]
    gen = ng.group_generator(0, 3, 2)  # "uniform": the draw before the paper's, from the group's own stream
    assert ng.group_prompt(prompts, tiny_cfg(), 3, 2, 8)[0] == prompts[torch.randint(100, (1,), generator=gen).item()]
    assert ng.Config().prompt_draw == "subset"


def test_an_even_subset_of_held_out_prompts_covers_every_style():
    styles = ("anime", "concept-art", "paintings", "photo")  # HPDv2's benchmark, in its order
    prompts = [f"{style} {i}" for style in styles for i in range(8)]
    assert ng.eval_subset(prompts, 8) == [f"{s} {i}" for s in styles for i in (0, 4)]
    assert ng.eval_subset(prompts, 0) == prompts


def test_reward_weights_are_normalised_to_sum_one(tmp_path):
    rewards = "--rewards=brightness,jpeg_compressibility,jpeg_incompressibility"
    args = [rewards, "--iterations=2", "--sample_every=0", "--eval_every=0"]
    ng.train(tiny_cfg(tmp_path / "equal", *args))
    ng.train(tiny_cfg(tmp_path / "twos", *args, "--reward_weights=2,2,2"))
    assert max_abs_diff(exported(tmp_path / "equal"), exported(tmp_path / "twos")) == 0
    assert ng.reward_mix(tiny_cfg(None, rewards, "--reward_weights=3,1,0")) == (0.75, 0.25, 0.0)


def test_resuming_a_finished_run_leaves_its_checkpoint_untouched(tmp_path, monkeypatch, capsys):
    """... also when it was saved with the field names of older versions (distance, no distance_metric): a changed
    value is reported under the field's name now."""
    ng.train(tiny_cfg(tmp_path, "--iterations=1", "--sample_every=0", "--eval_every=0"))
    meta = tmp_path / "checkpoints/step-000001/meta.json"
    saved = json.loads(meta.read_text())
    saved["config"]["distance"] = "sum" if saved["config"].pop("distance_reduction") == "mean" else "?"
    del saved["config"]["distance_metric"]
    meta.write_text(json.dumps(saved))
    capsys.readouterr()
    saves = []
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda *args: saves.append(args))
    ng.train(tiny_cfg(tmp_path, "--iterations=1", "--sample_every=0", "--eval_every=0", "--resume"))
    assert saves == []  # nothing new to save: the latest checkpoint is never rewritten in place
    assert (tmp_path / "checkpoints/latest").read_text() == "step-000001"
    assert "with changed fields: distance_reduction sum -> mean" in capsys.readouterr().out


def test_a_restarted_worker_continues_by_itself_in_one_line_and_a_plain_rerun_still_refuses(tmp_path, monkeypatch,
                                                                                           capsys):
    """Under torchrun's restarts (TORCHELASTIC_RESTART_COUNT > 0) the same command continues from the latest checkpoint,
    or starts over when none was written yet, saying so and the iterations lost in one line; outside them it refuses."""
    args = ["--iterations=4", "--sample_every=0", "--eval_every=0", "--ckpt_every=2", "--num_train_steps=2"]
    real = ng.train_iteration

    def dies_at(at):
        def iteration(run, cfg, it):
            if it == at:
                raise KeyboardInterrupt(f"killed in iteration {at}")
            return real(run, cfg, it)
        return iteration

    for name, at, said in [("early", 1, "no checkpoint yet: starting over in {} (iteration 0); 1 iteration(s) lost"),
                           ("late", 3, "continuing from {}/checkpoints/step-000002 (iteration 2); 1 iteration(s) lost")]:
        out = tmp_path / name
        monkeypatch.setattr(ng, "train_iteration", dies_at(at))
        with pytest.raises(KeyboardInterrupt):
            ng.train(tiny_cfg(out, *args))
        monkeypatch.setattr(ng, "train_iteration", real)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        capsys.readouterr()
        ng.train(tiny_cfg(out, *args))
        restarts = [line for line in capsys.readouterr().out.splitlines() if line.startswith("torchrun restart")]
        assert restarts == [f"torchrun restart 1: {said.format(out)} since"]
        assert [r["iter"] for r in read_log(out) if "loss" in r] == [0, 1, 2, 3]
        monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
        with pytest.raises(checkpoints.CheckpointError, match="already holds a run"):
            ng.train(tiny_cfg(out, *args))
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarts the refused round: refused again
        with pytest.raises(checkpoints.CheckpointError, match="already holds a run"):
            ng.train(tiny_cfg(out, *args))
        monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")


def test_ckpt_minutes_checkpoints_on_time_or_every_ckpt_every_whichever_comes_first(tmp_path, monkeypatch):
    """A clock that moves 40 s an iteration: ckpt_minutes=1 saves after 80 s (iterations 2 and 5), ckpt_every=3 in
    between (iteration 3, which restarts the minutes), and the end saves the last."""
    clock, saved, real, save = [0.0], [], ng.train_iteration, checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "monotonic", lambda: clock[0])
    monkeypatch.setattr(ng, "train_iteration", lambda *args: clock.__setitem__(0, clock[0] + 40) or real(*args))
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda *args: saved.append(args[3]) or save(*args))
    ng.train(tiny_cfg(tmp_path, "--iterations=6", "--sample_every=0", "--eval_every=0", "--ckpt_every=3",
                      "--ckpt_minutes=1", "--num_train_steps=2"))
    assert saved == [2, 3, 5, 6] and (tmp_path / "checkpoints/latest").read_text() == "step-000006"


def test_a_kill_during_a_background_write_leaves_the_last_checkpoint_loadable(tmp_path, monkeypatch):
    """The write of step 4 held in flight (as a slow disk would) when the run dies in iteration 4: `latest` still names
    step 2, whole, and a resumed run continues from it."""
    import concurrent.futures
    import threading

    gate, writes, real, iterate = threading.Event(), [], checkpoints.dcp.async_save, ng.train_iteration

    def held(*args, **kwargs):
        writes.append(real(*args, **kwargs))
        if len(writes) < 2:
            return writes[-1]
        future = concurrent.futures.Future()
        threading.Thread(target=lambda: gate.wait() or future.set_result(writes[-1].result()), daemon=True).start()
        return future

    def dies(run, cfg, iteration):
        if iteration == 4:
            raise KeyboardInterrupt("killed during the write of step 4")
        return iterate(run, cfg, iteration)

    monkeypatch.setattr(checkpoints.dcp, "async_save", held)
    monkeypatch.setattr(ng, "train_iteration", dies)
    args = ["--iterations=6", "--sample_every=0", "--eval_every=0", "--ckpt_every=2", "--num_train_steps=2"]
    with pytest.raises(KeyboardInterrupt):
        ng.train(tiny_cfg(tmp_path, *args))
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-000002" and (root / "tmp-000004").exists()
    assert preflight.damaged_files(root / "step-000002/state") == []
    gate.set()
    monkeypatch.undo()
    ng.train(tiny_cfg(tmp_path, *args, "--resume"))
    assert [r["iter"] for r in read_log(tmp_path) if "loss" in r] == list(range(6))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000006"]


# ---------------------------------------------------------------------------- preemption, bad steps, flaky rewards

SIGNAL_ARGS = ["--preset=tiny", "--iterations=8", "--sample_every=0", "--eval_every=0", "--ckpt_every=0",
               "--num_train_steps=2", "--rewards=brightness"]


def start_and_signal(tmp_path, name, nproc, signum, rank, *args):
    """Launch the driver, send signum to one rank's process once iteration 1 is logged, wait for it to end."""
    import signal
    import subprocess
    import time

    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / name
    command, env = launch(nproc, tmp_path / "driver.py", out, *SIGNAL_ARGS, *args)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter    1 |"):
            deadline = time.time() + 30
            while not (tmp_path / f"{name}.pid{rank}").exists() and time.time() < deadline:
                time.sleep(0.1)
            os.kill(int((tmp_path / f"{name}.pid{rank}").read_text()), signum)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    assert signal.Signals(signum).name in "".join(lines) or rank != 0
    return "".join(lines), out


def test_sigterm_finishes_the_iteration_checkpoints_and_resumes_exactly(tmp_path):
    import signal

    ng.train(ng.parse_config([*SIGNAL_ARGS, f"--out_dir={tmp_path / 'straight'}"]))
    output, out = start_and_signal(tmp_path, "stopped", 1, signal.SIGTERM, 0)
    stopped_at = len(read_log(out))
    assert "continue with the same command and --resume" in output and 2 <= stopped_at < 8
    assert (out / "checkpoints/latest").read_text() == f"step-{stopped_at:06d}"
    ng.train(ng.parse_config([*SIGNAL_ARGS, f"--out_dir={out}", "--resume"]))
    assert max_abs_diff(exported(tmp_path / "straight"), exported(out)) == 0


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    import signal

    output, out = start_and_signal(tmp_path, "ranks", 2, signal.SIGUSR1, 1, "--parallel=ddp")
    stopped_at = len(read_log(out))
    assert "stopped by a signal to another rank" in output and 2 <= stopped_at < 8
    ranks = [torch.load(out / f"params_rank{r}.pt") for r in range(2)]
    assert max_abs_diff(ranks[0], ranks[1]) == 0  # both returned after the same update
    ng.train(ng.parse_config([*SIGNAL_ARGS, f"--out_dir={out}", "--resume", "--groups_per_rank=2"]))
    assert len(read_log(out)) == 8


# ---------------------------------------------------------------------------- what clusters do: restarts, a dead or hung rank

FAULT_DRIVER = """
import os, pathlib, signal, sys, time
import neighbor_grpo as ng
restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
pathlib.Path(f"{sys.argv[1]}.round{restart}").write_text(str(time.time()))
faults = dict(enumerate(f.split("@") for f in os.environ["FAULTS"].split(",")))  # round -> (fault, iteration)
real = ng.train_iteration
def faulty(run, cfg, iteration):  # rank 1 dies or hangs at this round's iteration
    fault, at = faults.get(restart, ("", "-1"))
    if run.rank == 1 and iteration == int(at):
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        pathlib.Path(f"{sys.argv[1]}.hung").write_text(str(time.time()))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hung, yet ended by torchrun's SIGTERM, not its SIGKILL 30 s on
        time.sleep(3600)
    return real(run, cfg, iteration)
ng.train_iteration = faulty
""" + DRIVER
ELASTIC_ARGS = ["--preset=tiny", "--iterations=6", "--sample_every=0", "--eval_every=0", "--ckpt_every=2",
                "--num_train_steps=2", "--rewards=brightness", "--parallel=fsdp", "--steady_timeout=8"]


def launch_faulty(tmp_path, name, faults, restarts):
    """The FAULT_DRIVER over two gloo ranks, launched as train.sh does (c10d rendezvous, a new TCPStore each restart);
    returns (status, output)."""
    import subprocess

    (tmp_path / "driver.py").write_text(FAULT_DRIVER)
    command, env = launch(2, tmp_path / "driver.py", tmp_path / name, *ELASTIC_ARGS,
                          torchrun=("--standalone", f"--max_restarts={restarts}"))
    env = {**env, "FAULTS": faults, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def test_torchrun_restarts_a_killed_then_a_hung_rank_and_the_run_ends_like_an_uninterrupted_one(tmp_path):
    """Round 0: rank 1 SIGKILLed in iteration 3 (after the first checkpoint). Round 1: rank 1 hangs in iteration 4, and
    rank 0 stops within the steady-state timeout (8 s here; dist_timeout's hour without it), not start-up's. Each
    restart continues from the latest whole checkpoint in one line, and the run ends with an uninterrupted run's
    transformer, each iteration logged once."""
    status, output = launch_faulty(tmp_path, "straight", "none@-1", 0)
    assert status == 0, output[-3000:]
    status, output = launch_faulty(tmp_path, "faulty", "kill@3,hang@4", 2)
    assert status == 0, output[-3000:]
    restarts = [line for line in output.splitlines() if line.startswith("torchrun restart")]
    assert [line.split(":")[0] for line in restarts] == ["torchrun restart 1", "torchrun restart 2"], output[-3000:]
    assert "step-000002 (iteration 2); 1 iteration(s) lost" in restarts[0]  # iteration 2 was logged, not saved
    assert "step-000004 (iteration 4)" in restarts[1]
    noticed = float((tmp_path / "faulty.round2").read_text()) - float((tmp_path / "faulty.hung").read_text())
    assert noticed < 60  # the timeout, torchrun's restart and the next round's imports: sanity, not a timing
    assert [r["iter"] for r in read_log(tmp_path / "faulty") if "loss" in r] == list(range(6))
    straight, faulty = (torch.load(tmp_path / f"{name}/params_rank0.pt") for name in ("straight", "faulty"))
    assert max_abs_diff(straight, faulty) == 0


def nan_on_calls(monkeypatch, calls):
    """grpo_objective returning NaN on the given call numbers (B = 4 anchors x K = 4 steps = 16 calls an iteration)."""
    real, count = ng.grpo_objective, [0]

    def objective(*args):
        J, clip_frac = real(*args)
        count[0] += 1
        return (J * float("nan") if count[0] - 1 in calls else J), clip_frac

    monkeypatch.setattr(ng, "grpo_objective", objective)


def test_a_non_finite_gradient_skips_the_step_on_every_rank_and_training_goes_on(tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, range(16, 32))  # iteration 1
    model = ng.train(tiny_cfg(tmp_path, "--iterations=3", "--sample_every=0", "--eval_every=0"))
    assert [r["skipped_steps"] for r in read_log(tmp_path)] == [0, 4, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    nan_on_calls(monkeypatch, range(16, 10_000))  # from iteration 1 on
    with pytest.raises(SystemExit) as exit_info:
        ng.main(["--preset=tiny", f"--out_dir={tmp_path}", "--iterations=6", "--sample_every=0", "--eval_every=0",
                 "--ckpt_every=1", "--max_skipped_steps=6"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "8 optimizer steps in a row" in err and "--resume" in err
    assert (tmp_path / "checkpoints/latest").read_text() == "step-000002"  # after iteration 1, unharmed by it
    assert all(torch.isfinite(v).all() for v in exported(tmp_path / "checkpoints/step-000002").values())




@pytest.mark.parametrize("module,allowed", [("rewards", set()), ("report", {"models"}), ("preflight", set()), ("guard", set()),
                                            ("configurator", set()),
                                            ("models", {"rewards", "preflight"}), ("flux", {"models"}),
                                            ("sd3", {"models"}), ("qwen_image", {"models"}),
                                            ("checkpoints", {"models", "preflight"}), ("fetch", {"models", "rewards"}),
                                            ("neighbor_grpo", {"models", "rewards", "report", "checkpoints", "guard",
                                                               "configurator", "fetch"})])
def test_each_file_imports_only_the_files_below_it(module, allowed):
    import ast

    ours = {p.stem for p in ng.ROOT.glob("*.py")} - {"conftest"}
    tree = ast.parse((ng.ROOT / f"{module}.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported & ours == allowed


def test_a_truncated_checkpoint_shard_is_one_line_naming_the_file_and_what_is_left(tmp_path, capsys):
    args = ["--preset=tiny", f"--out_dir={tmp_path}", "--sample_every=0", "--eval_every=0"]
    ng.train(ng.parse_config([*args, "--iterations=1"]))
    shard = next((tmp_path / "checkpoints/step-000001/state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(SystemExit) as exit_info:
        ng.main([*args, "--iterations=2", "--resume"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert str(shard) in err and "--transformer_path=" in err and "step-000001/transformer" in err


def test_too_little_disk_for_a_checkpoint_is_one_line_and_the_last_checkpoint_survives(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    args = ["--preset=tiny", f"--out_dir={tmp_path}", "--sample_every=0", "--eval_every=0"]
    ng.train(ng.parse_config([*args, "--iterations=1"]))
    before = exported(tmp_path / "checkpoints/step-000001")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10**9, 10**9, 10**5))
    with pytest.raises(SystemExit) as exit_info:
        ng.main([*args, "--iterations=3", "--ckpt_every=1", "--resume"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "checkpoint at iteration 2: needs 0.0" in err and "0.0 GB free" in err and "--resume" in err
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]
    assert max_abs_diff(before, exported(root / "step-000001")) == 0
    monkeypatch.undo()
    ng.train(ng.parse_config([*args, "--iterations=2", "--resume"]))  # and it resumes from there
    assert (root / "latest").read_text() == "step-000002"


def test_a_transformer_path_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(models.ModelError, match="transformer_path=.*: no such directory; pass a trained transformer"):
        models.load_pipeline(tiny_cfg(None, f"--transformer_path={tmp_path}/nowhere/transformer"), torch.device("cpu"),
                           torch.float32)


def test_a_recipe_that_cannot_fit_the_gpu_stops_in_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "device_memory", lambda device, world=1: 80 * 10**9)  # one 80 GB GPU
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(ng, "load_pipeline", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        ng.main(["--preset=flux-dev", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "this GPU's 74.5 GiB usable cannot hold full fine-tuning over 1 rank(s)" in err
    assert "--preset=flux-dev-lora" in err and "--memory_check=false" in err
    monkeypatch.setattr(models, "device_memory", lambda device, world=1: 24 * 10**9)  # 24 GB: only the 4-bit recipe
    with pytest.raises(SystemExit):
        ng.main(["--preset=flux-dev-lora", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert "LoRA r=64 over 1 rank(s)" in err and "use --preset=flux-dev-24gb," in err  # the one that fits 24 GB


# ---------------------------------------------------------------------------- kernels: attention and compilation


@pytest.mark.parametrize("backend,measured,cudnn_anywhere,cudnn_without_grad", [
    ("sdpa", True, False, False), ("cudnn_forward", True, False, True), ("cudnn_forward", False, False, False),
    ("cudnn", False, True, True)])
def test_the_attention_kernels_are_set_before_any_model_loads_and_cudnn_forward_only_runs_without_grad(
        backend, measured, cudnn_anywhere, cudnn_without_grad, tmp_path, monkeypatch):
    """PyTorch's own SDPA flags (the setting itself): cuDNN's backend is off, or on, by the time the pipeline loads,
    and inside the transformer's calls it is on exactly where the backend allows it: no gradient for cudnn_forward,
    on a GPU it was measured on (measured: as on an H200); the compile cache's key carries the choice."""
    monkeypatch.setattr(models, "cudnn_forward_measured", lambda: measured)
    torch.backends.cuda.enable_cudnn_sdp(not cudnn_anywhere)  # the opposite of what the run must set
    loaded, calls = [], []
    real_load, real_velocity = ng.load_pipeline, flux.velocity
    monkeypatch.setattr(ng, "load_pipeline", lambda *a, **k: loaded.append(torch.backends.cuda.cudnn_sdp_enabled())
                        or real_load(*a, **k))
    monkeypatch.setattr(flux, "velocity", lambda *a, **k: calls.append((torch.is_grad_enabled(),
                        torch.backends.cuda.cudnn_sdp_enabled())) or real_velocity(*a, **k))
    cfg = tiny_cfg(tmp_path, f"--attention_backend={backend}", "--group_size=4", "--num_steps=2",
                   "--num_train_steps=1", "--num_anchors=1", "--eval_every=0", "--sample_every=0")
    try:
        ng.train_iteration(ng.build(cfg), cfg, 0)
        assert loaded == [cudnn_anywhere]
        assert {cudnn for grad, cudnn in calls if not grad} == {cudnn_without_grad}  # the rollout
        assert {cudnn for grad, cudnn in calls if grad} == {cudnn_anywhere}  # the update
        assert torch.compiler.config.cache_key_tag == f"attention={backend}:{cudnn_without_grad and not cudnn_anywhere}"
    finally:
        monkeypatch.undo()
        models.set_attention("cudnn_forward")  # the default, for the tests after this one


def lever_iteration(*args):
    """One tiny iteration: the rollout's states, each optimizer step's gradient (SGD, so that anchors after the first
    see rho != 1) and the first anchor's |log rho| at theta = theta_old."""
    cfg = tiny_cfg(None, "--rewards=brightness", "--eval_every=0", "--sample_every=0", "--group_size=4",
                   "--num_steps=3", "--num_train_steps=2", "--num_anchors=2", "--update_batch_size=2", *args)
    run = ng.build(cfg)
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.SGD(params, lr=1e-2)
    steps = []
    run.optimizer.register_step_pre_hook(lambda *_: steps.append([p.grad.clone() for p in params]))
    groups, stats, _ = ng.train_iteration(run, cfg, 0)
    variants = models.compiled_variants(run.model) if cfg.compile else None
    return groups[0].states, steps, stats["first_anchor_abs_log_ratio"], variants


def test_the_speed_levers_give_the_eager_rollout_and_gradients_within_round_off(monkeypatch):
    """compile (the transformer's blocks through inductor on this CPU) and the attention backends change kernels, not
    the algorithm: the same rollout states and update gradients, and rho = 1 at theta_old to round-off."""
    monkeypatch.setattr(models, "cudnn_forward_measured", lambda: True)  # cuDNN first without grad, as on Hopper
    states, steps, log_ratio, _ = lever_iteration("--compile=false", "--attention_backend=sdpa")
    assert log_ratio < 1e-6
    for lever in (["--attention_backend=cudnn_forward"], ["--compile=true", "--grad_checkpointing=true"]):
        lever_states, lever_steps, lever_log_ratio, variants = lever_iteration(*lever)
        torch.testing.assert_close(lever_states, states, rtol=1e-4, atol=1e-5)
        for grads, lever_grads in zip(steps, lever_steps, strict=True):  # each step's gradient, as one vector
            g, h = torch.cat([g.flatten() for g in grads]), torch.cat([h.flatten() for h in lever_grads])
            assert (h - g).norm() <= 1e-4 * g.norm()
        assert lever_log_ratio < 1e-6
    # static shapes: the rollout's batch of 4 without gradient, the update's 2 with it; a single block twice each, as
    # the first one's input is laid out apart from the others' (a stride)
    assert variants == {"FluxTransformerBlock": 2, "FluxSingleTransformerBlock": 4}
    monkeypatch.undo()
    models.set_attention("cudnn_forward")  # the default on this CPU, for the tests after this one
