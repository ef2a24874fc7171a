"""Agreement with MONAI's metrics, an independent implementation (a test dependency)."""

import warnings

import numpy as np
import pytest
import torch

from napari_segtool.metrics import evaluate, surface_metrics

monai_metrics = pytest.importorskip("monai.metrics")


def onehot(mask):
    return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))


def monai_surface(pred, ref, spacing):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r = onehot(pred), onehot(ref)
        hd = monai_metrics.compute_hausdorff_distance(p, r, spacing=spacing).item()
        hd95 = monai_metrics.compute_hausdorff_distance(
            p, r, percentile=95, spacing=spacing
        ).item()
        assd = monai_metrics.compute_average_surface_distance(
            p, r, symmetric=True, spacing=spacing
        ).item()
    return {"hd": hd, "hd95": hd95, "assd": assd}


def test_concentric_spheres():
    z, y, x = np.ogrid[:99, :99, :99]
    r = np.sqrt((z - 49) ** 2 + (y - 49) ** 2 + (x - 49) ** 2)
    m = surface_metrics(r <= 20, r <= 40)
    # MONAI 1.6 gives HD 20.2237, HD95 20.1246, ASSD 19.7251
    assert m["hd"] == pytest.approx(20.2237, abs=1e-4)
    assert m["hd95"] == pytest.approx(20.1246, abs=1e-4)
    assert m["assd"] == pytest.approx(19.7251, abs=1e-4)
    theirs = monai_surface(r <= 20, r <= 40, None)
    for key in ("hd", "hd95", "assd"):
        assert m[key] == pytest.approx(theirs[key], rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((40, 37), (0.5, 1.7)), ((12, 30, 25), (3.0, 0.8, 1.1)), ((9, 20, 21), (1.0, 1.0, 1.0))],
)
def test_random_masks_with_anisotropic_spacing(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    # smooth random blobs, so surfaces are object-like rather than salt and pepper
    pred = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    ref = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    if not pred.any() or not ref.any():
        pred[(0,) * len(shape)] = ref[(-1,) * len(shape)] = True
    ours = surface_metrics(pred, ref, spacing=spacing)
    theirs = monai_surface(pred, ref, spacing)
    for key in ("hd", "assd"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6)
    # MONAI takes the 95th percentile with torch.quantile in float32, which moves the
    # interpolation point by ~1e-5; on MONAI's own directed distances, in float64, the
    # percentile agrees to 1e-6.
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, dists, _ = get_edge_surface_distance(
            torch.from_numpy(pred), torch.from_numpy(ref), spacing=spacing, symmetric=True
        )
    exact95 = max(np.percentile(d.numpy().astype(np.float64), 95) for d in dists)
    assert ours["hd95"] == pytest.approx(exact95, rel=1e-6)
    assert ours["hd95"] == pytest.approx(theirs["hd95"], rel=2e-5)


@pytest.mark.parametrize("seed", range(3))
def test_overlap_metrics_match_monai(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((16, 20, 18)) < 0.4
    ref = rng.random((16, 20, 18)) < 0.35
    ours = evaluate(pred.astype(np.uint8), ref.astype(np.uint8), distances=False)
    p, r = onehot(pred), onehot(ref)
    dice = monai_metrics.DiceMetric(include_background=False)(p, r).item()
    iou = monai_metrics.MeanIoU(include_background=False)(p, r).item()
    cm = monai_metrics.get_confusion_matrix(p, r, include_background=False)
    names = ("precision", "recall", "specificity", "accuracy")
    precision, recall, specificity, _ = (
        monai_metrics.compute_confusion_matrix_metric(n, cm).item() for n in names
    )
    assert ours["dice"] == pytest.approx(dice, rel=1e-6)
    assert ours["iou"] == pytest.approx(iou, rel=1e-6)
    assert ours["precision"] == pytest.approx(precision, rel=1e-6)
    assert ours["recall"] == pytest.approx(recall, rel=1e-6)
    assert ours["specificity"] == pytest.approx(specificity, rel=1e-6)


def test_one_empty_mask_gives_infinite_distances_like_monai():
    a = np.zeros((10, 10), bool)
    b = a.copy()
    b[3:6, 3:6] = True
    assert surface_metrics(a, b)["hd"] == float("inf")
    assert surface_metrics(b, a)["hd95"] == float("inf")
    assert np.isinf(monai_surface(b, a, None)["hd"])
