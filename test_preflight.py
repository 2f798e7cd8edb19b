"""preflight.py against what a GPU measured: the peaks one H200 recorded (torch 2.11, random weights at FLUX.1-dev's
width, 720², G=12 T=8 B=4 K=4; docs/cost.md), DDP's replica, AdamW's step, the memory a process can use."""

import pytest

import flux
import neighbor_grpo as ng
import preflight

GIB = 2**30
COMMON = ["--prompt_file=", "--rewards=jpeg_compressibility", "--guard_rewards=", "--eval_every=0"]
LORA = ["--preset=flux-dev-lora", "--model_path=random:19,38"]
FULL = ["--preset=flux-dev", "--model_path=random:4,8", "--parallel=ddp"]
# (recipe, AdamW's implementation, the peak max_memory_allocated measured in GiB)
MEASURED = [
    (LORA + ["--compile=false", "--grad_checkpointing=true", "--update_batch_size=4"], "foreach", 28.7),
    (LORA + ["--compile=true", "--grad_checkpointing=true", "--update_batch_size=4"], "foreach", 28.3),
    (LORA + ["--compile=false", "--grad_checkpointing=false", "--update_batch_size=1"], "foreach", 37.8),
    (LORA + ["--compile=false", "--grad_checkpointing=false", "--update_batch_size=2"], "foreach", 51.3),
    (LORA + ["--compile=true", "--grad_checkpointing=false", "--update_batch_size=2"], "foreach", 45.7),
    (LORA + ["--compile=true", "--grad_checkpointing=false", "--update_batch_size=4"], "foreach", 67.0),
    (FULL, "foreach", 47.9),  # AdamW's foreach step: an fp32 temporary of every parameter on top
]


def predicted(args, world=1, adamw="fused"):
    cfg = ng.parse_config(args + COMMON)
    sizes = flux.model_sizes(cfg.model_path)
    return preflight.gpu_phases(cfg, sizes, flux.transformer_config(**sizes), world, False, adamw)


@pytest.mark.parametrize("args,adamw,peak", MEASURED)
def test_the_prediction_is_never_below_a_peak_a_gpu_measured_and_within_10_percent(args, adamw, peak):
    top = max(predicted(args, adamw=adamw).values()) / GIB
    assert peak - 0.05 <= top <= 1.10 * peak  # the measurement is rounded to 0.1 GiB


def test_ddp_full_fine_tuning_prices_a_replica_and_fsdp_a_shard():
    n = preflight.transformer_sizes(flux.transformer_config(**flux.model_sizes("random:4,8")))["n"]
    one, ddp = predicted(FULL), predicted(FULL, world=8)
    fsdp = predicted(["--preset=flux-dev", "--model_path=random:4,8"], world=8)
    assert ddp["start-up"] == one["start-up"] >= 12 * n  # fp32 weights and AdamW's moments on every rank
    assert ddp["update"] >= 16 * n and fsdp["update"] < ddp["update"] / 3  # 8 shards, and each its activations


def test_adamw_foreach_step_is_priced_as_the_fp32_temporary_it_allocates_and_fused_as_none():
    n = preflight.transformer_sizes(flux.transformer_config(**flux.model_sizes("random:4,8")))["n"]
    fused, foreach = predicted(FULL, adamw="fused"), predicted(FULL, adamw="foreach")
    assert foreach["update"] == pytest.approx(fused["start-up"] + 4 * n + 4 * n, rel=1e-6)  # state, grads, temporary
    assert fused["update"] < foreach["update"] and fused["rollout"] == foreach["rollout"]


def test_the_usable_memory_is_the_free_memory_less_the_stated_margin():
    assert preflight.usable_memory(80 * GIB, 80 * GIB) == pytest.approx(80 * GIB - 1.5 * GIB - 1.6 * GIB)
    assert preflight.usable_memory(10 * GIB, 80 * GIB) < 10 * GIB - 1.5 * GIB  # another process's memory is not ours


def test_a_reward_preflight_cannot_price_is_named_in_one_line(capsys):
    """A reward neither counted nor known to hold no weights (a module:function) is priced at 0 bytes: said so."""
    cfg = ng.parse_config(LORA + COMMON + ["--rewards=jpeg_compressibility,mymodule:score", "--guard_rewards=aesthetic",
                                            "--eval_every=50"])
    assert preflight.unpriced([*cfg.rewards, *cfg.guard_rewards]) == ["mymodule:score"]
    sizes = flux.model_sizes(cfg.model_path)
    assert preflight.fits(cfg, sizes, flux.transformer_config(**sizes), 1, 1000 * GIB, False, {})[0]
    warned = [line for line in capsys.readouterr().out.splitlines() if "not priced" in line]
    assert warned == ["memory: reward mymodule:score is not priced (0 bytes assumed); add its parameter count to "
                      "preflight.REWARD_PARAMETERS"]


def test_kl_coef_reference_is_priced_as_a_frozen_copy_under_full_fine_tuning_and_nothing_under_lora():
    sizes = flux.FLUX_DEV
    config = flux.transformer_config(**sizes)
    n = preflight.transformer_sizes(config)["n"]
    peak = lambda args, world: max(preflight.gpu_phases(ng.parse_config(args), sizes, config, world, True).values())  # noqa: E731
    for world in (1, 8):  # one rank holds the whole bf16 copy (22 GiB), each of 8 FSDP ranks its shard
        extra = peak(["--preset=flux-dev", "--kl_coef=0.1"], world) - peak(["--preset=flux-dev"], world)
        assert extra == pytest.approx(2 * n / world, rel=1e-6) and 2 * n / GIB == pytest.approx(22.2, abs=0.1)
    lora = ["--preset=flux-dev-lora"]
    assert peak([*lora, "--kl_coef=0.1"], 1) == peak(lora, 1)


def test_kl_coef_reference_is_copied_from_the_master_weights_in_host_ram_under_full_fine_tuning():
    n = preflight.transformer_sizes(flux.transformer_config(**flux.FLUX_DEV))["n"]
    host = lambda *args: preflight.host_bytes(ng.parse_config(list(args)), n, 8, 8)  # noqa: E731
    assert host("--preset=flux-dev", "--kl_coef=0.1") - host("--preset=flux-dev") == 4 * n  # rank 0's fp32 copy
    lora = ["--preset=flux-dev-lora"]
    assert host(*lora, "--kl_coef=0.1") == host(*lora)  # LoRA's reference: its adapters off
