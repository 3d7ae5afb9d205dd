"""huggingface_hub's exceptions in words that say what to do next, never with a token in them: one mapping for setup
fetching the weights (`lassie.weights.provision`) and requests fetching an extra LoRA (`lassie.fetch.lora_sources`)."""

from __future__ import annotations

from collections.abc import Mapping

import httpx2
from huggingface_hub import errors

from lassie.fetch.http import redact_secrets

# What a huggingface_hub call raises when the hub, the network or the disk fails it.
HUB_ERRORS = (errors.HfHubHTTPError, errors.HFValidationError, errors.LocalEntryNotFoundError, httpx2.HTTPError,
              OSError)


def hub_problem(error: BaseException, described: str, *, revision: str | None, has_token: bool,
                tokens: Mapping[str, str]) -> str:
    """What went wrong with `described` (a repo, or a file in one), for someone who can fix it."""
    if isinstance(error, errors.GatedRepoError):
        return f"{described} is gated: accept its terms on Hugging Face and set HF_TOKEN to a token of that account"
    if isinstance(error, errors.RepositoryNotFoundError):
        access = "HF_TOKEN has no access to it" if has_token else "if it is private, set HF_TOKEN"
        return f"{described} not found ({access})"
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{described}: revision {revision!r} not found"
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return f"{described}: file not found"
    if isinstance(error, errors.HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "?"
        return f"{described}: Hugging Face answered HTTP {status}"
    if isinstance(error, errors.HFValidationError):
        return f"{described}: not a valid Hugging Face repo id or revision"
    reason = redact_secrets(f"{type(error).__name__}: {error}", tokens)[:300]
    return f"{described}: could not be downloaded ({reason})"
