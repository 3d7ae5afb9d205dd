"""go_fast on CPU: the hardware decision for faked devices, compile settings, and the quantized path for real.

Only the hardware query is faked; the fp8 weight-only transformer is really built and run
(torchao's float8 weight-only storage works on CPU), with real PEFT adapters on it.
"""

from __future__ import annotations

import logging

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torchao.utils import TorchAOBaseTensor

import make_tiny_weights as tiny
from lassie.engine import compilation, go_fast, hardware
from lassie.request.plan import GO_FAST_LORA_MULTIPLIER, Request, effective_lora_scales, go_fast_applies
from lassie.settings import GO_FAST_MODES, CompileSettings, Settings

CPU = hardware.DeviceInfo(kind="cpu")
A100 = hardware.DeviceInfo(kind="cuda", name="NVIDIA A100-SXM4-80GB", capability=(8, 0), total_memory=85_100_000_000)
H100 = hardware.DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", capability=(9, 0), total_memory=85_031_714_816)
H200 = hardware.DeviceInfo(kind="cuda", name="NVIDIA H200", capability=(9, 0), total_memory=150_110_011_392)
L40S = hardware.DeviceInfo(kind="cuda", name="NVIDIA L40S", capability=(8, 9), total_memory=48_305_799_168)
MI300X = hardware.DeviceInfo(kind="rocm", name="AMD Instinct MI300X", capability=(9, 4), total_memory=206_141_652_992)

# e4m3 keeps 3 mantissa bits: rounding to nearest leaves each weight a relative error of at most
# half a step, a step being 2**-3 of the weight's power of two, so its RMS is at most
# 2**-3 / sqrt(12) = 3.6%. A linear's output sums many such independent errors and carries about
# the same relative RMS error (measured 2.1-2.8% per layer); twice that is the bound. Through the
# whole transformer the error can only shrink relative to the output, since the modulation,
# embedders and residual paths stay exact (measured 0.3%), so the same bound holds there.
FP8_RELATIVE_ERROR_BOUND = 2 * 2**-3 / 12**0.5


@pytest.fixture
def transformer():
    return tiny.tiny_transformer(guidance_embeds=True, seed=0).eval()


def transformer_inputs(image_tokens: int = 16, text_tokens: int = 8) -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, image_tokens, 64, generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, 32, generator=generator),
        pooled_projections=torch.randn(1, 32, generator=generator),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(image_tokens, 3),
        txt_ids=torch.zeros(text_tokens, 3),
        guidance=torch.tensor([3.0]),
        return_dict=False,
    )


def run(transformer) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**transformer_inputs())[0]


def attach_lassie(transformer, name: str = "lassie") -> None:
    transformer.load_lora_adapter(tiny.lassie_lora_state_dict(transformer), prefix="transformer", adapter_name=name)


@pytest.mark.parametrize(
    ("device", "mode", "says"),
    [
        (CPU, go_fast.FastMode.UNQUANTIZED, "no GPU here"),
        (A100, go_fast.FastMode.UNQUANTIZED, "this GPU (NVIDIA A100-SXM4-80GB, compute capability 8.0) has no fp8"),
        (L40S, go_fast.FastMode.FP8_DYNAMIC, "fp8 (torchao dynamic float8 activations and weights) on NVIDIA L40S"),
        (H100, go_fast.FastMode.FP8_DYNAMIC, "on NVIDIA H100 80GB HBM3, compute capability 9.0"),
        (H200, go_fast.FastMode.FP8_DYNAMIC, "on NVIDIA H200"),
        (MI300X, go_fast.FastMode.UNQUANTIZED, "not set up for ROCm"),
    ],
)
def test_go_fast_plan_follows_the_hardware(device, mode, says):
    plan = go_fast.plan_go_fast(device)
    assert plan.mode == mode
    assert says in plan.reason


def test_an_operator_can_ask_for_a_mode_and_fp8_falls_back_where_it_cannot_run():
    assert go_fast.plan_go_fast(CPU, go_fast.FastMode.FP8_WEIGHT_ONLY).mode is go_fast.FastMode.FP8_WEIGHT_ONLY
    assert go_fast.plan_go_fast(H200, go_fast.FastMode.UNQUANTIZED).mode is go_fast.FastMode.UNQUANTIZED
    refused = go_fast.plan_go_fast(A100, go_fast.FastMode.FP8_DYNAMIC)
    assert refused.mode is go_fast.FastMode.UNQUANTIZED
    assert refused.reason.startswith("LASSIE_GO_FAST_MODE=fp8 cannot be honoured: go_fast: this GPU")


def test_the_go_fast_decision_weighs_the_device_the_memory_plan_and_what_was_built():
    """One record: fp8 stands only where its copies fit and were built; otherwise bf16, saying why."""
    wanted = go_fast.plan_go_fast(H200)
    assert go_fast.decide_go_fast(wanted, copies_fit=True, memory_reason="fits") == wanted
    vetoed = go_fast.decide_go_fast(wanted, copies_fit=False, memory_reason="memory plan: no room for go_fast copies")
    assert vetoed.mode is go_fast.FastMode.UNQUANTIZED
    assert vetoed.reason == f"{wanted.reason}; memory plan: no room for go_fast copies"
    failed = go_fast.decide_go_fast(wanted, copies_fit=True, memory_reason="fits", build_failure="RuntimeError: no")
    assert (failed.mode, failed.reason) == (go_fast.FastMode.UNQUANTIZED, "go_fast: fp8 failed at setup (RuntimeError: no)")
    unquantized = go_fast.plan_go_fast(A100)
    assert go_fast.decide_go_fast(unquantized, copies_fit=False, memory_reason="no room") == unquantized


def go_fast_mode(value: str | None) -> go_fast.FastMode | None:
    """The mode a server started with LASSIE_GO_FAST_MODE=`value` (None: unset) asks for."""
    environ = {} if value is None else {"LASSIE_GO_FAST_MODE": value}
    return go_fast.requested_mode(Settings.from_env(environ).go_fast_mode)


def test_go_fast_mode_setting_is_parsed_strictly():
    assert [go_fast_mode(v) for v in (None, "", "auto", " FP8 ")] == [None, None, None, go_fast.FastMode.FP8_DYNAMIC]
    with pytest.raises(ValueError, match="LASSIE_GO_FAST_MODE must be one of auto, fp8, fp8-weight-only"):
        go_fast_mode("fast")


def test_the_real_hardware_query_feeds_the_plan(monkeypatch):
    """Only torch's CUDA queries are faked: what an H100 reports becomes its fp8 plan."""

    class Properties:
        name, total_memory = H100.name, H100.total_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    device = hardware.query_device()
    assert device == H100
    assert go_fast.plan_go_fast(device).mode is go_fast.FastMode.FP8_DYNAMIC


def test_without_cuda_the_query_reports_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.query_device() == CPU


def test_go_fast_multiplies_lora_scales_by_exactly_one_and_a_half_and_custom_sizes_run_bf16():
    assert GO_FAST_LORA_MULTIPLIER == 1.5
    assert effective_lora_scales(0.7, -0.3, go_fast=True) == pytest.approx((1.05, -0.45))
    assert effective_lora_scales(0.7, -0.3, go_fast=False) == (0.7, -0.3)
    assert not go_fast_applies(Request(prompt="x", go_fast=True, aspect_ratio="custom", width=512, height=512))
    assert go_fast_applies(Request(prompt="x", go_fast=True, aspect_ratio="16:9"))


def compile_settings(value: str | None, backend: str | None) -> CompileSettings:
    """What a server started with LASSIE_COMPILE=`value`, LASSIE_COMPILE_BACKEND=`backend` (None: unset) reads."""
    environ = {"LASSIE_COMPILE": value, "LASSIE_COMPILE_BACKEND": backend}
    return Settings.from_env({name: text for name, text in environ.items() if text is not None}).compile


@pytest.mark.parametrize(
    ("value", "backend", "device", "enabled", "mode", "chosen"),
    [
        (None, None, H200, True, "default", "inductor"),
        ("1", None, H100, True, "default", "inductor"),
        ("max-autotune", None, H200, True, "max-autotune", "inductor"),
        ("0", None, H200, False, "default", "inductor"),
        ("off", "aot_eager", H200, False, "default", "inductor"),
        (None, None, CPU, False, "default", "inductor"),
        (None, "aot_eager", CPU, False, "default", "inductor"),
        ("1", "aot_eager", CPU, True, "default", "aot_eager"),
        ("1", None, CPU, True, "default", "inductor"),
        (None, None, MI300X, False, "default", "inductor"),
    ],
)
def test_compile_setting(value, backend, device, enabled, mode, chosen):
    """Unset compiles on CUDA only; asked for, it compiles anywhere, with the chosen backend."""
    setting = compilation.compile_setting(compile_settings(value, backend), device)
    assert (setting.enabled, setting.mode, setting.backend) == (enabled, mode, chosen)


def test_the_compile_reason_names_lassie_compile_only_where_the_operator_set_it():
    """The setup log's `compile: ...` must not read like a setting nobody made."""
    assert "LASSIE_COMPILE" not in compilation.compile_setting(compile_settings(None, None), CPU).reason
    assert compilation.compile_setting(compile_settings("0", None), CPU).reason == "LASSIE_COMPILE is off"


def test_compile_setting_rejects_unknown_values():
    with pytest.raises(ValueError, match="LASSIE_COMPILE must be one of 1, true, yes, on, 0, false, no, off, default"):
        compilation.compile_setting(compile_settings("maybe", None), H200)
    with pytest.raises(ValueError, match=r"LASSIE_COMPILE_BACKEND must be one of .*aot_eager.*, got 'fast'"):
        compilation.compile_setting(compile_settings("1", "fast"), H200)


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return ((candidate - reference).norm() / reference.norm()).item()


def test_each_fp8_weight_only_linear_stays_within_the_e4m3_rounding_bound(transformer):
    go_fast_modules = dict(go_fast.quantize_transformer(transformer, go_fast.FastMode.FP8_WEIGHT_ONLY).named_modules())
    generator = torch.Generator().manual_seed(1)
    for name, linear in transformer.named_modules():
        if go_fast.is_token_linear(linear, name):
            inputs = torch.randn(7, linear.in_features, generator=generator)
            with torch.no_grad():
                error = relative_error(linear(inputs), go_fast_modules[name](inputs))
            assert 0.005 < error < FP8_RELATIVE_ERROR_BOUND, name


def test_fp8_weight_only_transformer_stays_close_to_float32(transformer):
    reference = run(transformer)
    go_fast_copy = go_fast.quantize_transformer(transformer, go_fast.FastMode.FP8_WEIGHT_ONLY)
    assert 0 < relative_error(reference, run(go_fast_copy)) < FP8_RELATIVE_ERROR_BOUND
    assert torch.equal(run(transformer), reference), "the original must be left exactly as it was"


def test_only_token_linears_are_quantized_and_everything_else_is_shared(transformer):
    go_fast_copy = go_fast.quantize_transformer(transformer, go_fast.FastMode.FP8_WEIGHT_ONLY)
    fp8 = {name for name, m in go_fast_copy.named_modules()
           if isinstance(getattr(m, "weight", None), TorchAOBaseTensor)}
    token_linears = {name for name, m in transformer.named_modules() if go_fast.is_token_linear(m, name)}
    assert fp8 == token_linears and "transformer_blocks.0.attn.to_q" in fp8
    assert "transformer_blocks.0.norm1.linear" not in fp8 and "proj_out" not in fp8
    shared = go_fast_copy.transformer_blocks[0].norm1.linear.weight
    assert shared.data_ptr() == transformer.transformer_blocks[0].norm1.linear.weight.data_ptr()
    assert not isinstance(transformer.transformer_blocks[0].attn.to_q.weight, TorchAOBaseTensor)


def test_unquantized_mode_is_the_same_transformer(transformer):
    assert go_fast.quantize_transformer(transformer, go_fast.FastMode.UNQUANTIZED) is transformer


def test_quantizing_leaves_the_source_adapters_behind(transformer):
    attach_lassie(transformer)
    go_fast_copy = go_fast.quantize_transformer(transformer, go_fast.FastMode.FP8_WEIGHT_ONLY)
    assert not any(isinstance(m, BaseTunerLayer) for m in go_fast_copy.modules())
    assert not getattr(go_fast_copy, "peft_config", None)
    assert "lassie" in transformer.peft_config


def test_fused_adapters_are_refused(transformer):
    attach_lassie(transformer)
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    with pytest.raises(ValueError, match="fused LoRA"):
        go_fast.quantize_transformer(transformer, go_fast.FastMode.FP8_WEIGHT_ONLY)


def lora_delta(layer, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(inputs) - layer.get_base_layer()(inputs)


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated without")
def test_lora_on_the_fp8_transformer_is_exactly_the_lora_of_the_original(transformer):
    """PEFT puts TorchaoLoraLinear on fp8 weights; the LoRA path itself is not quantized, so its
    contribution, and the 1.5x go_fast multiplier on it, are the same as on the original."""
    go_fast_copy = go_fast.quantize_transformer(transformer, go_fast.FastMode.FP8_WEIGHT_ONLY)
    attach_lassie(transformer)
    attach_lassie(go_fast_copy)
    layer, fp8_layer = transformer.transformer_blocks[0].attn.to_q, go_fast_copy.transformer_blocks[0].attn.to_q
    assert type(fp8_layer).__name__ == "TorchaoLoraLinear"
    inputs = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(lora_delta(fp8_layer, inputs), lora_delta(layer, inputs))
    go_fast_copy.set_adapters(["lassie"], [GO_FAST_LORA_MULTIPLIER])
    transformer.set_adapters(["lassie"], [1.0])
    torch.testing.assert_close(lora_delta(fp8_layer, inputs), GO_FAST_LORA_MULTIPLIER * lora_delta(layer, inputs))


def test_precision_is_logged_once_per_model_and_precision(caplog):
    caplog.set_level(logging.INFO, logger="lassie.engine.go_fast")
    log = go_fast.PrecisionLog()
    plan = go_fast.plan_go_fast(A100)
    for _ in range(3):
        log.ran("dev", True, plan, torch.bfloat16)
        log.ran("dev", False, plan, torch.bfloat16)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [f"dev with go_fast=true runs bfloat16 ({plan.reason})", "dev with go_fast=false runs bfloat16"]


def test_fp8_runs_are_logged_by_their_precision(caplog):
    caplog.set_level(logging.INFO, logger="lassie.engine.go_fast")
    go_fast.PrecisionLog().ran("schnell", True, go_fast.plan_go_fast(H200), torch.bfloat16)
    assert "schnell with go_fast=true runs fp8 (torchao dynamic float8 activations and weights)" in caplog.text



def test_the_go_fast_modes_settings_accept_are_the_modes_go_fast_knows():
    """settings.py stays free of torch, so it lists the mode names itself: they must be FastMode's."""
    assert set(GO_FAST_MODES) == {"auto", *(mode.value for mode in go_fast.FastMode)}
