"""
FLUX.1 through diffusers, as neighbor_grpo.py uses it (the family models.py describes): the FluxPipeline's sizes
(FLUX.1-dev's, or random ones for CPU presets and benchmarks), the conditioning FluxPipeline passes (T5 embeddings,
pooled CLIP, embedded guidance, RoPE ids), the noise it draws and packs, its time grid's inputs, the velocity call,
decoding. Loading, LoRA, NF4 and export are models.py's. FLUX.1-schnell and FLUX.1-Krea-dev load by model_path.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from models import clip_tokenizer, random_model, t5_tokenizer, t5_xxl

NAME, REPO = "FLUX", "black-forest-labs/FLUX.1-dev"
GATED = {REPO}  # its license is accepted on the hub page before a token may download it
PIPELINE, TRANSFORMER = "FluxPipeline", "FluxTransformer2DModel"


TINY = dict(  # a FLUX-architecture model small enough for a CPU
    layers=1, single_layers=2, heads=2, head_dim=16, rope=(4, 6, 6), text_dim=32, pooled_dim=32, text_layers=2,
    latent_channels=4, vae_channels=(16, 32), vae_layers=1, vae_groups=8)
FLUX_DEV = dict(  # FLUX.1-dev's sizes (its text encoders are CLIP-L and T5-XXL; random stand-ins keep their widths)
    layers=19, single_layers=38, heads=24, head_dim=128, rope=(16, 56, 56), text_dim=4096, pooled_dim=768,
    text_layers=1, latent_channels=16, vae_channels=(128, 256, 512, 512), vae_layers=2, vae_groups=32)
FLUX_SCHEDULER = dict(  # FLUX.1-dev's scheduler config (of the scheduler, the project uses only the time grid)
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
    max_image_seq_len=4096)


def random_sizes(model_path):
    """The sizes of a random model_path: "tiny" (TINY) or "random:D,S" (FLUX.1-dev's width with D double and S single
    blocks); None for a model to load."""
    if model_path == "tiny":
        return TINY
    if model_path.startswith("random:"):
        double, single = (int(n) for n in model_path.removeprefix("random:").split(","))
        return {**FLUX_DEV, "layers": double, "single_layers": single}
    return None


def model_sizes(model_path):
    """The sizes of model_path's transformer and VAE: random_sizes', a local pipeline's config.json, or FLUX.1-dev's
    (any other path: the hub model, not downloaded)."""
    sizes = random_sizes(model_path)
    config = Path(model_path) / "transformer" / "config.json"
    if sizes is not None or not config.is_file():
        return sizes or FLUX_DEV
    c, vae = json.loads(config.read_text()), json.loads((Path(model_path) / "vae" / "config.json").read_text())
    return dict(layers=c["num_layers"], single_layers=c["num_single_layers"], heads=c["num_attention_heads"],
                head_dim=c["attention_head_dim"], rope=tuple(c["axes_dims_rope"]), text_dim=c["joint_attention_dim"],
                pooled_dim=c["pooled_projection_dim"], latent_channels=c["in_channels"] // 4,
                vae_channels=tuple(vae["block_out_channels"]), vae_layers=vae["layers_per_block"],
                vae_groups=vae["norm_num_groups"])


def transformer_config(layers, single_layers, heads, head_dim, rope, text_dim, pooled_dim, latent_channels, **_):
    """FluxTransformer2DModel's arguments for these sizes (FLUX_DEV: black-forest-labs/FLUX.1-dev's config.json)."""
    return dict(patch_size=1, in_channels=4 * latent_channels, num_layers=layers, num_single_layers=single_layers,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
                pooled_projection_dim=pooled_dim, guidance_embeds=True, axes_dims_rope=rope)


def vae_config(latent_channels, vae_channels, vae_layers, vae_groups, **_):
    """AutoencoderKL's arguments for these sizes (FLUX_DEV: FLUX.1-dev's VAE)."""
    n = len(vae_channels)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=vae_channels, layers_per_block=vae_layers,
                latent_channels=latent_channels, norm_num_groups=vae_groups, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)


def build_random_flux(seed, *, layers, single_layers, heads, head_dim, rope, text_dim, pooled_dim, text_layers,
                      latent_channels, vae_channels, vae_layers, vae_groups, init_device=None,
                      init_dtype=torch.float32):
    """A randomly initialised FluxPipeline of the given sizes: the classes of FLUX.1-dev, tokenizers built in memory.
    init_device: the transformer is built there, its weights N(0, 0.02), in init_dtype (models.random_model)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    logging.getLogger("diffusers.pipelines.flux.pipeline_flux").setLevel(logging.ERROR)  # CLIP truncates at 77
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=pooled_dim, intermediate_size=64, num_hidden_layers=text_layers,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=text_dim, d_ff=64, d_kv=16, num_layers=text_layers, num_heads=2,
        relative_attention_num_buckets=8))
    config = transformer_config(layers, single_layers, heads, head_dim, rope, text_dim, pooled_dim, latent_channels)
    transformer = random_model(lambda: FluxTransformer2DModel(**config), seed, init_device, init_dtype)
    vae = AutoencoderKL(**vae_config(latent_channels, vae_channels, vae_layers, vae_groups))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def random_pipeline(model_path, seed, device, dtype, master):
    """A random FluxPipeline for "tiny" or "random:D,S" (bench.py's FLUX.1-dev-width stand-in, its text encoders and
    VAE in dtype as from_pretrained(dtype=dtype) loads them), the transformer in master; None for a model to load."""
    sizes = random_sizes(model_path)
    if sizes is None:
        return None
    pipe = build_random_flux(seed, **sizes, init_device=None if sizes is TINY else device, init_dtype=master)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2) if sizes is not TINY else ():
        module.to(dtype)
    return pipe


def is_family_path(model_path):
    return random_sizes(model_path) is not None or model_path == REPO


def blocks(transformer):
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def constants(transformer, device):
    """Nothing outside the state dict: FluxPosEmbed computes RoPE from the ids in every call."""


def unreachable(transformer):
    """None: the text stream's last use is the single-stream blocks, whose output is the image's."""
    return []


@dataclass
class Condition:
    """Everything besides (x, t) that FluxPipeline passes to the transformer, for one prompt."""

    prompt_embeds: torch.Tensor  # [1, S, D_t5]
    pooled: torch.Tensor  # [1, D_clip]
    txt_ids: torch.Tensor  # [S, 3]
    img_ids: torch.Tensor  # [L, 3]
    guidance: torch.Tensor | None  # [1] or None for models without guidance embedding


def packed_side(pipe, resolution):
    """Tokens per side of the packed latents: FLUX packs each 2x2 patch of the VAE's latents into one token."""
    return resolution // pipe.vae_scale_factor // 2


def latent_shape(pipe, resolution):
    """(L, C) of the packed latents: 2x2 latent patches become tokens of 4 * latent_channels."""
    return packed_side(pipe, resolution) ** 2, pipe.transformer.config.in_channels


@torch.no_grad()
def encode_prompt(pipe, prompt, cfg, cache):
    """CLIP pooled + T5 embeddings of one prompt, computed once and cached on the CPU."""
    device = pipe.vae.device
    if prompt not in cache:  # on the text encoders' device: the CPU once offloaded, for a prompt met late
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=prompt, device=pipe.text_encoder_2.device,
                                               max_sequence_length=cfg.max_sequence_length)
        cache[prompt] = (embeds.cpu(), pooled.cpu())
    embeds, pooled = cache[prompt]
    side = packed_side(pipe, cfg.resolution)
    img_ids = pipe._prepare_latent_image_ids(1, side, side, device, torch.float32)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=device)
    guidance = torch.full([1], cfg.guidance_scale, device=device) if pipe.transformer.config.guidance_embeds else None
    return Condition(embeds.to(device), pooled.to(device), txt_ids, img_ids, guidance)


def stack_conditions(conds):
    """One Condition for a batch whose samples have these conditions (one prompt's is kept as it is, batch 1)."""
    if all(c is conds[0] for c in conds):
        return conds[0]
    guidance = None if conds[0].guidance is None else torch.cat([c.guidance for c in conds])
    return Condition(torch.cat([c.prompt_embeds for c in conds]), torch.cat([c.pooled for c in conds]),
                     conds[0].txt_ids, conds[0].img_ids, guidance)


def velocity(transformer, x, t, cond, dtype=torch.float32):
    """v_theta(x, t, c) for a batch x [N, L, C] at time t (one for all, or one per sample: FLUX embeds a timestep per
    batch element), called exactly as FluxPipeline calls it; cond of batch 1 (one prompt) or N."""
    n = x.shape[0]
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        v = transformer(
            hidden_states=x,
            timestep=torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(n),  # FluxPipeline: sigma
            guidance=None if cond.guidance is None else cond.guidance.expand(n),
            pooled_projections=cond.pooled.expand(n, -1),
            encoder_hidden_states=cond.prompt_embeds.expand(n, -1, -1),
            txt_ids=cond.txt_ids,
            img_ids=cond.img_ids,
            return_dict=False,
        )[0]
    return v.float()


@torch.no_grad()
def decode_images(pipe, x, resolution):
    """Packed latents [N, L, C] -> images [N, 3, H, W] in [0, 1], as FluxPipeline decodes them."""
    vae = pipe.vae
    latents = pipe._unpack_latents(x, resolution, resolution, pipe.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def draw_noise(pipe, n, resolution, gen):
    """n standard normal latents drawn in FluxPipeline's unpacked shape, then packed to [n, L, C]."""
    channels = pipe.transformer.config.in_channels // 4
    side = 2 * packed_side(pipe, resolution)
    noise = torch.randn(n, channels, side, side, generator=gen)
    return pipe._pack_latents(noise, n, channels, side, side)


def schedule(pipe, resolution, num_steps):
    """(image tokens, the grid's last nonzero time): FluxPipeline passes sigmas = linspace(1, 1 / T, T) (0: that)."""
    return latent_shape(pipe, resolution)[0], 0.0


# bench.py --meta's pieces at the true size (fake tensors: shapes, no memory)
SCHEDULER = FLUX_SCHEDULER


def meta_transformer(sizes):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**transformer_config(**sizes))


def meta_vae(sizes):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(**sizes))


def meta_shapes(cfg, sizes):
    """(a sample's latents [L, C], the VAE's input for one image, image tokens)."""
    side = cfg.resolution // 2 ** (len(sizes["vae_channels"]) - 1)
    return ((side // 2) ** 2, 4 * sizes["latent_channels"]), (sizes["latent_channels"], side, side), (side // 2) ** 2


def meta_condition(cfg, sizes):
    """One prompt's conditioning as FluxPipeline passes it (max_sequence_length T5 tokens), random values."""
    from diffusers import FluxPipeline

    S, side = cfg.max_sequence_length, cfg.resolution // 2 ** len(sizes["vae_channels"])
    return Condition(torch.randn(1, S, sizes["text_dim"]), torch.randn(1, sizes["pooled_dim"]), torch.zeros(S, 3),
                     FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32),
                     torch.full([1], cfg.guidance_scale))


def meta_text_encoders(sizes):
    """(label, builder) of FLUX.1-dev's text encoders (CLIP-L, T5-XXL); none for random sizes."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    if sizes is not FLUX_DEV:
        return []
    return [("CLIP-L text encoder", lambda: CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))),
            ("T5-XXL encoder", lambda: T5EncoderModel(t5_xxl()))]
