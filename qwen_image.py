"""
Qwen-Image through diffusers (the family models.py describes): the QwenImagePipeline (a 20 B MMDiT, the Qwen2.5-VL
text encoder, a 3-D causal VAE). Latents packed in 2x2 patches [N, L, 64] with their img_shapes; the text encoder's
last hidden states of the prompt in the pipeline's template, its system part dropped, with their mask; the VAE's
per-channel latents mean and std; the scheduler's own dynamic shift stretched to shift_terminal; and true
classifier-free guidance with the pipeline's norm rescale.
"""

from dataclasses import dataclass

import torch

from models import local_configs, random_model

NAME, REPO = "Qwen-Image", "Qwen/Qwen-Image"
PIPELINE, TRANSFORMER = "QwenImagePipeline", "QwenImageTransformer2DModel"
GATED = set()  # Apache 2.0, no license to accept

TRANSFORMER_CONFIG = dict(  # transformer/config.json of Qwen/Qwen-Image
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],  # vae/config.json
           temperal_downsample=[False, True, True])
TEXT = dict(  # text_encoder/config.json: Qwen2.5-VL-7B-Instruct
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rope_scaling=dict(type="mrope",
                                                                                     mrope_section=[16, 24, 24])),
    vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16))
SCHEDULER = dict(  # scheduler/scheduler_config.json of Qwen/Qwen-Image
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
    time_shift_type="exponential", use_dynamic_shifting=True)
# recipes: LoRA as verl's Flow-GRPO Qwen-Image example (r = 64, alpha = 128, lr 3e-4), true CFG at the pipeline's
# default 4.0, 512² and 10 steps as Flow-GRPO's SD3.5 setting, the paper's G, B, K, sigma and p
QWEN = dict(model_path=REPO, resolution=512, num_steps=10, eval_steps=40, guidance_scale=4.0)
LORA = dict(lora_rank=64, lora_alpha=128.0, lr=3e-4, parallel="ddp")
PRESETS = {
    "qwen-image": dict(QWEN, out_dir="runs/qwen_image"),  # full fine-tuning, torchrun over 8 or more GPUs
    "qwen-image-lora": dict(QWEN, **LORA, out_dir="runs/qwen_image_lora"),  # one 80 GB GPU
    "qwen-image-32gb": dict(QWEN, **LORA, base_quantization="nf4", reward_offload=True,  # one 32 GB GPU, 4-bit base
                            out_dir="runs/qwen_image_32gb"),  # (24 GB: Qwen2.5-VL alone is 15.5 GiB at start-up)
    "tiny-qwen-image": dict(base="tiny", model_path="tiny-qwen-image", guidance_scale=4.0, max_sequence_length=512,
                            out_dir="runs/tiny_qwen_image"),  # CPU (its byte-level template takes ~200 tokens)
}
TINY = dict(
    transformer=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)),
    vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False],
             latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0]),
    text=dict(text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1,
                               rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3]), bos_token_id=None,
                               eos_token_id=None),
              vision_config=dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2)))


def random_sizes(model_path):
    """"tiny-qwen-image" (TINY) or "random-qwen-image:N" (Qwen-Image's width with N blocks); None for a model to
    load."""
    if model_path == "tiny-qwen-image":
        return TINY
    if model_path.startswith("random-qwen-image:"):
        n = int(model_path.removeprefix("random-qwen-image:"))
        return dict(transformer={**TRANSFORMER_CONFIG, "num_layers": n}, vae=VAE, text=TEXT)
    return None


def is_family_path(model_path):
    return random_sizes(model_path) is not None or model_path == REPO


def model_sizes(model_path):
    """The transformer's, VAE's and text encoder's configs: a local pipeline's, else Qwen-Image's."""
    local = local_configs(model_path, "transformer", "vae") or dict(transformer=TRANSFORMER_CONFIG, vae=VAE)
    return random_sizes(model_path) or {**local, "text": TEXT}


def byte_tokenizer(vocab_size):
    """A byte-level Qwen2 tokenizer of Qwen's special tokens, built in memory (random models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    fast = Qwen2TokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], special_tokens=True)
    assert len(fast) <= vocab_size
    return fast


def random_pipeline(model_path, seed, device, dtype, master):
    """A random QwenImagePipeline for a random name, else None."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sizes = random_sizes(model_path)
    if sizes is None:
        return None
    torch.manual_seed(seed)
    text = sizes["text"] if sizes is TINY else dict(  # the stand-in: Qwen2.5-VL's widths, one layer each
        text_config={**TEXT["text_config"], "num_hidden_layers": 1}, vision_config={**TEXT["vision_config"], "depth": 1})
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**text))
    transformer = random_model(lambda: QwenImageTransformer2DModel(**sizes["transformer"]), seed,
                               None if sizes is TINY else device, master)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), transformer=transformer,
                             vae=AutoencoderKLQwenImage(**sizes["vae"]), text_encoder=encoder,
                             tokenizer=byte_tokenizer(text["text_config"]["vocab_size"]))
    for module in (pipe.vae, encoder) if sizes is not TINY else ():
        module.to(dtype)
    return pipe


def blocks(transformer):
    return list(transformer.transformer_blocks)


def constants(transformer, device):
    """The RoPE tables (pos_embed.pos_freqs, neg_freqs), computed on device: plain complex attributes (a buffer's
    dtype cast would drop their imaginary part), so neither to_empty nor rank 0's state dict reaches them."""
    rope = transformer.pos_embed  # no parameters, no buffers: a new one changes no state dict
    with torch.device(device):
        transformer.pos_embed = type(rope)(theta=rope.theta, axes_dim=rope.axes_dim, scale_rope=rope.scale_rope)


def unreachable(transformer):
    """The last block's text stream where it no longer reaches the image: the transformer discards the block's text
    output, so its text queries (projection and norm; its keys and values reach the image), the attention's text
    output projection and the text MLP."""
    last = transformer.transformer_blocks[-1]
    return [last.attn.add_q_proj, last.attn.norm_added_q, last.attn.to_add_out, last.txt_mlp]


@dataclass
class Condition:
    """What QwenImagePipeline passes to the transformer besides (x, t): the prompt's text states and their mask (None:
    every token real), the negative prompt's, the guidance scale and the packed latents' img_shapes."""

    prompt_embeds: torch.Tensor  # [1 or N, S, 3584]
    mask: torch.Tensor | None  # [1 or N, S]: 0 = padding, where prompts of different lengths are stacked
    negative_embeds: torch.Tensor  # [1, S', 3584]
    scale: float  # true_cfg_scale (guidance_scale); 1 = no guidance
    img_shape: tuple  # (1, h / 2, w / 2)


@torch.no_grad()
def encode(pipe, prompt, cfg, cache):
    """The pipeline's text states of one prompt (its template's system part dropped), cached on the CPU."""
    if prompt not in cache:
        embeds, _ = pipe.encode_prompt(prompt, device=pipe.text_encoder.device,
                                       max_sequence_length=cfg.max_sequence_length)
        cache[prompt] = embeds.cpu()
    return cache[prompt].to(pipe.vae.device)


def encode_prompt(pipe, prompt, cfg, cache):
    side = packed_side(pipe, cfg.resolution)
    return Condition(encode(pipe, prompt, cfg, cache), None, encode(pipe, cfg.negative_prompt, cfg, cache),
                     cfg.guidance_scale, (1, side, side))


def padded(embeds, masks):
    """Text states of different lengths [n_i, S_i, D] padded with zeros to the longest, stacked, with their mask
    (masks: each one's, None = every token real); the mask is None where no token is padding (read from the shapes)."""
    S = max(e.shape[1] for e in embeds)
    if all(m is None and e.shape[1] == S for e, m in zip(embeds, masks)):
        return torch.cat(embeds), None
    pad = lambda t: torch.nn.functional.pad(t, (0, S - t.shape[-1]) if t.dim() == 2 else (0, 0, 0, S - t.shape[1]))  # noqa
    masks = [pad(torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if m is None else m)
             for e, m in zip(embeds, masks)]
    return torch.cat([pad(e) for e in embeds]), torch.cat(masks)


def stack_conditions(conds):
    """Prompts of different lengths padded to the longest, with their mask, as the pipeline batches them."""
    if all(c is conds[0] for c in conds):
        return conds[0]
    c = conds[0]
    return Condition(*padded([c.prompt_embeds for c in conds], [c.mask for c in conds]), c.negative_embeds, c.scale,
                     c.img_shape)


def packed_side(pipe, resolution):
    return resolution // pipe.vae_scale_factor // 2


def draw_noise(pipe, n, resolution, gen):
    """n standard normal latents drawn in the pipeline's shape [n, 1, C, h, w], then packed to [n, L, 4C]."""
    channels, side = pipe.transformer.config.in_channels // 4, 2 * packed_side(pipe, resolution)
    noise = torch.randn(n, 1, channels, side, side, generator=gen)
    return pipe._pack_latents(noise, n, channels, side, side)


def schedule(pipe, resolution, num_steps):
    """(image tokens, the grid's last nonzero time before the shift): the pipeline passes linspace(1, 1 / T, T)."""
    return packed_side(pipe, resolution) ** 2, 0.0


def velocity(transformer, x, t, cond, dtype=torch.float32):
    """v_theta(x, t, c) for packed latents x [N, L, C] at time t (one, or one per sample), as QwenImagePipeline
    computes it: the timestep is sigma; with guidance v = v_neg + scale (v - v_neg) rescaled per token to v's norm (in
    fp32). The pipeline makes two calls; here one on [prompt; negative] (text padded and masked: the same values), the
    gradient flowing through both halves, so that FSDP2 reduce-scatters each block's gradient as its backward ends
    (after two calls --meta finds every gradient held unsharded until the whole backward ends: 38 GiB a rank)."""
    n = x.shape[0]
    embeds, mask = cond.prompt_embeds.expand(n, -1, -1), None if cond.mask is None else cond.mask.expand(n, -1)
    guided = cond.scale > 1
    if guided:
        embeds, mask = padded([embeds, cond.negative_embeds.expand(n, -1, -1)], [mask, None])
        x = torch.cat([x, x])
    timestep = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(n).repeat(2 if guided else 1)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        v = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                        encoder_hidden_states_mask=mask, img_shapes=[[cond.img_shape]] * x.shape[0],
                        return_dict=False)[0].float()
    if not guided:
        return v
    v, v_neg = v.chunk(2)
    combined = v_neg + cond.scale * (v - v_neg)
    return combined * (v.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


@torch.no_grad()
def decode_images(pipe, x, resolution):
    """Packed latents [N, L, C] -> images [N, 3, H, W] in [0, 1], as QwenImagePipeline decodes them."""
    vae = pipe.vae
    latents = pipe._unpack_latents(x, resolution, resolution, pipe.vae_scale_factor).to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    images = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


# bench.py --meta's pieces at the true size (fake tensors: shapes, no memory)


def meta_transformer(sizes):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(**sizes["transformer"])


def meta_vae(sizes):
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(**sizes["vae"])


def meta_shapes(cfg, sizes):
    """(a sample's packed latents [L, 4C], the VAE's input for one image [C, 1, h, w], image tokens)."""
    side, C = cfg.resolution // 2 ** len(sizes["vae"]["temperal_downsample"]), sizes["vae"]["z_dim"]
    return ((side // 2) ** 2, 4 * C), (C, 1, side, side), (side // 2) ** 2


def meta_condition(cfg, sizes):
    """One prompt's text states and the negative prompt's, max_sequence_length tokens each, random."""
    S, D, side = cfg.max_sequence_length, sizes["transformer"]["joint_attention_dim"], meta_shapes(cfg, sizes)[2]
    return Condition(torch.randn(1, S, D), None, torch.randn(1, S, D), cfg.guidance_scale,
                     (1, int(side ** 0.5), int(side ** 0.5)))


def meta_text_encoders(sizes):
    """(label, builder) of Qwen2.5-VL-7B, Qwen-Image's text encoder; none for random sizes."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if sizes["text"] is not TEXT or sizes["transformer"]["num_layers"] != TRANSFORMER_CONFIG["num_layers"]:
        return []
    return [("Qwen2.5-VL-7B text encoder", lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TEXT)))]
