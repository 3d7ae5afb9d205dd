"""Messages our dependencies print at import and setup that are known to be harmless here, silenced one by one.

A warning in the log should mean something. Each entry names where the message comes from (its
logger, or its warning category and module) and its whole text, and says why it is harmless;
anything else those libraries say, and every other warning, still shows. `silence_known_noise()`
runs before torch, torchao, diffusers and transformers are imported (most of these are printed
then), once per process: predict.py calls it first. `dropping` does the same for one call, and
`no_progress_bars` turns off the libraries' loading bars when setup starts.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownLogLine:
    """A record of `logger` whose whole message matches `text` (a regular expression)."""

    logger: str
    text: str
    why: str


@dataclass(frozen=True)
class KnownWarning:
    """A `warnings.warn` of `category`, attributed to `module` (a regex; "" for any), whose text starts so."""

    category: type[Warning]
    text: str
    why: str
    module: str = ""


TORCH_LOAD_FAILURE = r"Could not load this library: \S+"  # torch.ops.load_library's message

KNOWN_LOG_LINES = (
    KnownLogLine("torchao", rf"Failed to load \S+/torchao/_C_mxfp8\.cpython-310-\S+\.so: {TORCH_LOAD_FAILURE}",
                 "torchao's wheel ships its MX-format (Blackwell) kernels built for Python 3.10; "
                 "go_fast's float8 does not use them"),
    KnownLogLine("torchao", rf"Failed to load \S+/torchao/_C_cutlass_90a\.abi3\.so: {TORCH_LOAD_FAILURE}",
                 "sm90a CUTLASS kernels, which need a CUDA build of torch; go_fast's float8 matmuls are torch's own"),
    KnownLogLine("torchao.kernel.intmm",
                 re.escape("Warning: Detected no triton, on systems without Triton certain kernels will not work"),
                 "only torchao's int8 Triton kernels need it; CUDA builds of torch bring triton with them"),
    KnownLogLine("torch.utils._pytree",
                 r"<enum '(KernelPreference|ScaleCalculationMode)'> "
                 + re.escape("is an Enum subclass and is now natively supported by torch.compile as an opaque "
                             "value type. Calling register_constant() on Enum subclasses is deprecated and will "
                             "be an error in a future release."),
                 "torchao registers two of its enums the old way: a deprecation for torchao, not for us"),
    KnownLogLine("diffusers.quantizers.torchao.torchao_quantizer",
                 re.escape("Unable to import `torchao` Tensor objects. This may affect loading checkpoints "
                           "serialized with `torchao`"),
                 "only torchao-pickled checkpoints need those classes; lassie loads safetensors only"),
    KnownLogLine("transformers.utils.import_utils",
                 r"`(CLIP|Siglip|ViT)ImageProcessor` requires torchvision \(not installed\); falling back to "
                 r"`\1ImageProcessorPil` for backward compatibility\. Install torchvision to use the default "
                 r"backend, or import `\1ImageProcessorPil` directly to silence this warning\.",
                 "diffusers' FLUX pipelines name these processors (and Falconsai's NSFW classifier, a ViT, the "
                 "last); the PIL ones are what transformers 4 used, and torchvision is not a dependency"),
)

KNOWN_WARNINGS = (
    KnownWarning(DeprecationWarning, re.escape("Predictor.predict() is deprecated; use run() instead"),
                 "predict.py keeps BasePredictor.predict for older cog CLIs; coglet says so once itself"),
    KnownWarning(DeprecationWarning, re.escape("BasePredictor is deprecated; use BaseRunner instead"),
                 "as above"),
    KnownWarning(UserWarning,
                 re.escape("TorchaoLoraLinear was instantiated without `get_apply_tensor_subclass`. Forward and "
                           "training will work, but `merge()` / `unmerge()` will raise an error."),
                 "LoRAs on the fp8 transformers are never merged: every LoRA stays an unmerged adapter",
                 module=r"peft\.tuners\.lora\.torchao\Z"),
    KnownWarning(UserWarning,
                 re.escape("Already found a `peft_config` attribute in the model. This will lead to having "
                           "multiple adapters in the model."),
                 "every extra LoRA is an adapter beside Lassie's, by design (lassie.engine.adapters)",
                 module=r"peft\.tuners\.tuners_utils\Z"),
    KnownWarning(UserWarning, r"Adapter \S+ was active which is now deleted\. Setting active adapter to ",
                 "LoraAdapters sets each transformer's active adapters itself before its next run, so "
                 "PEFT's stand-in choice after a replaced extra LoRA is never used",
                 module=r"peft\.tuners\.tuners_utils\Z"),
)


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
    """While the block runs, each logger's records that start with one of its texts are dropped.

    For library warnings that are right in general but that a call of ours answers with a line of
    its own (prompt truncation: lassie logs how many tokens were kept); scoped to that call.
    """
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
    for name in dict.fromkeys(line.logger for line in KNOWN_LOG_LINES):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, KnownLinesFilter) for existing in logger.filters):
            logger.addFilter(KnownLinesFilter([line.text + r"\Z" for line in KNOWN_LOG_LINES if line.logger == name]))
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=known.text, category=known.category, module=known.module)


def no_progress_bars() -> None:
    """Turns off the loading bars of diffusers and transformers through their public switches: in
    Cog's logs (and `/health-check`, which repeats the setup log) a bar is a stream of carriage
    returns, not a line; setup logs how long each load took instead. huggingface_hub's downloads
    report through `ProgressLog` (lassie.fetch.http), which writes log lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
