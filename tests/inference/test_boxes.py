"""Boxes segmented on their own, with the whole image's tile grid, equal whole-image inference."""

import numpy as np
import pytest

from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.boxes import (
    BoxSegmenter,
    block_boxes,
    box_read_region,
    default_block_shape,
)
from napari_segtool.inference.predict import segment
from tests.inference.test_blocks import balanced, tiny

zarr = pytest.importorskip("zarr")


def pieced(image, model, cfg, block, value_range, **want):
    """Every box of a grid of ``block`` segmented alone, written into whole arrays."""
    seg = BoxSegmenter(model, cfg, **want)
    labels = np.zeros(image.shape, seg.labels_dtype())
    unc = np.full(image.shape, np.nan, np.float32) if want.get("uncertainty") else None
    counts = np.zeros(model.config.out_channels, np.int64)
    for box in block_boxes(image.shape, block):
        out = seg.segment(image, box, value_range=value_range)
        labels[box] = out.labels
        counts += out.counts
        if unc is not None:
            unc[box] = out.uncertainty
    return labels, unc, counts


CASES = [
    # (dims, tile, image shape, block)
    (2, (16, 16), (5, 37, 29), (2, 37, 29)),  # whole planes: no halo
    (2, (16, 16), (3, 37, 29), (1, 10, 7)),  # bands smaller than a tile
    (2, (16, 16), (37, 29), (13, 11)),  # one plane
    (3, (8, 16, 16), (21, 33, 27), (5, 33, 27)),  # slabs, not a multiple of the stride
    (3, (8, 16, 16), (13, 20, 19), (4, 7, 9)),  # small boxes on all three axes
]


@pytest.mark.parametrize(("dims", "tile", "shape", "block"), CASES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_pieced_boxes_equal_whole_image_inference(dims, tile, shape, block, batch_size):
    rng = np.random.default_rng(3)
    image = rng.normal(size=shape).astype(np.float32)
    cfg = InferenceConfig(
        batch_size=batch_size, device="cpu", precision="fp32", compile="off", tta=True
    )
    model = balanced(tiny(dims, tile), image, cfg)
    value_range = (np.array([image.min()]), np.array([image.max()]))
    whole = segment(image, model, config=cfg, value_range=value_range)
    labels, unc, counts = pieced(image, model, cfg, block, value_range, uncertainty=True)
    assert 0.05 < whole.labels.mean() < 0.95  # both classes present: the test can fail
    if batch_size == 1:  # every tile predicted alone either way: bit for bit
        np.testing.assert_array_equal(labels, whole.labels)
        np.testing.assert_array_equal(unc, whole.uncertainty)
    else:  # other batch companions change a tile's last float bits at most
        assert (labels != whole.labels).mean() <= 1e-4
        np.testing.assert_allclose(unc, whole.uncertainty, atol=1e-5)
    assert counts.tolist() == np.bincount(whole.labels.ravel(), minlength=2).tolist()


def test_a_box_reads_only_its_halo_from_a_zarr_store(tmp_path):
    model = tiny(3, (8, 16, 16))
    image = zarr.create_array(
        tmp_path / "i.zarr", shape=(40, 64, 64), chunks=(4, 64, 64), dtype="float32"
    )
    image[:] = np.random.default_rng(0).normal(size=image.shape).astype(np.float32)
    cfg = InferenceConfig(overlap=0.25, device="cpu", precision="fp32", compile="off")
    box = (slice(16, 24), slice(0, 64), slice(0, 64))
    read = box_read_region(image.shape, box, model, config=cfg)
    # tiles start every 6 slices along Z; those reaching into [16, 24) start at 12 and 18
    assert (read[0].start, read[0].stop) == (12, 26)
    out = BoxSegmenter(model, cfg).segment(
        image, box, value_range=(np.array([-3.0]), np.array([3.0]))
    )
    assert out.labels.shape == (8, 64, 64)


def test_default_block_shape_whole_planes_for_a_2d_model_and_chunk_multiples():
    model = tiny(2, (256, 256))
    assert default_block_shape((100, 1024, 1024), model, chunks=(1, 256, 256)) == (32, 1024, 1024)
    wide = default_block_shape((3, 20000, 20000), model, chunks=(1, 256, 256))
    assert wide[0] == 1
    assert wide[1] % 256 == 0
    assert wide[1] * wide[2] <= 1 << 25
    model3 = tiny(3, (32, 128, 128))
    z, y, x = default_block_shape((500, 512, 512), model3, chunks=(4, 256, 256))
    assert (y, x) == (512, 512)
    assert z % 4 == 0
    assert z >= 64


def test_boxes_refuse_what_is_outside_the_image():
    model = tiny(2, (16, 16))
    seg = BoxSegmenter(model, InferenceConfig(device="cpu", compile="off"))
    with pytest.raises(InputError, match="not inside"):
        seg.segment(
            np.zeros((2, 20, 20), np.float32),
            (slice(0, 3), slice(0, 20), slice(0, 20)),
            value_range=(np.array([0.0]), np.array([1.0])),
        )
    with pytest.raises(InputError, match="positive"):
        block_boxes((4, 4), (0, 4))
