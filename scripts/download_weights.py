"""Fetch every weight the predictor loads into WEIGHTS_DIR: from the hub verified and recorded in manifest.json.

FLUX.1-dev is gated: accept its license on huggingface.co and set HF_TOKEN; or, with no token, set
LASSIE_WEIGHTS_URL (and/or a folder's own URL) to fetch each missing folder as a tar. A folder from a
tar is checked complete against the layout before it is renamed into place, and is not recorded in
manifest.json (a tar lists no hashes to record), so `--verify`, which rehashes what the manifest
vouches for, does not apply to it. The Lassie LoRA comes
from LASSIE_LORA_URL (the Replicate training output tar, a .safetensors URL, or a local path to
either); LASSIE_TRIGGER_WORD, if set, is written beside it. HF_ENDPOINT selects another hub.
Everything is checked (the LoRA's origin, the token, a writable directory, free space) before
the first byte is fetched. Safe to run again: finished files are kept, so a second run fetches
nothing and an interrupted one resumes.

Runs in the project's environment (huggingface_hub, httpx2, safetensors):
    bash scripts/setup.sh && .venv/bin/python scripts/download_weights.py [WEIGHTS_DIR] [--verify]
or inside the Cog image (`cog run` on CLIs before the run/exec rename):
    cog exec -e HF_TOKEN=... -e LASSIE_LORA_URL=... python scripts/download_weights.py weights
"""

from __future__ import annotations

import project_python  # noqa: F401  (first: under a Python without the project's packages, one line naming .venv/bin/python)

# isort: split
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lassie.settings import SettingError, Settings
from lassie.weights.layout import MissingWeightsError, ProvisionError
from lassie.weights.provision import provision, provision_from_tars

TARS_HAVE_NO_MANIFEST = ("note: --verify rehashes hub downloads against manifest.json; folders fetched from tars "
                         "are not in it (each was checked complete before it was renamed into place)")


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("lassie").setLevel(logging.INFO)
    try:
        settings = Settings.from_env()
    except SettingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights_dir", type=Path, nargs="?", default=settings.weights_dir,
                        help="default: $LASSIE_WEIGHTS_DIR or ./weights")
    parser.add_argument("--verify", action="store_true",
                        help="rehash files the manifest already vouches for (slow on real weights)")
    args = parser.parse_args()
    try:
        if settings.provision.fetches_tars:
            if args.verify:
                print(TARS_HAVE_NO_MANIFEST, file=sys.stderr)
            folders = provision_from_tars(args.weights_dir, settings)
            print(f"{args.weights_dir}: fetched {', '.join(folders) or 'nothing'} from tars")
            return 0
        report = provision(args.weights_dir, settings, verify=args.verify)
    except (ProvisionError, MissingWeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.weights_dir}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
