"""Every operator setting, read from the environment once, at setup, in one yes/no vocabulary. A bad value fails setup
naming the variable and what it accepts, instead of surfacing in a request later, and nothing on the request path reads
the environment. Import this module before torch (predict.py does): see `_AT_START`."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

GIB = 1024**3

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")

GO_FAST_MODES = ("auto", "fp8", "fp8-weight-only", "unquantized")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
DEFAULT_COMPILE_BACKEND = "inductor"
# The hot-swap slot's rank: one slot, so extra LoRAs up to rank 128 share one set of graphs.
DEFAULT_SLOT_RANK = 128

# The variables other modules name in their messages.
GO_FAST_MODE_ENV = "LASSIE_GO_FAST_MODE"
COMPILE_ENV = "LASSIE_COMPILE"
COMPILE_BACKEND_ENV = "LASSIE_COMPILE_BACKEND"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
SLOT_RANK_ENV = "LASSIE_LORA_SLOT_RANK"
ALLOW_PRIVATE_ENV = "LASSIE_ALLOW_PRIVATE_URLS"
MAX_LORA_BYTES_ENV = "LASSIE_MAX_LORA_BYTES"
LORA_DOWNLOAD_TIMEOUT_ENV = "LASSIE_LORA_DOWNLOAD_TIMEOUT"
LORA_CACHE_ENV = "LASSIE_LORA_CACHE"
LORA_URL_ENV = "LASSIE_LORA_URL"
TRIGGER_WORD_ENV = "LASSIE_TRIGGER_WORD"
WEIGHTS_URL_ENV = "LASSIE_WEIGHTS_URL"
WEIGHTS_DOWNLOAD_TIMEOUT_ENV = "LASSIE_WEIGHTS_DOWNLOAD_TIMEOUT"
# The layout folders fetched as tars, each from its own variable or `<LASSIE_WEIGHTS_URL>/<folder>.tar`.
FOLDER_URL_ENVS = {"flux-dev": "LASSIE_FLUX_DEV_URL", "flux-schnell": "LASSIE_FLUX_SCHNELL_URL",
                   "safety": "LASSIE_SAFETY_URL"}

TOKEN_VARIABLES = ("HF_TOKEN", "CIVITAI_API_TOKEN", "REPLICATE_API_TOKEN")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Importing torch's dynamo code calls inductor's `cache_dir()`, which writes its /tmp default into
# TORCHINDUCTOR_CACHE_DIR: only the value the process started with is the operator's.
_AT_START = {name: os.environ.get(name) for name in (INDUCTOR_CACHE_ENV,)}


class SettingError(ValueError):
    """An operator setting has a value lassie cannot use; the message names the variable."""

    def __init__(self, variable: str, accepted: str, value: str) -> None:
        super().__init__(f"{variable} must be {accepted}, got {value!r}")
        self.variable = variable


class Environment:
    """Reads of one environment mapping, each validated into the type its setting needs."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str, default: str = "") -> str:
        return (self._environ.get(name) or "").strip() or default

    def choice(self, name: str, choices: tuple[str, ...], default: str = "") -> str:
        """Lower-cased; "" when unset without a default."""
        value = self.text(name, default).lower()
        if value and value not in choices:
            raise SettingError(name, f"one of {', '.join(choices)}", value)
        return value

    def count(self, name: str, default: int, minimum: int = 0, what: str = "a number of bytes") -> int:
        value = self.text(name, str(default))
        if not value.isdigit() or int(value) < minimum:
            raise SettingError(name, f"{what} of at least {minimum}", value)
        return int(value)

    def rank(self, name: str) -> int | None:
        """None when unset; 0 (off) or a positive rank."""
        value = self.text(name)
        if value and not value.isdigit():
            raise SettingError(name, "0 (no slot) or a rank such as 128", value)
        return int(value) if value else None

    def url(self, name: str, default: str = "") -> str:
        """An operator's http(s) address (any host: mirrors may be private), "" when unset without a default."""
        value = self.text(name, default)
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise SettingError(name, f"an http(s) address such as {default}" if default else "an http(s) URL", value)
        return value

    def path(self, name: str) -> Path | None:
        return Path(value) if (value := self.text(name)) else None

    def networks(self, name: str) -> tuple[bool, tuple[IPNetwork, ...]]:
        """(every address allowed, the networks allowed): a switch, or a comma-separated list."""
        value = self.text(name)
        if not value or value.lower() in ON + OFF:
            return value.lower() in ON, ()
        try:
            return False, tuple(ipaddress.ip_network(item.strip(), strict=False) for item in value.split(","))
        except ValueError:
            raise SettingError(name, "1 or a comma-separated list of addresses/networks", value) from None


@dataclass(frozen=True)
class CompileSettings:
    """`LASSIE_COMPILE`: unset compiles on CUDA only, on/a mode name on any device, off never."""

    requested: bool | None = None  # None: the hardware decides
    mode: str = "default"
    backend: str = DEFAULT_COMPILE_BACKEND
    cache_dir: Path | None = None  # TORCHINDUCTOR_CACHE_DIR, else LASSIE_COMPILE_CACHE, else beside the weights
    cache_variable: str = ""  # the variable that chose `cache_dir`, named when it cannot be used

    @classmethod
    def read(cls, env: Environment) -> CompileSettings:
        value = env.choice(COMPILE_ENV, ON + OFF + COMPILE_MODES)
        cache_variable = next((name for name in (INDUCTOR_CACHE_ENV, "LASSIE_COMPILE_CACHE") if env.path(name)), "")
        return cls(requested=value not in OFF if value else None, mode=value if value in COMPILE_MODES else "default",
                   backend=env.text(COMPILE_BACKEND_ENV, DEFAULT_COMPILE_BACKEND),
                   cache_dir=env.path(cache_variable) if cache_variable else None, cache_variable=cache_variable)


@dataclass(frozen=True)
class LoraSettings:
    """What fetching and caching extra LoRAs needs: where each service is, tokens, bounds."""

    cache_dir: Path | None = None  # None: beside the weights
    cache_bytes: int = 20 * GIB
    min_free_bytes: int = 5 * GIB
    max_download_bytes: int = 2 * GIB
    download_timeout: int = 300  # seconds for one whole fetch, however slowly its bytes trickle in
    allow_all_addresses: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()
    replicate_url: str = "https://replicate.com"
    civitai_url: str = "https://civitai.com"
    hf_endpoint: str = "https://huggingface.co"  # also where setup fetches the weights from
    tokens: Mapping[str, str] = field(default_factory=dict, repr=False)  # variable name -> token

    @classmethod
    def read(cls, env: Environment) -> LoraSettings:
        allow_all, networks = env.networks(ALLOW_PRIVATE_ENV)
        return cls(cache_dir=env.path(LORA_CACHE_ENV), cache_bytes=env.count("LASSIE_LORA_CACHE_BYTES", cls.cache_bytes),
                   min_free_bytes=env.count("LASSIE_LORA_CACHE_MIN_FREE_BYTES", cls.min_free_bytes),
                   max_download_bytes=env.count(MAX_LORA_BYTES_ENV, cls.max_download_bytes, minimum=1),
                   download_timeout=env.count(LORA_DOWNLOAD_TIMEOUT_ENV, cls.download_timeout, minimum=1,
                                              what="a number of seconds"),
                   allow_all_addresses=allow_all, allowed_networks=networks,
                   replicate_url=env.url("LASSIE_REPLICATE_URL", cls.replicate_url).rstrip("/"),
                   civitai_url=env.url("LASSIE_CIVITAI_URL", cls.civitai_url).rstrip("/"),
                   hf_endpoint=env.url("HF_ENDPOINT", cls.hf_endpoint).rstrip("/"),
                   tokens={name: env.text(name) for name in TOKEN_VARIABLES if env.text(name)})


@dataclass(frozen=True)
class ProvisionSettings:
    """Where missing weights come from when setup fetches them."""

    lora_url: str | None = None  # LASSIE_LORA_URL: the trained Lassie LoRA (an operator-trusted address)
    trigger_word: str | None = None  # LASSIE_TRIGGER_WORD
    offline: bool = False  # HF_HUB_OFFLINE: never fetch, only check
    weights_url: str | None = None  # LASSIE_WEIGHTS_URL: <base>/<folder>.tar for each missing folder
    folder_urls: Mapping[str, str] = field(default_factory=dict)  # folder -> its own tar URL (FOLDER_URL_ENVS)
    cog_weights: str | None = None  # COG_WEIGHTS, as cog hands it to setup(weights): the Lassie LoRA
    # seconds one folder's tar may take, however slowly it trickles in: 3 h lets the largest folder (about 24 GB) arrive
    # at 2.2 MB/s (24e9 B / 10 800 s), a modest link
    weights_download_timeout: int = 3 * 3600

    @classmethod
    def read(cls, env: Environment, cog_weights: object) -> ProvisionSettings:
        return cls(lora_url=env.text(LORA_URL_ENV) or None, trigger_word=env.text(TRIGGER_WORD_ENV) or None,
                   offline=env.choice("HF_HUB_OFFLINE", ON + OFF) in ON,
                   weights_url=env.url(WEIGHTS_URL_ENV).rstrip("/") or None,
                   folder_urls={folder: url for folder, name in FOLDER_URL_ENVS.items() if (url := env.url(name))},
                   cog_weights=cog_weights_value(cog_weights),
                   weights_download_timeout=env.count(WEIGHTS_DOWNLOAD_TIMEOUT_ENV, cls.weights_download_timeout,
                                                      minimum=1, what="a number of seconds"))

    @property
    def lassie_origin(self) -> str | None:
        """Where the Lassie LoRA comes from when not from weights/lassie/: COG_WEIGHTS, then LASSIE_LORA_URL."""
        return self.cog_weights or self.lora_url

    def tar_url(self, folder: str) -> str | None:
        """The tar a missing layout folder is fetched from: its own variable, else the base's `<folder>.tar`."""
        return self.folder_urls.get(folder) or (f"{self.weights_url}/{folder}.tar" if self.weights_url else None)

    @property
    def fetches_tars(self) -> bool:
        return bool(self.weights_url or self.folder_urls)


@dataclass(frozen=True)
class Settings:
    weights_dir: Path = Path("weights")
    go_fast_mode: str = "auto"  # one of GO_FAST_MODES; auto lets the hardware decide
    compile: CompileSettings = CompileSettings()
    slot_rank: int | None = None  # LASSIE_LORA_SLOT_RANK: None lets compiling decide, 0 is no slot
    lora: LoraSettings = LoraSettings()
    provision: ProvisionSettings = ProvisionSettings()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, cog_weights: object = None) -> Settings:
        """`environ` None: the process's, `_AT_START`'s variables as they began; `cog_weights`: setup(weights)'s."""
        if environ is None:
            environ = {name: value for name, value in (os.environ | _AT_START).items() if value is not None}
        env = Environment(environ)
        return cls(weights_dir=env.path("LASSIE_WEIGHTS_DIR") or Path("weights"),
                   go_fast_mode=env.choice(GO_FAST_MODE_ENV, GO_FAST_MODES, "auto"), compile=CompileSettings.read(env),
                   slot_rank=env.rank(SLOT_RANK_ENV), lora=LoraSettings.read(env),
                   provision=ProvisionSettings.read(env, cog_weights))


def cog_weights_value(weights: object) -> str | None:
    """The LoRA's address in COG_WEIGHTS; "" and `weights` (cog <= 0.16's when ./weights existed) are none."""
    value = str(weights or "").strip()
    return None if value in ("", "weights") else value
