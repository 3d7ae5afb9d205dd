"""The GPU memory plan, computed on CPU from the full-size configs counted on the meta device."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from conftest import REPO
from helpers import tiny_lora
from lassie.engine import memory as m
from lassie.engine.variants import plan_warm_up, planned_graphs
from lassie.settings import DEFAULT_SLOT_RANKS

CONFIGS = REPO / "scripts" / "flux_configs"

GIB = 2**30
H100_80GB = 85_031_714_816  # what torch reports for an 80 GB H100: 79.2 GiB
H100_NVL_94GB = 100_485_545_984  # 93.6 GiB
H200_141GB = 150_110_011_392  # 139.8 GiB
L40S_48GB = 48_305_799_168


def full_size_configs() -> m.ModelConfigs:
    """FLUX.1 dev + schnell and the safety models as published (`scripts/flux_configs`)."""
    return m.ModelConfigs(transformers={model: CONFIGS / f"{model}_transformer.json" for model in ("dev", "schnell")},
                          t5=CONFIGS / "t5_text_encoder.json", clip=CONFIGS / "clip_text_encoder.json",
                          vae=CONFIGS / "vae.json", compvis=CONFIGS / "compvis_safety_checker.json",
                          falcon=CONFIGS / "falcon_nsfw_classifier.json")


@pytest.fixture(scope="module")
def full_size() -> m.Footprint:
    return m.footprint_from_configs(full_size_configs())


def test_the_full_size_models_are_counted_from_their_configs(full_size):
    """The published sizes: 11.9 B per transformer (8.6 B in the token linears go_fast quantizes),
    T5-XXL + CLIP-L 4.9 B, the VAE 84 M, both safety models 0.39 B."""
    assert full_size.transformer_parameters["dev"] == pytest.approx(11.90e9, rel=1e-3)
    assert full_size.transformer_parameters["schnell"] == pytest.approx(11.89e9, rel=1e-3)
    assert full_size.token_linear_parameters == pytest.approx(8.61e9, rel=1e-3)
    assert full_size.text_encoder_parameters == pytest.approx(4.885e9, rel=1e-3)
    assert full_size.vae_parameters == pytest.approx(83.8e6, rel=1e-2)
    assert full_size.safety_parameters == pytest.approx(0.39e9, rel=1e-2)
    assert full_size.hidden_size == 3072


def test_the_resident_set_is_what_the_counted_parameters_take(full_size):
    """The Lassie adapter is counted on every transformer: without its file, as a rank-128 LoRA on
    every linear (1.29 GiB each, as much as a rank-128 slot)."""
    lassie = full_size.lassie_parameters * m.BF16_BYTES
    assert lassie / GIB == pytest.approx(1.29, abs=0.01)
    bf16_only = full_size.resident_bytes(go_fast_copies=False, slot_ranks=())
    with_copies = full_size.resident_bytes(go_fast_copies=True, slot_ranks=())
    assert (bf16_only - 2 * lassie) / GIB == pytest.approx(54.3, abs=0.1)
    assert (with_copies - bf16_only - 2 * lassie) / GIB == pytest.approx(2 * 8.0, abs=0.1)
    slots = full_size.resident_bytes(go_fast_copies=True, slot_ranks=(128,)) - with_copies
    assert slots / GIB == pytest.approx(4 * 1.29, abs=0.05)  # a rank-128 slot on each of 4 transformers
    ladder = full_size.resident_bytes(go_fast_copies=True, slot_ranks=(32, 128)) - with_copies
    assert ladder == slots * 160 // 128  # slots of rank 32 and 128


def test_the_lassie_adapter_is_counted_from_its_file(tmp_path):
    """At setup the plan reads the LoRA file's header instead of assuming the bound."""
    path = tmp_path / "lora.safetensors"
    path.write_bytes(tiny_lora(3, rank=4))
    state_dict = load_file(path)
    assert m.lora_parameters(path) == sum(tensor.numel() for tensor in state_dict.values()) > 0
    configs = full_size_configs()
    counted = m.footprint_from_configs(m.ModelConfigs(**{**configs.__dict__, "lassie_lora": path}))
    assert counted.lassie_parameters == m.lora_parameters(path)


def test_the_worst_request_is_estimated_from_the_per_megapixel_figures(full_size):
    """4 outputs at 1440x1440: VAE decode dominates unless it goes one image at a time (FACTS.md:
    about 1.8 GiB per output megapixel, so about 15 GiB for all four and 3.73 GiB for one)."""
    unsliced = full_size.working_bytes((1440, 1440), 4, vae_slicing=False)
    assert unsliced / GIB == pytest.approx(14.93, abs=0.01)
    sliced = full_size.working_bytes((1440, 1440), 4, vae_slicing=True)
    assert sliced == full_size.working_bytes((1440, 1440), 1, vae_slicing=False)
    assert sliced / GIB == pytest.approx(3.73, abs=0.01)
    assert full_size.working_bytes((512, 512), 1, vae_slicing=False) < 1 * GIB


def fits_with_headroom(plan: m.MemoryPlan, device_bytes: int) -> bool:
    return plan.resident_bytes + plan.worst_request_bytes + m.RESERVED_BYTES + m.HEADROOM_BYTES <= device_bytes


def test_an_h200_keeps_everything_resident_and_decodes_batches_at_once(full_size):
    plan = m.plan_memory(H200_141GB, full_size, quantizes=True, slot_ranks=DEFAULT_SLOT_RANKS)
    assert (plan.go_fast_copies, plan.vae_slicing, plan.slot_ranks) == (True, False, (128,))
    assert fits_with_headroom(plan, H200_141GB)


def test_a_94_gb_h100_nvl_keeps_the_go_fast_copies_and_the_slot_by_decoding_one_image_at_a_time(full_size):
    """The rank-128 slot and the go_fast copies fit beside a one-image-at-a-time decode; slicing
    the VAE (same images) costs less than narrowing the slot."""
    plan = m.plan_memory(H100_NVL_94GB, full_size, quantizes=True, slot_ranks=DEFAULT_SLOT_RANKS)
    assert (plan.go_fast_copies, plan.vae_slicing, plan.slot_ranks) == (True, True, (128,))
    assert fits_with_headroom(plan, H100_NVL_94GB)
    assert "VAE decodes one image at a time" in plan.reason and "narrowed" not in plan.reason


def test_a_little_less_memory_slices_the_vae_before_narrowing_the_slot(full_size):
    plan = m.plan_memory(95 * GIB, full_size, quantizes=True, slot_ranks=(128,))
    assert (plan.go_fast_copies, plan.vae_slicing, plan.slot_ranks) == (True, True, (128,))
    assert "VAE decodes one image at a time" in plan.reason


def test_narrower_slots_halve_the_widest_down_to_the_minimum():
    assert m.narrower_ranks((32, 128)) == (32, 64)
    assert m.narrower_ranks((32, 64)) == (32,)
    assert m.narrower_ranks((16, 128)) == (16, 64)
    assert m.narrower_ranks((32,)) is None and m.narrower_ranks(()) is None
    assert m.narrower_ranks((8,)) is None  # already below the minimum: never narrowed


def test_an_80_gb_h100_keeps_rank_128_extra_loras_and_2_gib_by_running_go_fast_on_bf16(full_size):
    """With the Lassie adapters counted and 2 GiB kept for the worst request, the go_fast copies do
    not fit an 80 GB H100 even with the narrowest slot: go_fast runs the bf16 transformers there,
    and extra LoRAs up to rank 128 still work (the README's GPU table says so)."""
    plan = m.plan_memory(H100_80GB, full_size, quantizes=True, slot_ranks=DEFAULT_SLOT_RANKS)
    assert (plan.go_fast_copies, plan.vae_slicing, plan.slot_ranks) == (False, True, (128,))
    assert fits_with_headroom(plan, H100_80GB)
    narrowest_with_copies = (full_size.resident_bytes(True, (m.MIN_SLOT_RANK,))
                             + full_size.working_bytes(m.WORST_SIZE, m.WORST_OUTPUTS, True))
    assert narrowest_with_copies + m.RESERVED_BYTES + m.HEADROOM_BYTES > H100_80GB
    assert "no room for go_fast copies: go_fast runs bf16" in plan.reason and "narrowed" not in plan.reason


@pytest.mark.parametrize("device_bytes", [H100_80GB, H100_NVL_94GB, H200_141GB])
def test_every_gpu_plan_warms_up_at_most_8_graphs_with_the_default_settings(full_size, device_bytes):
    plan = m.plan_memory(device_bytes, full_size, quantizes=True, slot_ranks=DEFAULT_SLOT_RANKS)
    graphs = planned_graphs(plan_warm_up(plan.go_fast_copies, plan.slot_ranks))
    assert graphs == (4 if plan.go_fast_copies else 2) and graphs <= 8


@pytest.mark.parametrize("slot_ranks, when_needed, graphs", [
    ((128,), False, 4), ((32, 128), False, 8), ((), False, 4), ((128,), True, 16), ((32, 128), True, 24)])
def test_each_switch_s_graph_count_is_planned(slot_ranks, when_needed, graphs):
    """Narrow slots add a graph set per slot; activating adapters only when needed doubles the
    Lassie states and adds a no-slot set (merging Lassie changes no count: its delta adapter
    takes the adapter's place)."""
    assert planned_graphs(plan_warm_up(True, slot_ranks, when_needed)) == graphs


def test_without_quantization_nothing_is_added_for_go_fast_copies(full_size):
    plan = m.plan_memory(H100_80GB, full_size, quantizes=False, slot_ranks=())
    assert (plan.go_fast_copies, plan.slot_ranks) == (False, ())
    assert plan.resident_bytes == full_size.resident_bytes(False, ())


def test_a_gpu_that_cannot_hold_the_models_fails_setup_naming_the_memory_it_needs(full_size):
    with pytest.raises(m.InsufficientMemory, match=r"this GPU has 45.0 GiB; lassie needs at least 6\d.\d GiB"):
        m.plan_memory(L40S_48GB, full_size, quantizes=True, slot_ranks=DEFAULT_SLOT_RANKS)


def test_host_memory_plans_nothing_away(full_size):
    plan = m.plan_memory(None, full_size, quantizes=True, slot_ranks=(4, 8))
    assert (plan.go_fast_copies, plan.vae_slicing, plan.slot_ranks) == (True, False, (4, 8))


def test_the_prompt_cache_is_counted_when_it_is_on(full_size):
    off = m.plan_memory(H200_141GB, full_size, quantizes=True, slot_ranks=DEFAULT_SLOT_RANKS)
    on = m.plan_memory(H200_141GB, full_size, quantizes=True, slot_ranks=DEFAULT_SLOT_RANKS, prompt_cache=True)
    assert on.resident_bytes - off.resident_bytes == m.PROMPT_CACHE_BYTES == 256 * 2**20
