"""The descriptor track of ISC2021: one vector of at most 256 dimensions per image, written in the HDF5 layout the
challenge's reference code reads (facebookresearch/isc2021, isc/io.py), one file per side:

    vectors        float32 (N, D), 1 <= D <= 256   row i describes image image_names[i]
    image_names    bytes (N,), numpy "S" strings    image ids (file stems); like ISC's reader, `read_descriptors`
                                                    drops a folder and a .jpg / .png suffix from a name
    skipped_names  bytes (M,), ours, optional       images of the folder that could not be read (no vector);
                                                    ISC's reader ignores it

    python scripts/export_descriptors.py --queries Q/ --references R/ --out runs/track    # query.h5, reference.h5
    python scripts/export_descriptors.py --benchmark benchmarks/dev --out runs/track --normalise subtract \
        --train ../shared/data/train
    python scripts/export_descriptors.py ... --method pdq        # PDQ (or pHash) bits as 0/1 floats

Vectors are compared by Euclidean distance (`pair_vit.match.track` scores them): the descriptor's are
L2-normalised (squared distance = 2 - 2 cosine); PDQ (256 bits) and pHash (64) bits are written as 0.0 / 1.0,
whose squared distance is the Hamming distance. Whole images only: one vector per image, no query views.
Normalisation inside the vectors (needs training photos): `pair_vit.descriptor.normalise`.

A file is refused (DescriptorFileError, naming the file and the fault) when it lacks a dataset, holds NaN or
infinite values, more than 256 dimensions, a row count other than its id count, or a repeated id; `check_ids`
refuses ids that are not the images of a folder, and images of the folder that have neither a vector nor a
place in skipped_names. Unreadable images are listed in OUT/skipped.csv and get no vector.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from pair_vit import data
from pair_vit.config import opt, option_like, save_config
from pair_vit.descriptor import normalise as norm
from pair_vit.io import atomic_path

log = logging.getLogger(__name__)

MAX_DIM = 256
VECTORS, NAMES, SKIPPED = "vectors", "image_names", "skipped_names"
METHODS = ("descriptor", "pdq", "phash")
SIDES = ("query", "reference")


class DescriptorFileError(ValueError):
    """A descriptor file (or a pair of them) that cannot be scored; the message names the file and the fault."""


@dataclass
class Descriptors:
    """One side of a submission: `vectors` (N, D) float32, row i for image `ids[i]`; `skipped`: images without
    a vector (unreadable)."""

    ids: list[str]
    vectors: np.ndarray
    skipped: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


# ----------------------------------------------------------------------------- the file layout


def strip_name(name: str) -> str:
    """An id from an ISC image name: the folder and a .jpg / .png suffix dropped (as isc/io.py read_descriptors)."""
    name = name.split("/")[-1]
    return name[:-4] if name.endswith((".jpg", ".png")) else name


def _encode(ids: Iterable[str]) -> np.ndarray:
    names = [str(i).encode("utf-8") for i in ids]
    return np.array(names) if names else np.zeros(0, dtype="S1")


def _decode(names: np.ndarray) -> list[str]:
    return [strip_name(n.decode("utf-8") if isinstance(n, bytes) else str(n)) for n in names]


def check_descriptors(d: Descriptors, source: str, max_dim: int = MAX_DIM) -> Descriptors:
    """`d` with float32 vectors, or DescriptorFileError saying what is wrong with `source`."""
    vectors = np.asarray(d.vectors)
    if vectors.ndim != 2:
        raise DescriptorFileError(f"{source}: vectors must be a 2-d array (images x dimensions), got shape "
                                  f"{vectors.shape}")
    if not np.issubdtype(vectors.dtype, np.number):
        raise DescriptorFileError(f"{source}: vectors must be numbers, got dtype {vectors.dtype}")
    if not 1 <= vectors.shape[1] <= max_dim:
        raise DescriptorFileError(f"{source}: {vectors.shape[1]}-dimensional vectors; the descriptor track allows "
                                  f"1 to {max_dim} dimensions")
    if len(vectors) != len(d.ids):
        raise DescriptorFileError(f"{source}: {len(vectors)} vectors but {len(d.ids)} image names")
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise DescriptorFileError(f"{source}: {bad.size} vector(s) hold NaN or infinite values, e.g. image "
                                  f"{d.ids[bad[0]]!r}")
    counts = Counter(d.ids)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated or "" in counts:
        what = f"repeated image name(s) {repeated[:5]}" if repeated else "an empty image name"
        raise DescriptorFileError(f"{source}: {what}; each image needs exactly one vector")
    both = sorted(set(counts).intersection(d.skipped))
    if both:
        raise DescriptorFileError(f"{source}: image(s) {both[:5]} have a vector and are listed as skipped")
    return Descriptors(list(d.ids), vectors.astype(np.float32, copy=False), list(d.skipped))


def write_descriptors(path: str | Path, d: Descriptors) -> None:
    """Write `d` (checked first) as an ISC2021 descriptor file, atomically."""
    import h5py

    d = check_descriptors(d, str(path))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(VECTORS, data=np.ascontiguousarray(d.vectors, dtype=np.float32))
            f.create_dataset(NAMES, data=_encode(d.ids))
            f.create_dataset(SKIPPED, data=_encode(d.skipped))


def read_descriptors(path: str | Path, max_dim: int = MAX_DIM) -> Descriptors:
    """An ISC2021 descriptor file, checked (`check_descriptors`); DescriptorFileError names what is wrong."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"descriptor file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [name for name in (VECTORS, NAMES) if name not in f]
            if missing:
                raise DescriptorFileError(f"{path}: no {' or '.join(repr(m) for m in missing)} dataset; a descriptor "
                                          f"file holds '{VECTORS}' (float32, images x dimensions) and '{NAMES}'")
            vectors, names = np.asarray(f[VECTORS][()]), _decode(f[NAMES][()].reshape(-1))
            skipped = _decode(f[SKIPPED][()].reshape(-1)) if SKIPPED in f else []
    except OSError as err:
        raise DescriptorFileError(f"{path}: not a readable HDF5 file ({err})") from None
    return check_descriptors(Descriptors(names, vectors, skipped), str(path), max_dim)


def check_ids(d: Descriptors, images: Iterable[str], source: str, folder: str = "the images") -> None:
    """Refuse `d` unless its ids are the `images` ids, less those it lists as skipped (unreadable)."""
    images = set(images)
    unknown = sorted(set(d.ids) - images)
    if unknown:
        raise DescriptorFileError(f"{source}: {len(unknown)} image name(s) are not images of {folder}, e.g. "
                                  f"{unknown[:5]}")
    missing = sorted(images - set(d.ids) - set(d.skipped))
    if missing:
        raise DescriptorFileError(f"{source}: {len(missing)} image(s) of {folder} have no vector and are not listed "
                                  f"as skipped, e.g. {missing[:5]}")


def check_sides(query: Descriptors, reference: Descriptors, query_source: str, reference_source: str) -> None:
    """Refuse a query and a reference side of different dimensions (ISC compares them as one space)."""
    if query.dim != reference.dim:
        raise DescriptorFileError(f"{query_source} holds {query.dim}-dimensional vectors but {reference_source} "
                                  f"{reference.dim}-dimensional ones; both sides must come from one descriptor")


# ----------------------------------------------------------------------------- describing images


def describe(images: Mapping[str, Path], method: str = "descriptor", model=None, batch_size: int = 64,
             amp: bool = True, num_workers: int = 0, report: data.SkipReport | None = None,
             progress: bool | str = False) -> Descriptors:
    """One vector per loadable image of `images` (id -> path): the descriptor `model` (whole image, unit norm)
    or PDQ / pHash bits (0/1 floats). Unreadable images go to `report` and to `skipped`."""
    report = report if report is not None else data.SkipReport()
    before = len(report)
    if method == "descriptor":
        from pair_vit.descriptor.views import embed_folder

        ids, vectors, _ = embed_folder(model, images, batch_size, amp, "full", report, num_workers, progress)
    elif method in ("pdq", "phash"):
        from pair_vit import baselines

        ids, codes = baselines.hash_folder(dict(images), method, report)
        vectors = np.unpackbits(codes, axis=1).astype(np.float32)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    skipped = sorted({Path(p).stem for p, _ in report.entries[before:]} & set(images))
    return Descriptors(list(ids), np.asarray(vectors, np.float32), skipped)


# ----------------------------------------------------------------------------- the export stage


@dataclass
class ExportConfig:
    """Write the descriptors of a query folder and a reference folder as ISC2021 descriptor-track files."""

    queries: str = opt("", "folder of query images (id = file stem)")
    references: str = opt("", "folder of reference images")
    benchmark: str = opt("", "a benchmark folder instead of --queries/--references (its photo sources are kept "
                             "out of the training descriptors)")
    out: str = opt("", "output folder: query.h5, reference.h5, skipped.csv, config.yaml (+ train.h5)")
    method: str = opt("descriptor", "descriptor (the global descriptor), pdq or phash (bits as 0/1 floats)",
                      choices=METHODS)
    checkpoint: str = opt("", "descriptor checkpoint; empty: the weights shipped in the package")
    normalise: str = option_like(norm.NormaliseConfig, "normalise")
    train: str = opt("", "training photos for the normalisation: a folder (its --train-split side is embedded "
                         "and saved as OUT/train.h5) or such a .h5 file")
    train_split: str = opt("train", "side of the fixed split of a --train folder", choices=("train", "all"))
    train_max: int = opt(0, "at most this many training photos (0: all)")
    subtract_k: int = option_like(norm.NormaliseConfig, "subtract_k")
    subtract_beta: float = option_like(norm.NormaliseConfig, "subtract_beta")
    subtract_alpha: float = option_like(norm.NormaliseConfig, "subtract_alpha")
    subtract_iterations: int = option_like(norm.NormaliseConfig, "subtract_iterations")
    stretch_n: int = option_like(norm.NormaliseConfig, "stretch_n")
    stretch_factor: float = option_like(norm.NormaliseConfig, "stretch_factor")
    batch_size: int = opt(64, "images per descriptor forward pass")
    amp: bool = opt(True, "bf16 autocast where the hardware has native bf16 (--no-amp: float32)")
    num_workers: int = opt(1, "image-decoding worker processes (0: in the main process)")
    overwrite: bool = opt(False, "replace existing output files")
    progress: bool = opt(True, "progress bars")


def normalise_settings(cfg) -> norm.NormaliseConfig:
    """The `NormaliseConfig` fields of any config that repeats them."""
    names = [f.name for f in dataclasses.fields(norm.NormaliseConfig)]
    return norm.check_settings(norm.NormaliseConfig(**{name: getattr(cfg, name) for name in names}))


def load_model(checkpoint: str = ""):
    from pair_vit.descriptor.model import SHIPPED_WEIGHTS, load_descriptor

    return load_descriptor(checkpoint or SHIPPED_WEIGHTS)[0]


def _folders(cfg: ExportConfig) -> tuple[dict[str, Path], dict[str, Path], set[str]]:
    if cfg.benchmark:
        layout = data.DiscLayout.from_root(cfg.benchmark)
        return layout.query_images(), layout.reference_images(), norm.benchmark_sources(cfg.benchmark)
    if not (cfg.queries and cfg.references):
        raise ValueError("--queries and --references (or --benchmark) are required")
    return data.list_images(cfg.queries), data.list_images(cfg.references), set()


def _check_config(cfg: ExportConfig) -> norm.NormaliseConfig:
    """The normalisation settings; refuses a run that would fail after embedding."""
    settings = normalise_settings(cfg)
    if not cfg.out:
        raise ValueError("--out is required (a folder)")
    if any((Path(cfg.out) / f"{side}.h5").exists() for side in SIDES) and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out} already holds descriptor files; pass --overwrite to replace them")
    if settings.normalise != "none" and cfg.method != "descriptor":
        raise ValueError(f"--normalise {cfg.normalise} applies to the descriptor, not to {cfg.method} bits")
    if settings.normalise != "none" and not cfg.train:
        raise ValueError(f"--normalise {cfg.normalise} needs training photos: --train FOLDER or FILE.h5")
    return settings


def _negatives(cfg: ExportConfig, model, exclude: set[str], out: Path, report: data.SkipReport) -> np.ndarray | None:
    """Training descriptors for the normalisation (none without one), less the `exclude` ids."""
    if cfg.normalise == "none":
        return None
    if Path(cfg.train).suffix in (".h5", ".hdf5"):
        train = read_descriptors(cfg.train)
        keep = [i for i, t in enumerate(train.ids) if t not in exclude]
        return train.vectors[keep[: cfg.train_max or None]]
    images = norm.training_images(cfg.train, cfg.train_split, exclude, cfg.train_max)
    train = describe(images, "descriptor", model, cfg.batch_size, cfg.amp, cfg.num_workers, report,
                     cfg.progress and "training photos")
    write_descriptors(out / "train.h5", train)
    return train.vectors


def run(cfg: ExportConfig) -> dict[str, Descriptors]:
    """Describe both folders, normalise, check and write OUT/query.h5 and OUT/reference.h5; return both sides."""
    start = time.perf_counter()
    settings = _check_config(cfg)
    out = Path(cfg.out)
    targets = [out / f"{side}.h5" for side in SIDES]
    queries, references, exclude = _folders(cfg)
    model = load_model(cfg.checkpoint) if cfg.method == "descriptor" else None
    report = data.SkipReport()
    embed = dict(method=cfg.method, model=model, batch_size=cfg.batch_size, amp=cfg.amp,
                 num_workers=cfg.num_workers, report=report)
    sides = {"query": describe(queries, progress=cfg.progress and "queries", **embed),
             "reference": describe(references, progress=cfg.progress and "references", **embed)}
    negatives = _negatives(cfg, model, exclude, out, report)
    q, r = norm.normalise(sides["query"].vectors, sides["reference"].vectors, negatives, settings)
    sides = {"query": Descriptors(sides["query"].ids, q, sides["query"].skipped),
             "reference": Descriptors(sides["reference"].ids, r, sides["reference"].skipped)}
    for (side, d), images, target in zip(sides.items(), (queries, references), targets):
        check_ids(d, images, str(target), f"the {side} folder")
        write_descriptors(target, d)
    if len(report):
        report.write_csv(out / "skipped.csv")
        log.warning("%s; listed in %s", report.summary(), out / "skipped.csv")
    else:
        (out / "skipped.csv").unlink(missing_ok=True)  # left by an earlier export to this folder
    save_config(cfg, out / "config.yaml")
    print(f"export ({cfg.method}, normalise {settings.normalise}): {len(sides['query'].ids)} queries, "
          f"{len(sides['reference'].ids)} references, {sides['query'].dim} dimensions, {len(report)} unreadable "
          f"skipped -> {targets[0]}, {targets[1]}; {time.perf_counter() - start:.1f} s")
    return sides
