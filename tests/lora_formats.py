"""One LoRA written in the key forms people pass as `extra_lora` (test side only).

The product never converts keys by hand: diffusers' FLUX loader detects and converts each form.
These writers let tests check that every form reaches the transformer as the *same* LoRA. A form
cannot hold every LoRA (kohya fuses q/k/v into one block-diagonal pair, XLabs shares one down
matrix across q/k/v), so each test builds a canonical diffusers/PEFT LoRA the form represents
exactly; loading that canonical LoRA as it is gives the expected result.

Every writer is exact in float arithmetic: it only renames, concatenates, places blocks and
scales by powers of two.
"""

from __future__ import annotations

import torch

import make_tiny_weights

RANK = 4
PEFT_PREFIX = "transformer."
FAL_PREFIX = "base_model.model."

# BFL module (as kohya and ComfyUI name it, dotted) -> the diffusers linears it holds, in fused order.
# `single_blocks.N.linear1` (fused q/k/v/mlp) is absent: diffusers splits it at FLUX.1's fixed sizes
# (3072, 3072, 3072, 12288), which a tiny transformer does not have.
KOHYA_MODULES = {
    "double_blocks.0.img_attn.qkv": ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"),
    "double_blocks.0.img_attn.proj": ("transformer_blocks.0.attn.to_out.0",),
    "double_blocks.0.txt_attn.qkv": ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"),
    "double_blocks.0.txt_attn.proj": ("transformer_blocks.0.attn.to_add_out",),
    "double_blocks.0.img_mlp.0": ("transformer_blocks.0.ff.net.0.proj",),
    "double_blocks.0.img_mlp.2": ("transformer_blocks.0.ff.net.2",),
    "double_blocks.0.txt_mlp.0": ("transformer_blocks.0.ff_context.net.0.proj",),
    "double_blocks.0.txt_mlp.2": ("transformer_blocks.0.ff_context.net.2",),
    "double_blocks.0.img_mod.lin": ("transformer_blocks.0.norm1.linear",),
    "single_blocks.0.linear2": ("single_transformer_blocks.0.proj_out",),
    "single_blocks.0.modulation.lin": ("single_transformer_blocks.0.norm.linear",),
}

# XLabs processor LoRA -> the diffusers linears it holds; a qkv LoRA has one down matrix for all three.
XLABS_MODULES = {
    "double_blocks.0.processor.qkv_lora1": ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                            "transformer_blocks.0.attn.to_v"),
    "double_blocks.0.processor.proj_lora1": ("transformer_blocks.0.attn.to_out.0",),
    "double_blocks.0.processor.qkv_lora2": ("transformer_blocks.0.attn.add_q_proj",
                                            "transformer_blocks.0.attn.add_k_proj",
                                            "transformer_blocks.0.attn.add_v_proj"),
    "double_blocks.0.processor.proj_lora2": ("transformer_blocks.0.attn.to_add_out",),
    "single_blocks.0.processor.qkv_lora": ("single_transformer_blocks.0.attn.to_q",
                                           "single_transformer_blocks.0.attn.to_k",
                                           "single_transformer_blocks.0.attn.to_v"),
    "single_blocks.0.processor.proj_lora": ("single_transformer_blocks.0.proj_out",),
}

# The modules the Lassie trainer targets (scripts/make_tiny_weights.py), for PEFT-keyed LoRAs.
PEFT_MODULES = (
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v",
    "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
)


def down_key(module: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_A.weight"


def up_key(module: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_B.weight"


def modules_of(table: dict[str, tuple[str, ...]]) -> list[str]:
    return [module for modules in table.values() for module in modules]


def random_lora(transformer: torch.nn.Module, modules: list[str], seed: int, *, rank: int = RANK,
                shared_down: list[tuple[str, ...]] = ()) -> dict[str, torch.Tensor]:
    """A canonical diffusers/PEFT LoRA on `modules`; the modules of each `shared_down` group share one A.

    B is non-zero (unlike a fresh LoRA) and small enough that images change visibly but stay images.
    """
    lora = make_tiny_weights.random_lora(make_tiny_weights.linear_sizes(transformer, modules), seed, rank=rank,
                                         scale=0.25, prefix=PEFT_PREFIX.removesuffix("."))
    for first, *others in shared_down:
        for module in others:
            lora[down_key(module)] = lora[down_key(first)].clone()
    return lora


def _fused(lora: dict[str, torch.Tensor], modules: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked downs and block-diagonal ups: the sparse fused pair diffusers splits back exactly."""
    down = torch.cat([lora[down_key(module)] for module in modules])
    up = torch.block_diag(*[lora[up_key(module)] for module in modules])
    return down, up


def _sd_scripts(lora: dict[str, torch.Tensor], name_of, alpha_ratio: float | None) -> dict[str, torch.Tensor]:
    """sd-scripts keys `<name>.lora_down.weight` / `.lora_up.weight` (/ `.alpha`) for each BFL module.

    With an alpha the loader scales down by alpha / rank, so down is written divided by that ratio
    (a power of two, so the round trip is exact) and the alpha must really be applied to match.
    """
    written = {}
    for bfl_module, modules in KOHYA_MODULES.items():
        down, up = _fused(lora, modules)
        name = name_of(bfl_module)
        if alpha_ratio is not None:
            down = down / alpha_ratio
            written[f"{name}.alpha"] = torch.tensor(down.shape[0] * alpha_ratio)
        written[f"{name}.lora_down.weight"] = down
        written[f"{name}.lora_up.weight"] = up
    return written


def to_kohya(lora: dict[str, torch.Tensor], alpha_ratio: float | None = None) -> dict[str, torch.Tensor]:
    """kohya/sd-scripts form: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, ..."""
    return _sd_scripts(lora, lambda bfl_module: "lora_unet_" + bfl_module.replace(".", "_"), alpha_ratio)


def to_comfyui(lora: dict[str, torch.Tensor], alpha_ratio: float | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI form: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`, ..."""
    return _sd_scripts(lora, lambda bfl_module: "diffusion_model." + bfl_module, alpha_ratio)


def to_xlabs(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs form: `double_blocks.0.processor.qkv_lora1.down.weight` (one down for q/k/v) / `.up.weight`."""
    written = {}
    for processor, modules in XLABS_MODULES.items():
        downs = [lora[down_key(module)] for module in modules]
        if not all(torch.equal(down, downs[0]) for down in downs):
            raise ValueError(f"XLabs cannot hold different down matrices for {modules}")
        written[f"{processor}.down.weight"] = downs[0].clone()
        written[f"{processor}.up.weight"] = torch.cat([lora[up_key(module)] for module in modules])
    return written


def to_peft_with_prefix(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys as a bare `PeftModel` saves them (fal): `base_model.model.transformer_blocks.0...`."""
    return {FAL_PREFIX + key.removeprefix(PEFT_PREFIX): tensor.clone() for key, tensor in lora.items()}


def without_modules(lora: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """A partial LoRA: `modules` not trained at all."""
    dropped = {down_key(module) for module in modules} | {up_key(module) for module in modules}
    return {key: tensor for key, tensor in lora.items() if key not in dropped}


def with_zero_up(lora: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """The same LoRA with `modules`' B zeroed: what a partial LoRA lacking `modules` must act like."""
    return {key: torch.zeros_like(tensor) if key in {up_key(m) for m in modules} else tensor
            for key, tensor in lora.items()}


def with_input_size(lora: dict[str, torch.Tensor], module: str, in_features: int) -> dict[str, torch.Tensor]:
    """`module`'s A reshaped to another input size: a LoRA trained for another model's layer."""
    down = torch.randn(RANK, in_features, generator=torch.Generator().manual_seed(0))
    return {**lora, down_key(module): down}


def with_rank(lora: dict[str, torch.Tensor], module: str, rank: int) -> dict[str, torch.Tensor]:
    """`module`'s B of another rank than its A: every size fits the layer, but A and B do not chain."""
    up = lora[up_key(module)]
    return {**lora, up_key(module): torch.randn(up.shape[0], rank, generator=torch.Generator().manual_seed(0))}


def sd15_kohya_lora() -> dict[str, torch.Tensor]:
    """A kohya LoRA for Stable Diffusion 1.5's UNet (lora_unet_down_blocks_...)."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return {f"{name}.lora_down.weight": torch.ones(RANK, 320), f"{name}.lora_up.weight": torch.ones(320, RANK),
            f"{name}.alpha": torch.tensor(float(RANK))}


def lycoris_lokr_lora() -> dict[str, torch.Tensor]:
    """A LyCORIS LoKr LoRA for FLUX in kohya names (Kronecker factors, no lora_down/lora_up)."""
    name = "lora_unet_double_blocks_0_img_attn_proj"
    return {f"{name}.lokr_w1": torch.ones(4, 4), f"{name}.lokr_w2": torch.ones(8, 8),
            f"{name}.alpha": torch.tensor(1.0)}


def control_lora(lora: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Flux Control LoRA: its x_embedder A takes twice the latent channels (image + control)."""
    x_embedder = transformer.get_submodule("x_embedder")
    generator = torch.Generator().manual_seed(0)
    return {**lora, down_key("x_embedder"): torch.randn(RANK, 2 * x_embedder.in_features, generator=generator),
            up_key("x_embedder"): torch.randn(x_embedder.out_features, RANK, generator=generator)}
