"""fp8: torchao's rowwise float8 matmuls in the transformer's blocks (models.convert_fp8), on this CPU (emulated, so
only the numerics are under test: docs/fp8.md). The ratio at theta_old stays at round-off in every mode."""

import pytest
import torch

import models
import neighbor_grpo as ng
import preflight
import sde_grpo
from configurator import ConfigError
from conftest import tiny_cfg

SMALL = ["--rewards=brightness", "--eval_every=0", "--sample_every=0", "--group_size=4", "--num_steps=3",
         "--num_train_steps=2", "--num_anchors=2", "--update_batch_size=2"]
CPU_FP8 = pytest.mark.skipif(not models.cpu_rowwise_fp8(), reason="this torch's CPU _scaled_mm has no rowwise scales")


def fp8_iteration(*args):
    """One tiny iteration: the rollout's states, the update's statistics, and each optimizer step's gradient (SGD)."""
    cfg = tiny_cfg(None, *SMALL, *args)
    run = ng.build(cfg)
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.SGD(params, lr=cfg.lr)
    steps = []
    run.optimizer.register_step_pre_hook(lambda *_: steps.append(torch.cat([p.grad.flatten() for p in params])))
    groups, stats, _ = ng.train_iteration(run, cfg, 0)
    return run, groups[0].states, stats, steps


def float8_layers(model):
    return {name for name, m in model.named_modules() if type(m).__name__ == "SwitchableFloat8Linear"}


@CPU_FP8
def test_fp8_converts_the_blocks_linears_and_leaves_modulation_embedders_and_adapters_alone():
    run = ng.build(tiny_cfg(None, *SMALL, "--fp8=all", "--lora_rank=4", "--lora_alpha=8"))
    converted = float8_layers(run.model)
    assert "transformer_blocks.0.attn.to_q.base_layer" in converted  # LoRA's frozen base: FP8
    assert "single_transformer_blocks.0.proj_out" in converted and "transformer_blocks.0.ff.net.2" in converted
    assert not any("lora_" in n or ".norm" in n or not n.startswith(("transformer_blocks", "single_transformer_blocks"))
                   for n in converted)  # adapters, modulation, embedders, proj_out and norm_out stay as they were
    assert all(p.dtype == torch.float32 for n, p in run.model.named_parameters() if "lora_" in n)
    # on a GPU, torchao's size rule for rowwise scales: FLUX.1-dev's 3072-wide layers convert, small ones do not
    linear = lambda k, n: torch.nn.Linear(k, n, device="meta")  # noqa: E731
    cuda = torch.device("cuda")
    assert models.fp8_layer(linear(3072, 3072), "transformer_blocks.0.attn.to_q", cuda)
    assert models.fp8_layer(linear(15360, 3072), "single_transformer_blocks.0.proj_out", cuda)
    assert not models.fp8_layer(linear(3072, 18432), "transformer_blocks.0.norm1.linear", cuda)
    assert not models.fp8_layer(linear(3072, 64), "proj_out", cuda)
    assert not models.fp8_layer(linear(32, 32), "transformer_blocks.0.attn.to_q", cuda)  # N <= 2048: slower in FP8


@CPU_FP8
def test_a_frozen_fp8_layer_gives_torchaos_output_and_input_gradient_without_the_weights():
    """LoRA's base: only the input's gradient is computed (and only the weight kept), bit for bit torchao's."""
    x, out = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(0)), []
    for frozen in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(64, 128)])
        layer = models.convert_fp8(model, torch.device("cpu")).requires_grad_(not frozen).transformer_blocks[0]
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.sin().sum().backward()
        out.append((y.detach(), xx.grad, layer.weight.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert out[0][2] is not None and out[1][2] is None


@pytest.mark.parametrize("mode", ["", *(pytest.param(m, marks=CPU_FP8) for m in ("rollout", "all", "rollout+lora",
                                                                                  "all+lora"))])
def test_rho_is_one_at_theta_old_to_round_off_in_every_fp8_mode(mode):
    """lr = 0: every anchor is at theta_old, so every ratio is 1 to round-off and none is clipped; "rollout"'s FP8
    rollout is scored against pi_old's anchors recomputed in the update's precision (old_anchors)."""
    fp8, _, lora = mode.partition("+")
    _, _, stats, steps = fp8_iteration(f"--fp8={fp8}", "--lr=0", *(["--lora_rank=4", "--lora_alpha=8"] if lora else []))
    assert stats["first_anchor_abs_log_ratio"] <= 1e-6 and stats["clip_frac"] == 0
    assert all(torch.isfinite(g).all() and g.norm() > 0 for g in steps)  # a gradient through the FP8 layers


@CPU_FP8
def test_fp8_changes_the_rollout_and_a_gradient_step_trains():
    _, states, _, _ = fp8_iteration("--fp8=", "--lr=0")
    run, fp8_states, stats, steps = fp8_iteration("--fp8=all", "--lr=1e-2")
    _, rollout_states, _, _ = fp8_iteration("--fp8=rollout", "--lr=0")
    change = (fp8_states - states).norm() / states.norm()
    assert 1e-4 < change < 0.05  # FP8 computed the rollout (not vacuous), within a few percent of fp32
    assert torch.equal(rollout_states, fp8_states)  # "rollout" and "all" sample alike
    assert stats["skipped_steps"] == 0 and len(steps) == 2 and stats["first_anchor_abs_log_ratio"] <= 1e-6


@CPU_FP8
def test_an_fp8_anchor_against_a_full_precision_update_clips_most_ratios(monkeypatch):
    """What old_anchors prevents: pi_old's anchor from the FP8 rollout, the update in fp32. At theta_old (lr = 0) the
    ratios move by the FP8 error; with the literal eq. 8 (summed distances) that is far beyond the 1e-4 clip."""
    monkeypatch.setattr(ng, "old_anchors", lambda *args: None)
    _, _, stats, _ = fp8_iteration("--fp8=rollout", "--lr=0", "--distance_reduction=sum")
    assert stats["first_anchor_abs_log_ratio"] > 100 * 1e-4 and stats["clip_frac"] >= 0.5


def test_fp8_on_a_cpu_whose_torch_lacks_rowwise_scales_is_refused_in_one_line(monkeypatch):
    """torch 2.11 (the GPUs' image) scales FP8 per tensor only on a CPU: a ModelError before any FP8 call, not an
    internal assert mid-rollout."""
    monkeypatch.setattr(models, "cpu_rowwise_fp8", lambda: False)
    with pytest.raises(models.ModelError, match="per-tensor FP8 scales only"):
        ng.build(tiny_cfg(None, *SMALL, "--fp8=all"))


def test_fp8_with_an_nf4_base_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="fp8=all and base_quantization=nf4"):
        tiny_cfg(None, "--fp8=all", "--base_quantization=nf4", "--lora_rank=4")
    with pytest.raises(ConfigError, match="fp8=half"):
        tiny_cfg(None, "--fp8=half")
    with pytest.raises(ConfigError, match="fp8=rollout: the SDE baseline"):
        sde_grpo.parse_config(["--preset=tiny", "--fp8=rollout"])


def test_update_batch_size_auto_picks_the_largest_batch_preflight_fits(monkeypatch):
    cfg = ng.parse_config(["--preset=flux-dev-lora", "--update_batch_size=auto", "--groups_per_rank=2"])
    assert cfg.update_batch_size == 0
    fam = models.family(cfg.model_path)
    sizes = fam.model_sizes(cfg.model_path)
    config = fam.transformer_config(**sizes)
    peak = {b: max(preflight.gpu_phases(ng.dataclasses.replace(cfg, update_batch_size=b), sizes, config, 1,
                                        True).values()) for b in (1, 2, 4, 8)}  # the divisors of 2 groups x K = 4
    assert peak[1] < peak[2] < peak[4] < peak[8]
    for capacity, expected in [(peak[8], 8), (peak[8] - 1, 4), (peak[2] + 1, 2), (peak[1], 1), (peak[1] / 2, 1)]:
        monkeypatch.setattr(models, "device_memory", lambda device, world: capacity)
        assert models.auto_update_batch(cfg, torch.device("cuda"), 1) == expected
    monkeypatch.undo()
    # on a CPU nothing is checked: an optimizer step's transitions in one call; build() decides before anything loads
    assert models.auto_update_batch(cfg, torch.device("cpu"), 1) == 8
    tiny = tiny_cfg(None, *SMALL, "--update_batch_size=auto", "--groups_per_rank=2")
    ng.build(tiny)
    assert tiny.update_batch_size == 4


def test_preflight_prices_fp8s_casts_where_they_run():
    cfg = ng.parse_config(["--preset=flux-dev-lora"])
    fam = models.family(cfg.model_path)
    sizes = fam.model_sizes(cfg.model_path)
    config = fam.transformer_config(**sizes)
    phases = {mode: preflight.gpu_phases(ng.dataclasses.replace(cfg, fp8=mode), sizes, config, 1, True)
              for mode in ("", "rollout", "all")}
    assert phases[""]["rollout"] < phases["rollout"]["rollout"] == phases["all"]["rollout"]
    assert phases[""]["update"] == phases["rollout"]["update"] < phases["all"]["update"]
    assert phases["all"]["update"] - phases[""]["update"] < 2**30  # transient: a layer's casts, not the activations
