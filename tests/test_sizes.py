import json
from pathlib import Path

import pytest

from lassie.request import sizes
from lassie.request.errors import InputError

SHARED_SIZES = Path(__file__).resolve().parents[2] / "shared" / "spec" / "sizes.json"


def test_packaged_table_matches_the_spec():
    if not SHARED_SIZES.is_file():
        pytest.skip("../shared/spec is not beside this checkout")
    spec = json.loads(SHARED_SIZES.read_text())
    assert {mp: {r: list(s) for r, s in table.items()} for mp, table in sizes.size_table().items()} == {
        mp: spec[mp] for mp in sizes.MEGAPIXELS
    }


@pytest.mark.parametrize(("ratio", "megapixels", "expected"), [
    ("1:1", "1", (1024, 1024)), ("16:9", "1", (1344, 768)), ("9:21", "1", (640, 1536)),
    ("1:1", "0.25", (512, 512)), ("21:9", "0.25", (768, 320)), ("4:5", "0.25", (448, 544)),
])
def test_table_sizes(ratio, megapixels, expected):
    assert sizes.table_size(ratio, megapixels) == expected


def test_quarter_megapixel_halves_each_side():
    for ratio, (w, h) in sizes.size_table()["1"].items():
        assert sizes.table_size(ratio, "0.25") == (w // 2, h // 2)


@pytest.mark.parametrize(("width", "height", "expected"), [
    (256, 1440, (256, 1440)), (1000, 700, (1008, 704)), (263, 264, (256, 272)), (1439, 1430, (1440, 1424)),
])
def test_custom_sizes_round_to_nearest_multiple_of_16(width, height, expected):
    assert sizes.custom_size(width, height) == expected


@pytest.mark.parametrize(("width", "height", "field"), [(None, 512, "width"), (512, None, "height"),
                                                        (100, 512, "width"), (512, 2000, "height")])
def test_custom_size_errors_name_the_field(width, height, field):
    with pytest.raises(InputError) as error:
        sizes.custom_size(width, height)
    assert error.value.field == field
    assert str(error.value).startswith(field)


@pytest.mark.parametrize(("size", "expected"), [
    ((1024, 768), (1024, 768)), ((2880, 1440), (1440, 720)), ((1000, 3000), (480, 1440)), ((1000, 3001), (480, 1440)),
    ((333, 500), (336, 496)), ((4000, 4000), (1440, 1440)),
])
def test_sizes_from_images_fit_1440_keep_aspect_and_round(size, expected):
    assert sizes.size_from_image(*size) == expected


def test_unknown_ratio_lists_what_is_allowed():
    with pytest.raises(InputError, match="aspect_ratio: must be one of 1:1, 16:9"):
        sizes.table_size("7:3", "1")


@pytest.mark.parametrize(("size", "expected"), [
    ((1, 1), (256, 256)), ((64, 32), (512, 256)), ((256, 46), (1424, 256)), ((1440, 256), (1440, 256)),
    ((4500, 800), (1440, 256)), ((100, 300), (256, 768)),
])
def test_sizes_from_images_scale_small_images_up_to_256(size, expected):
    assert sizes.size_from_image(*size) == expected


@pytest.mark.parametrize("size", [(10000, 100), (100, 563), (1441, 256)])
def test_images_more_elongated_than_1440x256_are_refused(size):
    with pytest.raises(InputError, match=r"^image: .* an input image may be at most 5\.625:1 \(1440x256\)"):
        sizes.size_from_image(*size)


@pytest.mark.parametrize(("mask", "image", "fits"), [
    ((160, 90), (1600, 900), True), ((10, 6), (100, 50), True), ((1008, 752), (1000, 750), True),
    ((100, 300), (256, 192), False), ((600, 600), (600, 400), False), ((90, 160), (1600, 900), False),
])
def test_a_mask_must_have_the_images_aspect_ratio_within_rounding(mask, image, fits):
    if fits:
        sizes.check_mask_size(mask, image)
    else:
        with pytest.raises(InputError, match=f"^mask: is {mask[0]}x{mask[1]} but the image is"):
            sizes.check_mask_size(mask, image)
