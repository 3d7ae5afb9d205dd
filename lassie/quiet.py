"""Messages our dependencies print at import and setup that are known to be harmless here, silenced one by one: a
warning in the log should mean something. Each entry names the message's source (its logger, or its warning category
and module), its whole text and why it is harmless; everything else still shows. predict.py calls
`silence_known_noise()` first, before torch and the libraries are imported (most of these are printed then)."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

TORCH_LOAD_FAILURE = r"Could not load this library: \S+"  # torch.ops.load_library's message

KNOWN_LOG_LINES: dict[str, tuple[str, ...]] = {
    "torchao": (
        # torchao's wheel ships its MX-format (Blackwell) kernels built for Python 3.10; go_fast's float8 skips them
        rf"Failed to load \S+/torchao/_C_mxfp8\.cpython-310-\S+\.so: {TORCH_LOAD_FAILURE}",
        # sm90a CUTLASS kernels, which need a CUDA build of torch; go_fast's float8 matmuls are torch's own
        rf"Failed to load \S+/torchao/_C_cutlass_90a\.abi3\.so: {TORCH_LOAD_FAILURE}",
    ),
    # Only torchao's int8 Triton kernels need it; CUDA builds of torch bring triton with them.
    "torchao.kernel.intmm": (
        re.escape("Warning: Detected no triton, on systems without Triton certain kernels will not work"),
    ),
    # torchao registers two of its enums the old way: a deprecation for torchao, not for us.
    "torch.utils._pytree": (
        r"<enum '(KernelPreference|ScaleCalculationMode)'> "
        + re.escape("is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
                    "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future "
                    "release."),
    ),
    # Only torchao-pickled checkpoints need those classes; lassie loads safetensors only.
    "diffusers.quantizers.torchao.torchao_quantizer": (
        re.escape("Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with "
                  "`torchao`"),
    ),
    # diffusers' FLUX pipelines name these processors (and Falconsai's NSFW classifier, a ViT, the last); the PIL ones
    # are what transformers 4 used, and torchvision is not a dependency.
    "transformers.utils.import_utils": (
        r"`(CLIP|Siglip|ViT)ImageProcessor` requires torchvision \(not installed\); falling back to "
        r"`\1ImageProcessorPil` for backward compatibility\. Install torchvision to use the default "
        r"backend, or import `\1ImageProcessorPil` directly to silence this warning\.",
    ),
}
"""Logger -> its known messages, whole (regular expressions)."""

KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # predict.py keeps BasePredictor.predict for older cog CLIs; coglet says so once itself.
    (DeprecationWarning, re.escape("Predictor.predict() is deprecated; use run() instead"), ""),
    (DeprecationWarning, re.escape("BasePredictor is deprecated; use BaseRunner instead"), ""),
    # LoRAs on the fp8 transformers are never merged: every LoRA stays an unmerged adapter.
    (UserWarning, re.escape("TorchaoLoraLinear was instantiated without `get_apply_tensor_subclass`. Forward and "
                            "training will work, but `merge()` / `unmerge()` will raise an error."),
     r"peft\.tuners\.lora\.torchao\Z"),
    # Every extra LoRA is an adapter beside Lassie's, by design (lassie.engine.adapters).
    (UserWarning, re.escape("Already found a `peft_config` attribute in the model. This will lead to having "
                            "multiple adapters in the model."), r"peft\.tuners\.tuners_utils\Z"),
    # LoraAdapters sets each transformer's active adapters itself before its next run, so PEFT's stand-in choice after
    # a replaced extra LoRA is never used.
    (UserWarning, r"Adapter \S+ was active which is now deleted\. Setting active adapter to ",
     r"peft\.tuners\.tuners_utils\Z"),
)
"""(category, the text it starts with, the module it is attributed to: a regex, "" for any)."""


class KnownLinesFilter(logging.Filter):
    """Drops the records of one logger whose message matches one of the patterns from its start."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(text) for text in texts]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self.patterns)


@contextmanager
def dropping(openings: dict[str, tuple[str, ...]]) -> Iterator[None]:
    """While the block runs, each logger's records that start with one of its texts are dropped: for library warnings
    right in general that a call of ours answers with a line of its own (prompt truncation), scoped to that call."""
    filters = {name: KnownLinesFilter([re.escape(text) for text in texts]) for name, texts in openings.items()}
    for name, known in filters.items():
        logging.getLogger(name).addFilter(known)
    try:
        yield
    finally:
        for name, known in filters.items():
            logging.getLogger(name).removeFilter(known)


def silence_known_noise() -> None:
    """Installs the filters; calling it again changes nothing."""
    for name, texts in KNOWN_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, KnownLinesFilter) for existing in logger.filters):
            logger.addFilter(KnownLinesFilter([text + r"\Z" for text in texts]))
    for category, text, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=text, category=category, module=module)


def no_progress_bars() -> None:
    """Turns off diffusers' and transformers' loading bars through their public switches: in Cog's logs (and
    `/health-check`) a bar is a stream of carriage returns; setup logs load times, downloads log via `ProgressLog`."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
