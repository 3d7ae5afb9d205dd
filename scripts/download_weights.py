"""Fetch every weight the predictor loads into WEIGHTS_DIR, verified and recorded in manifest.json.

FLUX.1-dev is gated: accept its license on huggingface.co and set HF_TOKEN. The Lassie LoRA comes
from LASSIE_LORA_URL (the Replicate training output tar, a .safetensors URL, or a local path to
either); LASSIE_TRIGGER_WORD, if set, is written beside it. HF_ENDPOINT selects another hub.
Safe to run again: finished files are kept, so a second run fetches nothing and an interrupted
one resumes.

Usage: python scripts/download_weights.py [WEIGHTS_DIR] [--verify]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lassie.provision import ProvisionError, provision  # noqa: E402
from lassie.weights import MissingWeightsError, default_weights_dir  # noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("lassie").setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights_dir", type=Path, nargs="?", default=default_weights_dir(),
                        help="default: $LASSIE_WEIGHTS_DIR or ./weights")
    parser.add_argument("--verify", action="store_true",
                        help="rehash files the manifest already vouches for (slow on real weights)")
    args = parser.parse_args()
    try:
        report = provision(args.weights_dir, verify=args.verify)
    except (ProvisionError, MissingWeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.weights_dir}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
