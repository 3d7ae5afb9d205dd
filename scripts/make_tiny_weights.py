"""Write a complete weights directory with tiny random models, in exactly the real layout.

Real FLUX weights cannot be fetched where tests and demos run, so this builds stand-ins of
the same classes and file layout: the product code loads them through the very same path
as the real ones. Deterministic (fixed seeds), offline, a few MB, seconds to build.

Usage: .venv/bin/python scripts/make_tiny_weights.py OUT_DIR
"""

from __future__ import annotations

import project_python  # noqa: F401  (first: under a Python without the project's packages, one line naming .venv/bin/python)

# isort: split
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lassie.quiet import no_progress_bars, silence_known_noise

silence_known_noise()  # as predict.py does: torch, torchao and transformers print their known noise on import

import torch  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from lassie.weights.layout import WeightsLayout  # noqa: E402

log = logging.getLogger("make_tiny_weights")

TEXT_DIM = 32
TRIGGER_WORD = "LSSIE"
LORA_RANK = 4

DEV_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def tiny_transformer(guidance_embeds: bool, seed: int) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def tiny_vae() -> AutoencoderKL:
    """Four blocks, so the VAE scales by 8 like the real one; 16 latent channels like FLUX."""
    torch.manual_seed(2)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )


def byte_level_vocab() -> list[str]:
    """The 256 byte-level BPE symbols GPT-2/CLIP tokenizers use, in their canonical order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def write_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges), made locally instead of downloaded."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = byte_level_vocab()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[],
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_t5_tokenizer(directory: Path) -> T5TokenizerFast:
    """A small Unigram tokenizer over characters and a few words, in T5's fast format."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    pieces = ["<pad>", "</s>", "<unk>"]
    pieces += ["▁" + word for word in ("a", "the", "dog", "photo", "of", "in", TRIGGER_WORD.lower())]
    pieces += ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab = [(piece, -float(i)) for i, piece in enumerate(pieces)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=512,
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_clip_text(vocab_size: int) -> CLIPTextModel:
    torch.manual_seed(3)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def tiny_t5(vocab_size: int) -> T5EncoderModel:
    torch.manual_seed(4)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def random_lora(linears: dict[str, tuple[int, int]], seed: int, *, rank: int = LORA_RANK, scale: float = 0.5,
                prefix: str = "transformer") -> dict[str, torch.Tensor]:
    """A LoRA on `linears` (module name -> (in_features, out_features)), in diffusers/PEFT keys.

    Keys are `<prefix>.<module>.lora_A.weight` / `.lora_B.weight`, A and B drawn from N(0, scale²).
    B is non-zero (unlike a freshly initialised LoRA) so the adapter visibly changes images.
    Other seeds give other LoRAs of the same shape (tests build every LoRA they need with this).
    """
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, (in_features, out_features) in linears.items():
        down = torch.randn(rank, in_features, generator=generator) * scale
        up = torch.randn(out_features, rank, generator=generator) * scale
        state[f"{prefix}.{name}.lora_A.weight"] = down.contiguous()
        state[f"{prefix}.{name}.lora_B.weight"] = up.contiguous()
    return state


def linear_sizes(model: torch.nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each named linear of `model`, for `random_lora`."""
    return {name: (model.get_submodule(name).in_features, model.get_submodule(name).out_features) for name in names}


def lassie_targets(transformer: FluxTransformer2DModel) -> list[str]:
    """The linears the Lassie trainer adapts: every attention and MLP projection in the blocks."""
    targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_mlp", "proj_out")
    return [name for name, module in transformer.named_modules()
            if name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and isinstance(module, torch.nn.Linear) and name.endswith(targets)]


def lassie_lora_state_dict(transformer: FluxTransformer2DModel, seed: int = 5) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA over every attention and MLP linear, in the trainer's diffusers/PEFT keys."""
    return random_lora(linear_sizes(transformer, lassie_targets(transformer)), seed)


def write_safety_models(layout: WeightsLayout) -> None:
    """Tiny CompVis checker and Falcon ViT classifier, of the real classes and file names."""
    torch.manual_seed(6)
    clip = CLIPConfig(
        text_config=dict(hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=100, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=TEXT_DIM,
    )
    StableDiffusionSafetyChecker(clip).save_pretrained(layout.compvis_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        layout.compvis_dir
    )
    torch.manual_seed(7)
    vit = ViTConfig(hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, image_size=32, patch_size=8,
                    id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    ViTForImageClassification(vit).save_pretrained(layout.falcon_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(layout.falcon_dir)


def build(out_dir: Path) -> WeightsLayout:
    """The tiny weights in `out_dir`, quietly for every caller (this script, the demo, the tests):
    transformers' "Writing model shards" bars are carriage returns, off as setup has them."""
    no_progress_bars()
    layout = WeightsLayout(out_dir)
    clip_tokenizer = write_clip_tokenizer(out_dir / "tmp-tokenizer")
    t5_tokenizer = write_t5_tokenizer(out_dir / "tmp-tokenizer-2")
    dev = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER),
        vae=tiny_vae(),
        text_encoder=tiny_clip_text(len(clip_tokenizer)),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny_t5(len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
        transformer=tiny_transformer(guidance_embeds=True, seed=0),
    )
    dev.save_pretrained(layout.dev_dir)
    schnell_transformer = tiny_transformer(guidance_embeds=False, seed=1)
    schnell_transformer.save_pretrained(layout.schnell_dir / "transformer")
    FlowMatchEulerDiscreteScheduler(**SCHNELL_SCHEDULER).save_pretrained(layout.schnell_dir / "scheduler")
    model_index = json.loads((layout.dev_dir / "model_index.json").read_text())
    (layout.schnell_dir / "model_index.json").write_text(json.dumps(model_index, indent=2))
    for tmp in ("tmp-tokenizer", "tmp-tokenizer-2"):
        for file in (out_dir / tmp).iterdir():
            file.unlink()
        (out_dir / tmp).rmdir()

    layout.lassie_dir.mkdir(parents=True, exist_ok=True)
    save_file(lassie_lora_state_dict(dev.transformer), layout.lassie_lora, metadata={"format": "pt"})
    layout.trigger_word_file.write_text(TRIGGER_WORD + "\n")
    write_safety_models(layout)
    return layout


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    layout = build(args.out_dir)
    missing = layout.missing()
    if missing:
        raise SystemExit(f"tiny weights incomplete, missing: {', '.join(missing)}")
    log.info("tiny weights written to %s", args.out_dir)


if __name__ == "__main__":
    main()
