"""scripts/bench_gpu.py off the GPU: its preflight, its CPU dry run, its table; scripts/bench_cpu.py's server ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import torch

import bench_gpu as bench
from conftest import REPO
from fake_services import services  # noqa: F401 (fixture)
from helpers import tiny_lora

BENCH_GPU = REPO / "scripts" / "bench_gpu.py"


def pyproject_pins() -> dict[str, str]:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(requirement.split("==") for requirement in dependencies)


def run_bench(*args: str, code: str | None = None, env: dict | None = None, timeout: float = 180):
    """The script in a fresh interpreter; `code` runs first (in the test only: blocking imports)."""
    command = [sys.executable, str(BENCH_GPU), *args]
    if code:
        command = [sys.executable, "-c", f"{code}\nimport runpy, sys\nsys.argv = {[str(BENCH_GPU), *args]!r}\n"
                   f"runpy.run_path({str(BENCH_GPU)!r}, run_name='__main__')"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_gpu_benchmark_exits_2_with_a_clear_message_without_cuda():
    result = run_bench("--quick", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "bench_gpu.py needs a CUDA GPU" in result.stderr and "nothing was run" in result.stderr
    assert "--dry-run" in result.stderr
    assert "Traceback" not in result.stderr


def test_preflight_names_the_install_line_for_missing_diffusers_and_torchao():
    """As on the GPU machine: no diffusers, torchao or httpx2's own httpcore2. Nothing is built."""
    blocked = "import sys\nfor name in ('diffusers', 'torchao', 'httpcore2'):\n    sys.modules[name] = None"
    pins = {**pyproject_pins(), "httpcore2": bench.CARRY_PINS["httpcore2"]}
    result = run_bench("--quick", "--work-dir", "/nonexistent/bench", code=blocked)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    wanted = " ".join(f"{name}=={pins[name]}" for name in ("diffusers", "torchao", "httpcore2"))
    assert f"python3 -m pip install {wanted}" in result.stderr
    assert "scripts/carry_wheels.sh" in result.stderr and "--target /tmp/site .whl/*.whl" in result.stderr
    assert "torch==" not in result.stderr
    assert "bench_gpu plan" not in result.stdout  # nothing started


def test_preflight_of_a_gpu_run_names_torchvision_and_says_it_must_match_torch(monkeypatch, capsys):
    """As on a GPU machine whose torchvision is broken: a library that raises ImportError with its
    whole message as `name` still gets a clean line, naming the distribution the preflight checked."""
    def broken_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("torchvision needs torch 2.11", name="torchvision needs torch 2.11")
        return real_import(name, *args, **kwargs)

    real_import = bench.importlib.import_module
    monkeypatch.setattr(bench.importlib, "import_module", broken_torchvision)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as exited:
        bench.preflight(dry_run=False)
    assert exited.value.code == bench.MISSING_EXIT
    stderr = capsys.readouterr().err
    assert "  torchvision: import torchvision.transforms.v2: torchvision needs torch 2.11" in stderr
    assert "torchvision must be the build made for this torch (torch 2.11: torchvision 0.26)" in stderr
    assert "pip install" not in stderr  # nothing to install: torch and torchvision are the machine's own


def test_missing_module_is_read_from_the_message_when_name_holds_it():
    assert bench.missing_module(ImportError("x", name="httpcore2")) == "httpcore2"
    assert bench.missing_module(ImportError("No module named 'h2'", name="No module named 'h2'")) == "h2"
    assert bench.missing_module(ImportError("needs requests>=2", name="needs requests>=2")) is None


def test_wheels_to_carry_are_the_pinned_versions_and_never_torch():
    listed = subprocess.run(["bash", str(REPO / "scripts" / "carry_wheels.sh"), "--list"], capture_output=True,
                            text=True, timeout=60, check=True).stdout.split()
    pins = pyproject_pins()
    assert {f"{name}=={pins[name]}" for name in ("diffusers", "torchao", "httpx2")} <= set(listed)
    assert not any(line.startswith("torch==") for line in listed)
    assert len({line.split("==")[0] for line in listed}) == len(listed)  # one version of each


def test_random_weights_are_seeded_in_the_asked_dtype_with_real_buffers(tmp_path):
    """The classes' own init on the target device: buffers (CLIP's position ids) are right, not
    the garbage `to_empty` leaves, and every process materialises the same weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16)).save_pretrained(tmp_path)
    bench.mark_random(tmp_path, "model", seed=3, config=None)
    assert not list(tmp_path.glob("model.safetensors"))
    first = bench.materialise(CLIPTextModel, tmp_path, torch.bfloat16, "cpu")
    second = bench.materialise(CLIPTextModel, tmp_path, torch.bfloat16, "cpu")
    assert first.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    assert torch.equal(dict(first.named_buffers())["embeddings.position_ids"], torch.arange(16).unsqueeze(0))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench-gpu-dry")
    result = run_bench("--quick", "--dry-run", "--work-dir", str(work), "--out", str(work / "table.md"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (work / "table.jsonl").read_text().splitlines()]
    return result, records, (work / "table.md").read_text()


def test_dry_run_times_every_request_case_and_the_eager_baseline(dry_run):
    _, records, _ = dry_run
    runs = [record for record in records if record["kind"] == "run"]
    quick_cases = [case.name for case in bench.CASES if not case.full_only]
    baselines = [f"diffusers {model} bf16 eager" for model in ("dev", "schnell")]
    for name in quick_cases + baselines:
        assert {run["warm"] for run in runs if run["case"] == name} == {True, False}, name
    assert not [record for record in records if record["kind"] == "error"]
    for run in runs:
        phases = run["phases"]
        assert phases["text encoding"] > 0 and phases["denoising"] > 0 and phases["VAE decode"] > 0, run
        assert phases["image encoding"] > 0 and sum(phases.values()) == pytest.approx(run["seconds"], rel=0.02)


def test_dry_run_reports_the_setup_breakdown_and_what_needs_cuda(dry_run):
    result, records, table = dry_run
    product = next(r for r in records if r["kind"] == "setup" and r["label"] == "product")
    assert product["materialise"] > 0 and product["total"] >= product["materialise"]
    assert any(what.startswith("loading models") for what, _ in product["steps"])
    notes = {record["text"] for record in records if record["kind"] == "note"}
    assert "skipped: needs CUDA (dry run)" in notes
    assert "diffusers torchao fp8 + compile: needs CUDA (dry run)" in notes
    assert table in result.stdout
    assert "| dev go_fast | " in table and "| switch to a cached extra LoRA" in table
    assert "| rank-64 vs rank-16 extra LoRA (schnell go_fast, the same slot by default) | " in table


def test_dry_run_measures_the_defaults_and_a_switch_in_the_same_run(dry_run):
    _, records, table = dry_run
    arms = {(record["arm"], record["case"]) for record in records if record["kind"] == "switch-run"}
    assert arms == {(arm, case.name) for arm in bench.switch_arms(bench.Options(True, True, 1, REPO, None))
                    for case in bench.SWITCH_CASES}
    assert all(record["per_step"] > 0 for record in records if record["kind"] == "switch-run")
    lines = table.splitlines()
    first = bench.SWITCHES[0]
    assert lines.index("Switches (each on, the rest at their defaults; same run):") < lines.index("Phases (per request):")
    assert any(line.startswith("| defaults (every switch off) | ") for line in lines)
    row = next(line for line in lines if line.startswith(f"| `{first.variable}={first.on}`"))
    assert row.count("x |") == len(bench.SWITCH_CASES)  # each case's ratio to the defaults
    later = bench.SWITCHES[1]
    assert f"| `{later.variable}={later.on}` ({later.what}) | not measured |" in table
    assert "dry run on CPU" in table.splitlines()[0]


def test_psnr():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    assert bench.image_psnr(image, image) == float("inf")
    assert bench.image_psnr(image, image + 1) == pytest.approx(48.1308, abs=1e-4)  # 10 log10(255² / 1)
    half_off_by_two = image.copy()
    half_off_by_two[:2] += 2  # mean squared error 2 (the mean absolute error is 1)
    assert bench.image_psnr(image, half_off_by_two) == pytest.approx(45.1205, abs=1e-4)  # 10 log10(255² / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        bench.image_psnr(image, image[:2])


def test_dry_run_psnr_shows_go_fast_is_bf16_at_one_and_a_half_times_the_scale_on_cpu(dry_run):
    """On CPU go_fast runs the same weights, with the LoRA at 1.5x: identical images."""
    _, records, _ = dry_run
    assert [record["db"] for record in records if record["kind"] == "psnr"] == [float("inf")]


def test_dry_run_sends_random_traffic_and_reports_what_it_compiled(dry_run):
    """On CPU nothing is compiled, so no request adds a graph or runs eagerly; on a GPU the same
    row is the check that warm-up covered what users send."""
    _, records, table = dry_run
    (traffic,) = [record for record in records if record["kind"] == "traffic"]
    assert (traffic["requests"], traffic["graphs"], traffic["eager"]) == (bench.TRAFFIC_REQUESTS_DRY_RUN, 0, 0)
    assert f"| {bench.TRAFFIC_REQUESTS_DRY_RUN} random requests after warm-up: graphs compiled / served eagerly | 0 / 0" in table


def test_the_worst_request_runs_four_outputs_with_an_extra_lora(predictor, services, tmp_path):
    """The h100 section's last request (it needs CUDA, so the dry run skips it): run here on the
    session's predictor at the dry run's size."""
    url = services.serve("/worst/extra-a.safetensors", tiny_lora(61))
    options = bench.Options(quick=True, dry_run=True, repeats=1, work=tmp_path, deadline=None)
    bench.worst_request(predictor, options, bench.Sink(tmp_path / "records.jsonl", "h100"), url.rsplit("/", 1)[0])
    (record,) = bench.read_records(tmp_path / "records.jsonl")
    assert record["kind"] == "run" and record["case"] == "worst request: dev, 4 x 512x512, extra LoRA, 1 step"


def test_table_has_ratios_to_each_baseline_and_judges_the_targets():
    def run(case, model, seconds, warm=False):
        return {"kind": "run", "section": "s", "case": case, "model": model, "warm": warm, "seconds": seconds,
                "phases": {}}

    records = [
        {"kind": "hardware", "section": "product", "device": "NVIDIA H200", "memory_gib": 139.8, "capability": "9.0",
         "cuda": "13.0", "torch": "2.11.0"},
        run("dev go_fast", "dev", 2.4), run("dev go_fast", "dev", 2.2), run("dev go_fast", "dev", 9.0, warm=True),
        run("diffusers dev bf16 eager", "dev", 6.0), run("diffusers dev torchao fp8 + compile", "dev", 3.0),
        run("schnell go_fast + extra LoRA, same as before", "schnell", 0.30),
        run("schnell go_fast, switching to another cached extra LoRA", "schnell", 0.90),
        {"kind": "memory", "section": "h100", "label": "h100 plan, peak", "allocated": 70 * 2**30,
         "reserved": 75 * 2**30, "cap": int(79.19 * 2**30)},
        {"kind": "setup", "section": "h100", "label": "h100 plan, warm compile cache", "total": 80.0,
         "materialise": 4.0, "quantize": 10.0, "compile": 30.0, "warm_up": 50.0, "steps": [], "plan": []},
    ]
    options = bench.Options(quick=True, dry_run=False, repeats=2, work=REPO, deadline=None)
    table = bench.render(records, options)
    row = next(line for line in table.splitlines() if line.startswith("| dev go_fast |"))
    assert "| 2.300 s | 2.200-2.400 s | 9.000 s | 0.38x |  | 0.77x |" in row
    assert "<= 2.0 s; <= 0.75x fp8 + compile | misses |" in row
    switch = next(line for line in table.splitlines() if line.startswith("| switch to a cached extra LoRA"))
    assert "| 0.600 s |" in switch and "| misses |" in switch
    assert "| h100 plan, warm compile cache | 80.0 s | 4.0 s | 10.0 s | 30.0 s | 50.0 s | <= 90 s |" in table
    assert "(cap 79.2 GiB): 70.0 GiB allocated, 75.0 GiB reserved" in table
    assert table.startswith(f"{__import__('datetime').date.today().isoformat()}, NVIDIA H200, 139.8 GiB")


def test_cpu_benchmark_sets_the_server_beside_the_bare_call(tiny_weights):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_cpu.py"), "--weights", str(tiny_weights),
                             "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "OMP_WAIT_POLICY PASSIVE" in out.splitlines()[0]
    for row in ("bare diffusers FluxPipeline + encoding", "lassie predictor, in-process",
                "lassie through the Cog HTTP server", "HTTP + coglet around predict()",
                "worker predict() (coglet predict_time)"):
        assert row in out, row
    assert "x the bare call (" in out and out.count("x the bare call") == 2
    assert out.splitlines()[-1].startswith("markdown row: | ")


def test_the_phase_clock_charges_the_pipeline_only_with_what_ran_inside_it(monkeypatch):
    """lassie encodes prompts before the pipeline call (its cache); diffusers inside it. Both give
    the denoising time, and the phases add up to the request."""
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    class Pipeline:
        def encode_prompt(self):
            now[0] += 3.0

        def __call__(self, encode: bool):
            if encode:
                self.encode_prompt()
            now[0] += 5.0  # denoising

    clock = bench.PhaseClock()
    clock.wrap(Pipeline, "encode_prompt", "text encoding")
    clock.wrap(Pipeline, "__call__", "pipeline")
    for encodes_inside in (False, True):
        clock.reset()
        pipeline, started = Pipeline(), now[0]
        if not encodes_inside:
            pipeline.encode_prompt()
        pipeline(encode=encodes_inside)
        phases = clock.phases(now[0] - started)
        assert (phases["text encoding"], phases["denoising"], phases["rest"]) == (3.0, 5.0, 0.0), encodes_inside
