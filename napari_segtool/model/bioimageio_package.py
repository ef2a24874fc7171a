"""bioimage.io model packages: write one for a model, and read back one this package wrote.

Writing (:func:`write_package`, with the optional ``bioimageio`` extra) makes a zip that follows
the bioimage.io model specification 0.5: ``rdf.yaml``; ``pytorch_state_dict`` weights (the
network's plain state dict) with the architecture's source, :mod:`napari_segtool.model.standalone`
(a file that needs only torch); ``torchscript`` weights (that network scripted); a test input
and its expected output; a cover image; a README with the training data, held-out figures and
preprocessing; authors, licence and citations. Preprocessing is declared as the model does it:
``scale_range`` over the spatial axes of each sample and channel at the model's percentiles
(linear interpolation, no clipping), and the network's logits get a ``softmax`` over channels.
``config["napari-segtool"]`` holds the model's own metadata (the same as a model file's).

Reading (:func:`read_package`) needs no bioimage.io library and never runs code from the
package: ``rdf.yaml`` is parsed with a safe YAML loader, the package must carry the
``config["napari-segtool"]`` metadata with an architecture registered here, and the network is
built from this version's own classes with the ``pytorch_state_dict`` weights, read with
``torch.load(weights_only=True)`` and checked as a model file's
(:meth:`~napari_segtool.model.checkpoint.SegmentationModel.from_metadata`). The architecture
source and the TorchScript file in the package are not opened. Zip members are read into
memory with bounded sizes, never extracted; names that would escape a folder are refused.
"""

from __future__ import annotations

import gc
import hashlib
import io
import logging
import os
import posixpath
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from napari_segtool.config import ModelConfig
from napari_segtool.errors import CheckpointError, InputError
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.model.modelfile import FORMAT, FORMAT_VERSION, weights_digest
from napari_segtool.model.unet import MAX_STATE_SIZE

__all__ = [
    "CONFIG_KEY",
    "PackageCheck",
    "check_package",
    "is_package",
    "network_source",
    "read_package",
    "write_package",
]

logger = logging.getLogger(__name__)

CONFIG_KEY = "napari-segtool"
"""The key under ``config`` in ``rdf.yaml`` that holds a napari-segtool model's metadata."""
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
"""File names the bioimage.io specification allows for a package's description."""
MAX_MEMBERS = 64
"""Most files a package may hold (ours hold 7)."""
MAX_RDF_BYTES = 1 << 20
"""Largest ``rdf.yaml`` read (ours are a few kB)."""
MAX_WEIGHTS_BYTES = 4 * MAX_STATE_SIZE + (1 << 20)
"""Largest weights file read: the largest network allowed, in float32, plus the archive's
overhead."""
SOURCE_NAME = "napari_segtool_network.py"
"""The architecture source in a package: a copy of :mod:`napari_segtool.model.standalone`."""
CALLABLES = {"unet": "UNet", "resunet": "ResUNet"}
"""The class in the architecture source for each registered architecture."""
LICENSE = "BSD-3-Clause"
AUTHORS = ("napari-segtool developers",)
UNET_CITE = (
    "Ronneberger, Fischer and Brox (2015): U-Net: convolutional networks for biomedical image "
    "segmentation. MICCAI 2015, LNCS 9351, 234-241",
    "10.1007/978-3-319-24574-4_28",
)
RESNET_CITE = (
    "He, Zhang, Ren and Sun (2016): Deep residual learning for image recognition. CVPR 2016",
    "10.1109/CVPR.2016.90",
)
ISBI_CITE = (
    "Cardona et al. (2010): An integrated micro- and macroarchitectural analysis of the "
    "Drosophila brain by computer-assisted serial section electron microscopy. "
    "PLoS Biol 8:e1000502 (the ISBI 2012 training data)",
    "10.1371/journal.pbio.1000502",
)
SCALE_RANGE_EPS = 1e-10
"""``scale_range`` divides by ``upper - lower + eps``; napari-segtool divides by
``upper - lower``, so the package asks for a negligible ``eps`` (the smallest it may is > 0)."""


@contextmanager
def torchscript_allowed() -> Iterator[None]:
    """Silence torch's deprecation notice for ``torch.jit``: bioimage.io's ``torchscript``
    weights format is TorchScript, which its consumers (bioimageio.core, deepImageJ) load."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        yield


@contextmanager
def bioimageio_calls() -> Iterator[None]:
    """Around calls into bioimageio.spec/core: TorchScript allowed, and the files they leave
    open (bioimageio.spec 0.5.12 reads package files without closing them) closed here, by a
    garbage collection, without a ResourceWarning each."""
    with torchscript_allowed(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            yield
        finally:
            gc.collect()


def network_source() -> str:
    """The text of the architecture source shipped in packages (it imports only torch)."""
    return Path(__file__).with_name("standalone.py").read_text(encoding="utf-8")


def network_kwargs(config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """The class name in the architecture source and its keyword arguments for ``config``.

    Examples
    --------
    >>> network_kwargs(ModelConfig(architecture="resunet"))[0]
    'ResUNet'
    >>> sorted(network_kwargs(ModelConfig())[1])  # doctest: +NORMALIZE_WHITESPACE
    ['base_features', 'depth', 'dropout', 'in_channels', 'norm', 'out_channels',
     'spatial_dims']
    """
    kwargs = config.to_dict()
    name = kwargs.pop("architecture")
    if name not in CALLABLES:
        raise InputError(
            f"architecture {name!r} has no bioimage.io export: known are {', '.join(CALLABLES)}"
        )
    kwargs["dropout"] = float(kwargs["dropout"])
    return CALLABLES[name], kwargs


def standalone_network(model: SegmentationModel) -> torch.nn.Module:
    """The network of :mod:`~napari_segtool.model.standalone` with ``model``'s weights, in eval
    mode, on the CPU: what a bioimage.io consumer builds from the package."""
    from napari_segtool.model import standalone

    callable_name, kwargs = network_kwargs(model.config)
    network = getattr(standalone, callable_name)(**kwargs)
    network.load_state_dict(_cpu_state(model))
    return network.eval()


def is_package(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a bioimage.io package (by its ``.zip`` suffix)."""
    return Path(path).suffix.lower() == ".zip"


# ---------------------------------------------------------------------------------- reading


def read_package(path: str | os.PathLike[str]) -> SegmentationModel:
    """Load a bioimage.io package that napari-segtool exported, from its weights alone.

    Parameters
    ----------
    path : str or PathLike
        The package (``.zip``).

    Returns
    -------
    SegmentationModel
        The model, built from this version's registered architecture with the package's
        ``pytorch_state_dict`` weights; nothing in the package is executed.

    Raises
    ------
    CheckpointError
        Naming the file and why: missing, not a zip, damaged, too many or too large members,
        a member name that escapes the package (zip-slip), no ``rdf.yaml``, not a model, no
        ``config["napari-segtool"]`` entry (a package from another tool), an architecture this
        version does not register, an edited architecture or preprocessing that no longer
        matches the model, missing or damaged weights, or weights that do not fit.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such bioimage.io package")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, expected a bioimage.io package (.zip)")
    if not zipfile.is_zipfile(p):
        raise CheckpointError(f"{p}: damaged or not a bioimage.io package (not a zip archive)")
    try:
        with zipfile.ZipFile(p) as zf:
            members = _check_members(p, zf)
            rdf = _read_rdf(p, zf, members)
            meta = _our_metadata(p, rdf)
            weights = _weights_entry(p, rdf, members)
            data = _read_member(p, zf, members[weights["source"]], MAX_WEIGHTS_BYTES)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{p}: damaged bioimage.io package ({exc})") from exc
    expected = weights.get("sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"{p}: damaged: the weights {weights['source']!r} do not match the sha256 in "
            "rdf.yaml; export the package again"
        )
    state = _load_state(p, data, weights["source"])
    model = SegmentationModel.from_metadata(p, meta, state)
    _check_consistent(p, rdf, weights, model)
    logger.info("read bioimage.io package %s (%s)", p, model.name)
    return model


def _check_members(p: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise CheckpointError(
            f"{p}: holds {len(infos)} files, more than the {MAX_MEMBERS} a napari-segtool "
            "package may hold"
        )
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if (
            name.startswith(("/", "\\"))
            or ".." in parts
            or (len(name) > 1 and name[1] == ":")
            or "\x00" in name
        ):
            raise CheckpointError(
                f"{p}: member {name!r} would be written outside the package's folder "
                "(zip-slip); refusing the package"
            )
        if not info.is_dir():
            members[name] = info
    return members


def _read_member(p: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, refusing one larger than ``limit`` (declared or actual)."""
    if info.file_size > limit:
        raise CheckpointError(
            f"{p}: member {info.filename!r} is {info.file_size:,} bytes, more than the "
            f"{limit:,} napari-segtool reads for it"
        )
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(
            f"{p}: member {info.filename!r} unpacks to more than the {limit:,} bytes "
            "napari-segtool reads for it"
        )
    return data


def _read_rdf(p: Path, zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> dict:
    import yaml

    name = next((n for n in RDF_NAMES if n in members), None)
    if name is None:
        raise CheckpointError(
            f"{p}: not a bioimage.io package (no rdf.yaml or bioimageio.yaml at its top level)"
        )
    text = _read_member(p, zf, members[name], MAX_RDF_BYTES)
    try:
        rdf = load_yaml(text.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise CheckpointError(f"{p}: damaged {name} ({first})") from exc
    if not isinstance(rdf, dict):
        raise CheckpointError(f"{p}: damaged {name} (not a mapping)")
    if rdf.get("type") != "model":
        raise CheckpointError(f"{p}: describes a bioimage.io {rdf.get('type')!r}, not a model")
    return rdf


def load_yaml(text: str) -> Any:
    r"""``text`` parsed with PyYAML's safe loader (plain values only, nothing constructed),
    reading floats as YAML 1.2 does: bioimage.io writes YAML 1.2, where ``1e-06`` is a number
    (PyYAML's YAML 1.1 rules would read it as a string).

    >>> load_yaml("a: 1e-06\nb: 2\nc: !!python/object:os.system x")
    Traceback (most recent call last):
    ...
    yaml.constructor.ConstructorError: could not determine a constructor for the tag ...
    >>> load_yaml("a: 1e-06\nb: [2, .5, x]")
    {'a': 1e-06, 'b': [2, 0.5, 'x']}
    """
    import yaml

    return yaml.load(text, Loader=_yaml12_loader())  # a SafeLoader subclass


def _yaml12_loader() -> type:
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return Loader


def _our_metadata(p: Path, rdf: dict) -> dict[str, Any]:
    config = rdf.get("config")
    ours = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    if not isinstance(ours, dict):
        raise CheckpointError(
            f"{p}: not a napari-segtool package (rdf.yaml has no config.{CONFIG_KEY}): "
            "napari-segtool loads only packages of its own architectures, from their weights, "
            "and never runs code shipped in a package; run this one with a bioimage.io "
            "consumer instead (e.g. bioimageio predict)"
        )
    version = ours.get("format_version")
    if ours.get("format") != FORMAT or not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{p}: damaged config.{CONFIG_KEY} in rdf.yaml (no format)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: model format version {version} is newer than this napari-segtool "
            f"understands ({FORMAT_VERSION}); update napari-segtool"
        )
    meta = ours.get("metadata")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: damaged config.{CONFIG_KEY} in rdf.yaml (no metadata)")
    return meta


def _weights_entry(p: Path, rdf: dict, members: dict[str, zipfile.ZipInfo]) -> dict[str, Any]:
    weights = rdf.get("weights")
    entry = weights.get("pytorch_state_dict") if isinstance(weights, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
        raise CheckpointError(
            f"{p}: no pytorch_state_dict weights in rdf.yaml; napari-segtool loads a package "
            "from those alone"
        )
    source = posixpath.normpath(entry["source"])
    if source not in members:
        raise CheckpointError(
            f"{p}: the weights file {entry['source']!r} named in rdf.yaml is missing from the "
            "package"
        )
    return {**entry, "source": source}


def _load_state(p: Path, data: bytes, name: str) -> object:
    import pickle

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "weights_only" in msg or "Unsupported global" in msg:
            raise CheckpointError(
                f"{p}: the weights {name!r} hold Python objects other than tensors; refusing "
                "them because that could run code from the package"
            ) from exc
        raise CheckpointError(f"{p}: damaged weights {name!r} ({msg[:200]})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{p}: damaged weights {name!r} ({first})") from exc


def _check_consistent(p: Path, rdf: dict, weights: dict, model: SegmentationModel) -> None:
    """Refuse a package whose description was edited away from the model it carries: other
    consumers would run something else than napari-segtool does."""
    callable_name, kwargs = network_kwargs(model.config)
    arch = weights.get("architecture")
    if not isinstance(arch, dict) or arch.get("callable") != callable_name:
        found = arch.get("callable") if isinstance(arch, dict) else arch
        raise CheckpointError(
            f"{p}: rdf.yaml's architecture {found!r} is not the {model.config.architecture} "
            f"({callable_name}) its config.{CONFIG_KEY} describes; the package was edited"
        )
    if arch.get("kwargs") != kwargs:
        raise CheckpointError(
            f"{p}: rdf.yaml's architecture kwargs {arch.get('kwargs')} differ from the model's "
            f"{kwargs}; the package was edited"
        )
    try:
        (tensor,) = rdf["inputs"]
        steps = [s for s in tensor.get("preprocessing", []) if s.get("id") == "scale_range"]
        (step,) = steps
        lower = float(step["kwargs"]["min_percentile"])
        upper = float(step["kwargs"]["max_percentile"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{p}: rdf.yaml does not declare the model's one input with its scale_range "
            "preprocessing; the package was edited or not written by napari-segtool"
        ) from exc
    norm = model.normalization
    if (lower, upper) != (norm.lower, norm.upper):
        raise CheckpointError(
            f"{p}: rdf.yaml's scale_range percentiles ({lower}, {upper}) differ from the "
            f"model's normalisation ({norm.lower}, {norm.upper}); the package was edited"
        )


# ---------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PackageCheck:
    """Outcome of the bioimage.io checks of a package (:func:`check_package`).

    Attributes
    ----------
    status : str
        ``"passed"`` or ``"failed"`` (bioimageio.core's summary status; ``"valid-format"``
        means the description is valid but a test could not run).
    checks : tuple of (str, str)
        Every check's name and status, in order.
    errors : tuple of str
        The failed checks' messages.
    warnings : tuple of str
        The validator's warnings.
    """

    status: str
    checks: tuple[tuple[str, str], ...]
    errors: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def check_package(path: str | os.PathLike[str]) -> PackageCheck:
    """Validate a package and test-run it as bioimage.io does (``bioimageio test``).

    Runs ``bioimageio.core.test_model``: the description is validated against the
    specification (files present, checksums, axes, preprocessing), then every weights format
    is loaded, the test input is predicted and compared with the expected output, and inputs
    of other allowed sizes and batch sizes are run. Nothing is downloaded: the package is a
    local file and it names no URL.

    Raises
    ------
    InputError
        If the ``bioimageio`` extra is not installed.
    """
    core = _bioimageio("core")
    from bioimageio.spec._internal.warning_levels import WARNING

    with bioimageio_calls():
        summary = core.test_model(Path(path))
    checks, errors, warnings = [], [], []
    for detail in summary.details:
        checks.append((str(detail.name), str(detail.status)))
        errors += [f"{detail.name}: {e.loc}: {e.msg}" for e in detail.errors]
        # leave out the INFO entries (e.g. "all elements agree with expected values")
        warnings += [f"{w.loc}: {w.msg}" for w in detail.warnings if w.severity >= WARNING]
    return PackageCheck(str(summary.status), tuple(checks), tuple(errors), tuple(warnings))


def write_package(
    model: SegmentationModel,
    path: str | os.PathLike[str],
    *,
    test_input: NDArray[np.float32],
    test_output: NDArray[np.float32],
    authors: Sequence[str] = AUTHORS,
    license: str = LICENSE,
) -> Path:
    """Write ``model`` as a bioimage.io model package (spec 0.5) to ``path`` (a ``.zip``).

    Parameters
    ----------
    model : SegmentationModel
        The model; its architecture must be registered (``unet``, ``resunet``).
    path : str or PathLike
        Where to write the package.
    test_input : ndarray of float32, shape (1, C, [Z,] Y, X)
        Raw intensities (before normalisation), each spatial size a multiple of
        ``2 ** (depth - 1)``.
    test_output : ndarray of float32, shape (1, n_classes, [Z,] Y, X)
        The class probabilities napari-segtool predicts for ``test_input``; bioimage.io tests
        check that the package reproduces them.
    authors : sequence of str
        Names for ``authors`` (and ``packaged_by``).
    license : str
        SPDX licence identifier of the weights.

    Returns
    -------
    Path
        ``path``. The package is not checked here: see :func:`check_package`.

    Raises
    ------
    InputError
        For tensors of the wrong shape, a normalisation that bioimage.io cannot express, or a
        missing ``bioimageio`` extra.
    """
    spec = _bioimageio("spec")
    from bioimageio.spec.model import v0_5 as bio

    _check_tensors(model, test_input, test_output)
    if model.normalization.upper <= 1.0:
        raise InputError(
            f"upper percentile {model.normalization.upper}: bioimage.io's scale_range takes an "
            "upper percentile above 1"
        )
    out = Path(path)
    with bioimageio_calls(), tempfile.TemporaryDirectory(prefix="segtool-bioimageio-") as tmp:
        folder = Path(tmp)
        files = _write_files(model, folder, test_input, test_output)
        try:
            descr = _describe(bio, model, files, test_input, authors=authors, license=license)
        except InputError:
            raise
        except ValueError as exc:  # pydantic's ValidationError: a field bioimage.io refuses
            errors = getattr(exc, "errors", None)
            first = errors()[0] if callable(errors) else {"loc": (), "msg": str(exc)}
            where = ".".join(str(part) for part in first.get("loc", ())) or "model"
            msg = str(first.get("msg", exc))
            raise InputError(
                f"bioimage.io refuses the description: {where}: "
                f"{msg if len(msg) <= 300 else msg[:300] + '...'}"
            ) from exc
        built = folder / "package.zip"
        spec.save_bioimageio_package(descr, output_path=built)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, out)
    logger.info("wrote bioimage.io package %s", out)
    return out


def _bioimageio(part: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"bioimageio.{part}")
    except ImportError as exc:
        raise InputError(
            "bioimage.io export needs the bioimageio extra: pip install "
            "'napari-segtool[bioimageio]' (bioimageio.core)"
        ) from exc


def _check_tensors(model: SegmentationModel, test_input: NDArray, test_output: NDArray) -> None:
    cfg = model.config
    nd = cfg.spatial_dims
    if test_input.ndim != nd + 2 or test_input.shape[:2] != (1, cfg.in_channels):
        raise InputError(
            f"test input of shape {test_input.shape}: expected (1, {cfg.in_channels}, "
            f"{'Z, ' if nd == 3 else ''}Y, X)"
        )
    multiple = 2 ** (cfg.depth - 1)
    if any(s % multiple for s in test_input.shape[2:]):
        raise InputError(
            f"test input of shape {test_input.shape}: spatial sizes must be multiples of "
            f"{multiple}"
        )
    expected = (1, cfg.out_channels, *test_input.shape[2:])
    if test_output.shape != expected:
        raise InputError(f"test output of shape {test_output.shape}: expected {expected}")


def _cpu_state(model: SegmentationModel) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for k, v in model.network.state_dict().items()
    }


def _write_files(
    model: SegmentationModel, folder: Path, test_input: NDArray, test_output: NDArray
) -> dict[str, Path]:
    """Weights, architecture source, test tensors, cover and README in ``folder``."""
    files = {
        "source": folder / SOURCE_NAME,
        "weights": folder / "weights.pt",
        "torchscript": folder / "weights_torchscript.pt",
        "test_input": folder / "test_input.npy",
        "test_output": folder / "test_output.npy",
        "sample_input": folder / "sample_input.tif",
        "sample_output": folder / "sample_output.tif",
        "cover": folder / "cover.png",
        "documentation": folder / "README.md",
    }
    files["source"].write_text(network_source(), encoding="utf-8")
    torch.save(_cpu_state(model), files["weights"])
    network = standalone_network(model)
    with torchscript_allowed():
        scripted = torch.jit.script(network)
        _check_same_network(model, network, scripted, test_input)
        torch.jit.save(scripted, str(files["torchscript"]))
    np.save(files["test_input"], test_input.astype(np.float32))
    np.save(files["test_output"], test_output.astype(np.float32))
    # the same as TIFFs, for people and viewers (bioimage.io's "sample tensors")
    import tifffile

    tifffile.imwrite(files["sample_input"], test_input[0].astype(np.float32))
    tifffile.imwrite(files["sample_output"], test_output[0].astype(np.float32))
    _write_cover(files["cover"], test_input, test_output)
    files["documentation"].write_text(documentation(model), encoding="utf-8")
    return files


def _check_same_network(
    model: SegmentationModel,
    network: torch.nn.Module,
    scripted: torch.nn.Module,
    test_input: NDArray,
) -> None:
    """The package's networks must compute what the model's own does (on any input: here the
    test input, standardised)."""
    x = torch.from_numpy(np.ascontiguousarray(test_input, np.float32))
    x = (x - x.mean()) / x.std().clamp_min(1e-6)
    ours = model.network
    was_training, device = ours.training, next(ours.parameters()).device
    ours.eval()
    try:
        with torch.inference_mode():
            reference = ours(x.to(device)).float().cpu()
            for net in (network, scripted):
                diff = float((net(x) - reference).abs().max())
                if not diff <= 1e-4 * max(1.0, float(reference.abs().max())):
                    raise CheckpointError(
                        f"the exported network differs from the model's own (max logit "
                        f"difference {diff:.3g}); please report this as a bug"
                    )
    finally:
        ours.train(was_training)


# class colours on the cover (background is left uncoloured)
_PALETTE = np.array(
    [[255, 0, 255], [0, 255, 255], [255, 255, 0], [255, 128, 0], [0, 128, 255], [128, 255, 0]],
    np.float32,
)


def _write_cover(path: Path, test_input: NDArray, test_output: NDArray) -> None:
    """The test input (first channel, middle slice of a volume) beside it with the predicted
    classes drawn over it: 2:1, as bioimage.io recommends."""
    import imageio.v3 as iio

    image = test_input[0, 0]
    probs = test_output[0]
    if image.ndim == 3:
        image, probs = image[image.shape[0] // 2], probs[:, probs.shape[1] // 2]
    lo, hi = np.percentile(image, [1.0, 99.8])
    grey = np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    classes = probs.argmax(axis=0)
    overlay = rgb.copy()
    for c in range(1, probs.shape[0]):
        mask = classes == c
        overlay[mask] = 0.5 * overlay[mask] + 0.5 * _PALETTE[(c - 1) % len(_PALETTE)]
    cover = np.concatenate([rgb, overlay], axis=1)
    iio.imwrite(path, np.clip(cover, 0, 255).astype(np.uint8))


def _identifier(text: str, fallback: str) -> str:
    """``text`` as a Python identifier (bioimage.io channel names must be): ``cell interior``
    becomes ``cell_interior``."""
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text.strip())
    if not out or not out.isidentifier():
        out = f"{fallback}_{out}" if out else fallback
    import keyword

    return f"{out}_" if keyword.iskeyword(out) else out


def _channel_names(names: Sequence[str], fallback: str) -> list[str]:
    out: list[str] = []
    for i, name in enumerate(names):
        ident = _identifier(name, f"{fallback}{i}")
        out.append(ident if ident not in out else f"{ident}_{i}")
    return out


def _package_name(name: str) -> str:
    """A model name within bioimage.io's rules (letters, digits, ``_+- ()``, 5-128 chars)."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+- ()")
    out = "".join(ch if ch in allowed else "-" for ch in name).strip()[:128]
    return out if len(out) >= 5 else f"napari-segtool {out}".strip()


def _cite_entries(model: SegmentationModel) -> list[tuple[str, str]]:
    cite = [UNET_CITE]
    if model.config.architecture == "resunet":
        cite.append(RESNET_CITE)
    if _trained_on_isbi(model):
        cite.append(ISBI_CITE)
    return cite


def _trained_on_isbi(model: SegmentationModel) -> bool:
    return "isbi" in str(model.trained_on.get("dataset", "")).lower()


def _describe(
    bio: Any,
    model: SegmentationModel,
    files: dict[str, Path],
    test_input: NDArray,
    *,
    authors: Sequence[str],
    license: str,
) -> Any:
    """The ``ModelDescr`` of the package (bioimageio.spec validates it as it is built)."""
    from napari_segtool import __version__

    try:
        license_id = bio.LicenseId(license)
    except ValueError:
        raise InputError(
            f"license {license!r}: not an SPDX licence identifier bioimage.io accepts (e.g. "
            "BSD-3-Clause, MIT, CC-BY-4.0)"
        ) from None
    cfg = model.config
    spatial = ("z", "y", "x")[-cfg.spatial_dims :]
    multiple = 2 ** (cfg.depth - 1)
    in_names = ["raw"] if cfg.in_channels == 1 else [f"channel{i}" for i in range(cfg.in_channels)]
    input_id = bio.TensorId("raw")
    inputs = bio.InputTensorDescr(
        id=input_id,
        description="raw intensities, any range (normalised by the preprocessing)",
        axes=[
            bio.BatchAxis(),
            bio.ChannelAxis(channel_names=[bio.Identifier(n) for n in in_names]),
            *(
                bio.SpaceInputAxis(
                    id=bio.AxisId(a), size=bio.ParameterizedSize(min=multiple, step=multiple)
                )
                for a in spatial
            ),
        ],
        test_tensor=bio.FileDescr(source=files["test_input"]),
        sample_tensor=bio.FileDescr(source=files["sample_input"]),
        data=bio.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")),
            bio.ScaleRangeDescr(
                kwargs=bio.ScaleRangeKwargs(
                    axes=[bio.AxisId(a) for a in spatial],
                    min_percentile=model.normalization.lower,
                    max_percentile=model.normalization.upper,
                    eps=SCALE_RANGE_EPS,
                )
            ),
            bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")),
        ],
    )
    outputs = bio.OutputTensorDescr(
        id=bio.TensorId("probabilities"),
        description="class probabilities (softmax over channels), background first",
        axes=[
            bio.BatchAxis(),
            bio.ChannelAxis(
                channel_names=[
                    bio.Identifier(n) for n in _channel_names(model.class_names, "class")
                ]
            ),
            *(
                bio.SpaceOutputAxis(
                    id=bio.AxisId(a),
                    size=bio.SizeReference(tensor_id=input_id, axis_id=bio.AxisId(a)),
                )
                for a in spatial
            ),
        ],
        test_tensor=bio.FileDescr(source=files["test_output"]),
        sample_tensor=bio.FileDescr(source=files["sample_output"]),
        data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=[bio.SoftmaxDescr(kwargs=bio.SoftmaxKwargs(axis=bio.AxisId("channel")))],
    )
    callable_name, kwargs = network_kwargs(cfg)
    torch_version = bio.Version(torch.__version__.split("+")[0])
    people = [bio.Author(name=a) for a in authors]
    our_meta = {**model.metadata(), "weights_sha256": weights_digest(_cpu_state(model))}
    return bio.ModelDescr(
        name=_package_name(model.name),
        description=(model.description or f"napari-segtool {cfg.architecture} model")[:1024],
        authors=people,
        packaged_by=people,
        cite=[bio.CiteEntry(text=text, doi=bio.Doi(doi)) for text, doi in _cite_entries(model)],
        license=license_id,
        covers=[bio.FileDescr(source=files["cover"])],
        documentation=bio.FileDescr(source=files["documentation"]),
        tags=[
            "napari-segtool",
            f"{cfg.spatial_dims}d",
            cfg.architecture,
            "semantic-segmentation",
            "pytorch",
            *(["electron-microscopy", "isbi2012"] if _trained_on_isbi(model) else []),
        ],
        inputs=[inputs],
        outputs=[outputs],
        weights=bio.WeightsDescr(
            pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
                source=files["weights"],
                architecture=bio.ArchitectureFromFileDescr(
                    source=files["source"],
                    callable=bio.Identifier(callable_name),
                    kwargs=kwargs,
                ),
                pytorch_version=torch_version,
            ),
            torchscript=bio.TorchscriptWeightsDescr(
                source=files["torchscript"],
                pytorch_version=torch_version,
                parent="pytorch_state_dict",
                comment="the pytorch_state_dict network, torch.jit.script-ed",
            ),
        ),
        config=bio.Config(
            **{
                CONFIG_KEY: {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "segtool_version": __version__,
                    "metadata": our_meta,
                }
            }
        ),
    )


def documentation(model: SegmentationModel) -> str:
    """The package's README: what the model does, its data and figures, how to apply it."""
    cfg = model.config
    norm = model.normalization
    trained = model.trained_on
    figures = {
        k: v for k, v in trained.items() if k.startswith("held_out_") and k != "held_out_slices"
    }
    lines = [
        f"# {model.name}",
        "",
        model.description or "A napari-segtool segmentation model.",
        "",
        "Exported by napari-segtool (`napari-segtool export`).",
        "",
        "## Architecture",
        "",
        f"`{cfg.architecture}`, {cfg.spatial_dims}D: depth {cfg.depth}, {cfg.base_features} "
        f"features at the first level (doubled per level), {cfg.norm} normalisation, "
        f"{cfg.in_channels} input channel(s), {cfg.out_channels} classes. Any spatial size "
        f"works (the network pads to a multiple of {2 ** (cfg.depth - 1)} internally); "
        f"napari-segtool applies it in tiles of {' x '.join(map(str, model.tile_shape))} with "
        "25 % overlap and Gaussian blending.",
        "",
        "## Classes",
        "",
        *(
            f"- channel {i}: {name} (label value {value})"
            for i, (name, value) in enumerate(
                zip(model.class_names, model.label_values or (), strict=True)
            )
        ),
        "",
        "## Preprocessing and postprocessing",
        "",
        f"Per image and channel, intensities are mapped linearly so that the {norm.lower} "
        f"percentile becomes 0 and the {norm.upper} percentile becomes 1 (linear "
        "interpolation between order statistics; values outside are kept, not clipped): "
        "bioimage.io `scale_range` over the spatial axes. The network outputs logits; a "
        "softmax over channels gives the class probabilities, and the predicted label is the "
        "most probable class.",
        "",
        "## Training data",
        "",
    ]
    if trained:
        lines += [f"- {k}: {v}" for k, v in trained.items() if k not in figures]
    else:
        lines.append("Not recorded with the model.")
    lines += ["", "## Validation", ""]
    if figures:
        lines.append("On held-out data never used for training or model selection:")
        lines.append("")
        lines += [
            f"- {k.removeprefix('held_out_').replace('_', ' ')}: {v}" for k, v in figures.items()
        ]
        if "held_out_slices" in trained:
            lines += ["", f"Held-out slices: {trained['held_out_slices']}."]
    else:
        lines.append(
            "No held-out figures were recorded with this model; measure Dice against labels "
            "the model was not trained on before relying on it."
        )
    lines += [
        "",
        "## Use",
        "",
        "- `bioimageio test model.zip` checks the package; `bioimageio predict model.zip ...` "
        "runs it (bioimageio.core).",
        "- In napari-segtool: `napari-segtool import model.zip`, or *model file...* in the "
        "Segment widget.",
        "",
    ]
    return "\n".join(lines)
