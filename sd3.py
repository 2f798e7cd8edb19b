"""
Stable Diffusion 3.5 through diffusers (the family models.py describes): the StableDiffusion3Pipeline of Medium
(2.5 B, MMDiT-X) or Large (8.1 B); unpacked latents [N, 16, H/8, W/8], two CLIP text encoders and T5, no guidance
embedding, the timestep on the 0-1000 scale, the VAE's scaling and shift, and true classifier-free guidance: one
transformer call on [unconditional; conditional], combined as the pipeline combines them.
"""

import logging
from dataclasses import dataclass

import torch

from models import clip_tokenizer, local_configs, random_model, t5_tokenizer, t5_xxl

NAME, REPO = "SD3.5", "stabilityai/stable-diffusion-3.5-medium"
PIPELINE, TRANSFORMER = "StableDiffusion3Pipeline", "SD3Transformer2DModel"

VAE = dict(  # SD3's AutoencoderKL (vae/config.json of stabilityai/stable-diffusion-3.5-medium and -large)
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
MEDIUM = dict(  # transformer/config.json of stabilityai/stable-diffusion-3.5-medium (MMDiT-X: dual attention)
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
LARGE = {**MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,  # ...-3.5-large
         "pos_embed_max_size": 192, "dual_attention_layers": ()}
TEXT = dict(clip=(768, 1280), text_dim=4096)  # CLIP-L, OpenCLIP bigG (projections of the same widths), T5-XXL
HUB = {REPO: MEDIUM, "stabilityai/stable-diffusion-3.5-large": LARGE}
GATED = set(HUB)  # their license is accepted on the hub page before a token may download them
TINY = dict(transformer=dict(
    sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
    pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm"),
    vae={**VAE, "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
         "block_out_channels": (16, 32), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8},
    clip=(16, 16), text_dim=32)
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=False)  # scheduler_config.json of both: a static shift
# recipes at Flow-GRPO's SD3.5-Medium setting (config/grpo.py pickscore_sd3: 512², 10 steps, evaluated at 40, CFG 4.5,
# LoRA r = 32, alpha = 64, lr 3e-4) with the paper's G, B, K, sigma and p; "base": the preset they start from
SD35 = dict(model_path=REPO, resolution=512, num_steps=10, eval_steps=40, guidance_scale=4.5, max_sequence_length=256)
PRESETS = {
    "sd3.5-medium": dict(SD35, out_dir="runs/sd35_medium"),  # full fine-tuning, torchrun over 8 GPUs
    "sd3.5-medium-lora": dict(SD35, lora_rank=32, lora_alpha=64.0, lr=3e-4, parallel="ddp",  # one GPU
                              out_dir="runs/sd35_medium_lora"),
    "sd3.5-medium-24gb": dict(SD35, lora_rank=32, lora_alpha=64.0, lr=3e-4, parallel="ddp", reward_offload=True,
                              out_dir="runs/sd35_medium_24gb"),  # one 24 GB GPU
    "sd3.5-large-lora": dict(SD35, model_path="stabilityai/stable-diffusion-3.5-large", lora_rank=32,
                             lora_alpha=64.0, lr=3e-4, parallel="ddp", out_dir="runs/sd35_large_lora"),
    "tiny-sd3": dict(base="tiny", model_path="tiny-sd3", guidance_scale=4.5, out_dir="runs/tiny_sd3"),  # CPU
}


def random_sizes(model_path):
    """"tiny-sd3" (TINY) or "random-sd3:N" (SD3.5 Medium's width with N blocks); None for a model to load."""
    if model_path == "tiny-sd3":
        return TINY
    if model_path.startswith("random-sd3:"):
        n = int(model_path.removeprefix("random-sd3:"))
        dual = tuple(i for i in MEDIUM["dual_attention_layers"] if i < n)
        return dict(transformer={**MEDIUM, "num_layers": n, "dual_attention_layers": dual}, vae=VAE, **TEXT)
    return None


def is_family_path(model_path):
    return random_sizes(model_path) is not None or model_path in HUB


def model_sizes(model_path):
    """The transformer's and VAE's configs (a local pipeline's, a known hub id's, else Medium's) and the text widths."""
    local = local_configs(model_path, "transformer", "vae") or dict(transformer=HUB.get(model_path, MEDIUM), vae=VAE)
    return random_sizes(model_path) or {**local, **TEXT}


def random_pipeline(model_path, seed, device, dtype, master):
    """A random StableDiffusion3Pipeline for a random name (its tokenizers built in memory), else None."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    sizes = random_sizes(model_path)
    if sizes is None:
        return None
    torch.manual_seed(seed)
    logging.getLogger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3").setLevel(logging.ERROR)
    clip = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(clip_tokenizer()), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=width, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)) for width in sizes["clip"]]
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), d_model=sizes["text_dim"], d_ff=64, d_kv=16,
                                 num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    transformer = random_model(lambda: SD3Transformer2DModel(**sizes["transformer"]), seed,
                               None if sizes is TINY else device, master)  # the full-width stand-in on device
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=AutoencoderKL(**sizes["vae"]), transformer=transformer,
        text_encoder=clip[0], tokenizer=clip_tokenizer(), text_encoder_2=clip[1], tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer())
    for module in (pipe.vae, *clip, t5) if sizes is not TINY else ():
        module.to(dtype)
    return pipe


def blocks(transformer):
    return list(transformer.transformer_blocks)


def constants(transformer, device):
    """Nothing outside the state dict: the sin-cos positions are a persistent buffer, which rank 0 sends."""


def unreachable(transformer):
    """The last block's text queries (their projection and norm): the block is context_pre_only, so the attention's
    text rows, the only ones they reach, are dropped; its text keys and values reach the image."""
    attn = transformer.transformer_blocks[-1].attn
    return [attn.add_q_proj, attn.norm_added_q]


@dataclass
class Condition:
    """What StableDiffusion3Pipeline passes to the transformer besides (x, t): the prompt's embeddings (77 CLIP tokens,
    then T5's) and pooled CLIP, and with guidance (scale > 1) the negative prompt's."""

    prompt_embeds: torch.Tensor  # [1 or N, 77 + S, D_t5]
    pooled: torch.Tensor  # [1 or N, D_clip_l + D_clip_g]
    negative_embeds: torch.Tensor  # [1, 77 + S, D_t5]
    negative_pooled: torch.Tensor  # [1, D_clip_l + D_clip_g]
    scale: float  # guidance_scale; 1 = no guidance


@torch.no_grad()
def encode(pipe, prompt, cfg, cache):
    """The pipeline's encoding of one prompt (CLIP-L, CLIP-G, T5), computed once and cached on the CPU."""
    if prompt not in cache:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=pipe.text_encoder_3.device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=cfg.max_sequence_length)
        cache[prompt] = (embeds.cpu(), pooled.cpu())
    return [t.to(pipe.vae.device) for t in cache[prompt]]


def encode_prompt(pipe, prompt, cfg, cache):
    negative = encode(pipe, cfg.negative_prompt, cfg, cache)  # the pipeline's negative prompt, encoded the same way
    return Condition(*encode(pipe, prompt, cfg, cache), *negative, cfg.guidance_scale)


def stack_conditions(conds):
    if all(c is conds[0] for c in conds):
        return conds[0]
    c = conds[0]
    return Condition(torch.cat([c.prompt_embeds for c in conds]), torch.cat([c.pooled for c in conds]),
                     c.negative_embeds, c.negative_pooled, c.scale)


def latent_side(pipe, resolution):
    return resolution // pipe.vae_scale_factor


def draw_noise(pipe, n, resolution, gen):
    """n standard normal latents in the pipeline's shape [n, C, H / 8, W / 8] (prepare_latents)."""
    side = latent_side(pipe, resolution)
    return torch.randn(n, pipe.transformer.config.in_channels, side, side, generator=gen)


def schedule(pipe, resolution, num_steps):
    """(image tokens, the grid's last nonzero time before the shift): the pipeline lets its scheduler space
    num_steps timesteps from sigma_max = 1 to sigma_min (already shifted once: 0.003 at shift 3)."""
    return (latent_side(pipe, resolution) // pipe.transformer.config.patch_size) ** 2, pipe.scheduler.sigma_min


def velocity(transformer, x, t, cond, dtype=torch.float32):
    """v_theta(x, t, c) for a batch x [N, C, h, w] at time t (one, or one per sample), called as
    StableDiffusion3Pipeline calls it: the timestep on 0-1000, with guidance one call on [negative; prompt] and
    v = v_neg + scale (v_prompt - v_neg) (in fp32), the gradient flowing through both halves."""
    n = x.shape[0]
    timestep = 1000 * torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(n)
    embeds, pooled = cond.prompt_embeds.expand(n, -1, -1), cond.pooled.expand(n, -1)
    guided = cond.scale > 1
    if guided:
        x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
        embeds = torch.cat([cond.negative_embeds.expand(n, -1, -1), embeds])
        pooled = torch.cat([cond.negative_pooled.expand(n, -1), pooled])
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        v = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled,
                        return_dict=False)[0].float()
    if guided:
        v_neg, v_prompt = v.chunk(2)
        v = v_neg + cond.scale * (v_prompt - v_neg)
    return v


@torch.no_grad()
def decode_images(pipe, x, resolution):
    """Latents [N, C, h, w] -> images [N, 3, H, W] in [0, 1], as StableDiffusion3Pipeline decodes them."""
    vae = pipe.vae
    latents = x / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


# bench.py --meta's pieces at the true size (fake tensors: shapes, no memory)


def meta_transformer(sizes):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**sizes["transformer"])


def meta_vae(sizes):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**sizes["vae"])


def meta_shapes(cfg, sizes):
    """(a sample's latents [C, h, w], the VAE's input for one image, image tokens)."""
    side = cfg.resolution // 2 ** (len(sizes["vae"]["block_out_channels"]) - 1)
    shape = (sizes["transformer"]["in_channels"], side, side)
    return shape, shape, (side // sizes["transformer"]["patch_size"]) ** 2


def meta_condition(cfg, sizes):
    """One prompt's conditioning and the negative prompt's (77 CLIP + max_sequence_length T5 tokens), random."""
    S, D, P = 77 + cfg.max_sequence_length, sizes["transformer"]["joint_attention_dim"], sum(sizes["clip"])
    return Condition(torch.randn(1, S, D), torch.randn(1, P), torch.randn(1, S, D), torch.randn(1, P),
                     cfg.guidance_scale)


def meta_text_encoders(sizes):
    """(label, builder) of SD3.5's text encoders (CLIP-L, OpenCLIP bigG, T5-XXL); none for random sizes."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel

    if sizes["transformer"] not in HUB.values():
        return []
    clip = lambda width, layers, heads: lambda: CLIPTextModelWithProjection(CLIPTextConfig(  # noqa: E731
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, projection_dim=width))
    return [("CLIP-L text encoder", clip(768, 12, 12)), ("OpenCLIP bigG text encoder", clip(1280, 32, 20)),
            ("T5-XXL encoder", lambda: T5EncoderModel(t5_xxl()))]
