"""What the accelerator is. `query_device` alone asks torch about the real machine; everything that decides from a
`DeviceInfo` (go_fast, compile, the memory plan) is pure, so every hardware case is unit-tested on CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    """`kind` is cuda, rocm or cpu; `total_memory` is in bytes (0 on CPU)."""

    kind: str
    name: str = "CPU"
    capability: tuple[int, int] | None = None
    total_memory: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("cuda", "rocm")

    @property
    def torch_device(self) -> torch.device:
        """ROCm GPUs are `cuda` devices to torch."""
        return torch.device("cuda" if self.is_gpu else "cpu")

    @property
    def dtype(self) -> torch.dtype:
        """bf16 on a GPU, float32 on CPU (bf16 matmuls on CPU are slow and less exact)."""
        return torch.bfloat16 if self.is_gpu else torch.float32

    def describe(self) -> str:
        if self.capability is None:
            return self.name
        return f"{self.name}, compute capability {self.capability[0]}.{self.capability[1]}"


def query_device() -> DeviceInfo:
    if not torch.cuda.is_available():
        return DeviceInfo(kind="cpu")
    index = torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return DeviceInfo(kind="rocm" if torch.version.hip else "cuda", name=properties.name,
                      capability=torch.cuda.get_device_capability(index), total_memory=properties.total_memory)
