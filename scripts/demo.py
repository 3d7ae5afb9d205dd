"""The main job, end to end: serve predictions through the real Cog HTTP server and show one.

Uses ./weights (or LASSIE_WEIGHTS_DIR) when it holds complete real weights; otherwise builds
tiny random weights into .tiny-weights/ so the whole path runs anywhere, offline, on a CPU.
"""

from __future__ import annotations

import project_python  # noqa: F401  (first: under a Python without the project's packages, one line naming .venv/bin/python)

# isort: split
import base64
import io
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lassie.settings import Settings  # noqa: E402
from lassie.weights.layout import TINY_WEIGHTS_DIR, WeightsLayout  # noqa: E402

log = logging.getLogger("demo")
TINY_DIR = REPO / TINY_WEIGHTS_DIR
OUT = REPO / "out"


def weights_to_serve() -> Path:
    real = Settings.from_env().weights_dir
    if not WeightsLayout(real).missing():
        log.info("serving the real weights in %s", real)
        return real
    if WeightsLayout(TINY_DIR).missing():
        log.info("no complete weights in %s; building tiny random weights in %s", real, TINY_DIR)
        from make_tiny_weights import build

        build(TINY_DIR)
    log.info("serving tiny random weights from %s (images are noise by design)", TINY_DIR)
    return TINY_DIR


def save_data_uri(uri: str, path: Path) -> Path:
    _, payload = uri.split(",", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(payload))
    return path


def main() -> None:
    from PIL import Image

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    weights = weights_to_serve()
    trigger = WeightsLayout(weights).trigger_word()
    inputs = {"prompt": f"a photo of {trigger} the dog on a beach", "seed": 42, "num_inference_steps": 4,
              "megapixels": "0.25", "output_format": "png"}
    from cog_server import CogServer  # scripts/ is on sys.path when this script runs

    OUT.mkdir(exist_ok=True)
    server = CogServer(weights, log_path=OUT / "demo-server.log")
    log.info("starting the Cog HTTP server on %s (its log: %s)", server.url, server.log_path.relative_to(REPO))
    with server:
        status, response = server.predict(inputs)
    if status != 200 or response.get("status") != "succeeded":
        raise SystemExit(f"prediction failed ({status}): {response.get('error') or response}; "
                         f"the server's log is {server.log_path}")
    path = save_data_uri(response["output"][0], OUT / "demo-0.png")
    image = Image.open(io.BytesIO(path.read_bytes()))
    log.info("POST /predictions %s -> %s", inputs, response["status"])
    log.info("image: %s (%s, %dx%d, predicted in %.2fs)", path, image.format, *image.size,
             response.get("metrics", {}).get("predict_time", 0.0))
    log.info("server log: %s", server.log_path)
    log.info("to keep a server running on these weights: README.md, 'Serve it yourself', with LASSIE_WEIGHTS_DIR=%s",
             weights)


if __name__ == "__main__":
    main()
