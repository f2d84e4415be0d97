"""What a `cosegment` run keeps in its output folder as it goes, so that an interrupted run can resume (`--resume`).

    DIR/resume/settings.json          the settings the kept files were made with (:data:`RECORDED_SETTINGS`)
    DIR/resume/features/              the captured features, one shard per captured batch, written as each batch
                                      is captured (a :class:`~cosegment.store.FeatureStore`; `reference.safetensors`
                                      in it with `--reference auto`)
    DIR/resume/mirrored/              with `--flip`: the mirrored captures, likewise
    DIR/resume/pairs/pair_S_T.safetensors   each finished per-pair analysis (:func:`save_pair_analysis`)

Every file is written atomically (`cosegment.utils.files`), so a kept file is complete or absent. The files in the
folder always belong to the settings in `settings.json`: a run removes the kept files that its settings make stale
before it records them. The collection-level steps (confirmation by third images, hit counts, parts, masks) and the
result files are always computed again: they are quick, and they need every pair.

Also here: :func:`stop_on_signals`, which turns SIGINT and SIGTERM into a :class:`RunInterrupted` exception so that a
run stops through its `finally` blocks and atomic writers, leaving no partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .utils.files import is_temporary, remove_temporaries, save_safetensors, write_json

if TYPE_CHECKING:  # torch loads with the model, not with the command (its --help and input checks stay quick)
    import torch

RUN_FORMAT = "cosegment.run/1"
PAIR_FORMAT = "cosegment.pair/1"
STATE_FOLDER = "resume"
RESUME_MODES = ("reuse", "overwrite")
# What cosegment before issue 26 kept: one features file, read whole (a run removes it: never reused)
LEGACY_FEATURES = "features.safetensors"
# The noise of images skipped before a capture unit is drawn (and dropped) this many images at a time
_SKIP_CHUNK = 64

# Every setting a run records, by its `cosegment` argument name, and what a different value makes stale:
# "features": the captured features and every pair analysis; "pairs": the per-pair analyses; "results": nothing kept
# (the collection-level steps always run again; a change is only logged). Adding a setting is one line here.
RECORDED_SETTINGS = {
    "model": "features",
    "images": "features",  # recorded as the SHA-256 of each file's bytes, in order
    "height": "features",
    "width": "features",
    "seed": "features",
    "timestep": "features",
    "ensemble_size": "features",
    "attention_layers": "features",
    "prompt": "features",
    "dtype": "features",
    "batch_size": "features",
    "reference": "features",  # kept with the features (`features.reference`); a FILE recorded by its SHA-256
    "flip": "features",  # the mirrored captures are kept with the features (`features.mirrored`, issue 27)
    "selection": "pairs",
    "max_entropy": "pairs",
    "max_spread": "pairs",
    "max_collapse": "pairs",
    "max_inverse_error": "pairs",
    "no_refine": "pairs",
    "num_parts": "results",
    "partners": "results",  # which pairs are analysed; a kept pair analysis stays valid in any graph
    "points": "results",
    "no_segment": "results",
}
_STALE = {"features": ("features", "pairs"), "pairs": ("pairs",), "results": ()}

logger = logging.getLogger("cosegment.cli")


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hexadecimal."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_settings(arguments: dict[str, Any]) -> dict[str, Any]:
    """The settings record of a run from its arguments (`vars(args)`): every name of :data:`RECORDED_SETTINGS`
    (missing ones as `None`), the images as content digests, in the form JSON reads back (lists, `inf`)."""
    record = {}
    for name in RECORDED_SETTINGS:
        value = arguments.get(name)
        if name == "images" and value is not None:
            value = [file_digest(path) for path in value]
        elif name == "reference" and value not in (None, "auto", "none"):
            value = {"file": os.path.basename(value), "sha256": file_digest(value)}  # its content, not its name
        record[name] = value
    return json.loads(json.dumps(record))


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def setting_differences(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, list[str]]:
    """The settings that differ between two records, by what they make stale (`"features"`, `"pairs"`,
    `"results"`), each as `"name was X, now Y"`; a name missing from `recorded` (an older record) counts as
    different."""
    found = {group: [] for group in _STALE}
    for name, group in RECORDED_SETTINGS.items():
        if name not in recorded or recorded[name] != current.get(name):
            was = _short(recorded[name]) if name in recorded else "not recorded"
            if name == "images" and name in recorded:
                was = f"{len(recorded[name] or [])} files"
                now = f"{len(current.get(name) or [])} files of other content or order"
            else:
                now = _short(current.get(name))
            found[group].append(f"{name} was {was}, now {now}")
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Per-pair analyses as files
# ---------------------------------------------------------------------------------------------------------------------


def save_pair_analysis(analysis, path: str | os.PathLike, orientation: list[bool] | None = None) -> None:
    """Saves a :class:`PairAnalysis` to one `.safetensors` file, atomically: the tensors of both passes, and the
    indices, grid, settings and thresholds as JSON in its header (never pickle). `orientation`: with `--flip`, whether
    each of the pair's two images was analysed flipped (:func:`pair_orientation` reads it back)."""
    tensors, passes = {}, []
    for index, result in enumerate(analysis.passes):
        prefix = f"passes.{index}"
        for name, value in result.statistics.__dict__.items():
            tensors[f"{prefix}.statistics.{name}"] = value.detach().contiguous().cpu()
        for name in ("keep", "max_prob", "inverse_entropy", "peak_points"):
            if getattr(result, name) is not None:  # peak_points: only with refine=True
                tensors[f"{prefix}.{name}"] = getattr(result, name).detach().contiguous().cpu()
        passes.append(
            {
                "source_index": int(result.source_index),
                "target_index": int(result.target_index),
                "thresholds": dict(result.thresholds.__dict__),
            }
        )
    header = {
        "format": PAIR_FORMAT,
        "source_index": str(int(analysis.source_index)),
        "target_index": str(int(analysis.target_index)),
        "grid_size": json.dumps([int(v) for v in analysis.grid_size]),
        "settings": json.dumps(analysis.settings),
        "passes": json.dumps(passes),
    }
    if orientation is not None:
        header["orientation"] = json.dumps([bool(bit) for bit in orientation])
    save_safetensors(tensors, path, metadata=header)


def pair_orientation(path: str | os.PathLike) -> list[bool] | None:
    """The `orientation` a pair file was saved with (:func:`save_pair_analysis`); `None` for a pair analysed without
    `--flip`, or a file whose header cannot be read (:func:`load_pair_analysis` then says why)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get("orientation")
    except (SafetensorError, OSError):
        return None
    return None if recorded is None else json.loads(recorded)


def load_pair_analysis(path: str | os.PathLike):
    """Loads a file written by :func:`save_pair_analysis` onto the CPU.

    Raises:
        `ValueError` when the file is not a complete cosegment pair file.
    """
    from safetensors import SafetensorError, safe_open

    from cosegment import PairAnalysis, PassResult, SelectionThresholds
    from cosegment.utils.correspondence import PassStatistics

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if header.get("format") != PAIR_FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {PAIR_FORMAT!r}")
        statistics = [field.name for field in dataclasses.fields(PassStatistics)]
        passes = []
        for index, description in enumerate(json.loads(header["passes"])):
            prefix = f"passes.{index}"
            passes.append(
                PassResult(
                    description["source_index"],
                    description["target_index"],
                    PassStatistics(**{name: tensors[f"{prefix}.statistics.{name}"] for name in statistics}),
                    tensors[f"{prefix}.keep"],
                    tensors[f"{prefix}.max_prob"],
                    tensors[f"{prefix}.inverse_entropy"],
                    SelectionThresholds(**description["thresholds"]),
                    tensors.get(f"{prefix}.peak_points"),
                )
            )
        return PairAnalysis(
            int(header["source_index"]),
            int(header["target_index"]),
            tuple(passes),
            tuple(json.loads(header["grid_size"])),
            json.loads(header["settings"]),
        )
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"`{path}` is not a complete cosegment pair analysis file: {error}") from error


# ---------------------------------------------------------------------------------------------------------------------
# The kept state of a run
# ---------------------------------------------------------------------------------------------------------------------


class RunState:
    """The files a run keeps in `out_dir/resume/`, and what a run may reuse of them.

    Args:
        out_dir (`str`): the run's output folder (`--out`).
        settings (`dict`): this run's settings record (:func:`record_settings`).
        resume (`str`, *optional*): `None` for a fresh run (kept files of an earlier run are removed), `"reuse"` to
            reuse the kept files (refused when a setting they depend on differs), `"overwrite"` to reuse what still
            matches and recompute the rest.
    """

    def __init__(self, out_dir: str | os.PathLike, settings: dict[str, Any], resume: str | None = None) -> None:
        if resume is not None and resume not in RESUME_MODES:
            raise ValueError(f"`resume` must be one of {RESUME_MODES} or None, got {resume!r}.")
        self.out_dir = os.fspath(out_dir)
        self.folder = os.path.join(self.out_dir, STATE_FOLDER)
        self.settings = settings
        self.resume = resume
        self.stale: tuple[str, ...] = ("features", "pairs")
        self.changes: list[str] = []
        self._headers: dict[str, tuple[tuple[int, ...], tuple[int, dict]]] = {}  # what `_read_header` read

    @property
    def settings_path(self) -> str:
        return os.path.join(self.folder, "settings.json")

    @property
    def features_path(self) -> str:
        """The feature store of the captures (a folder, :class:`~cosegment.store.FeatureStore`)."""
        return os.path.join(self.folder, "features")

    @property
    def mirrored_path(self) -> str:
        """With `--flip`: the feature store of the mirrored captures."""
        return os.path.join(self.folder, "mirrored")

    @property
    def num_images(self) -> int:
        return len(self.settings.get("images") or [])

    def _store_paths(self) -> list[str]:
        return [self.features_path] + ([self.mirrored_path] if self.settings.get("flip") else [])

    def pair_path(self, source: int, target: int) -> str:
        return os.path.join(self.folder, "pairs", f"pair_{source:03d}_{target:03d}.safetensors")

    def check(self) -> None:
        """Decides what is stale (read only; run it on every process). With `resume="reuse"`, raises a one-line
        `ValueError` naming each setting that differs from the record and that kept files depend on."""
        if self.resume is None:
            return
        try:
            with open(self.settings_path, encoding="utf-8") as handle:
                document = json.load(handle)
            recorded = document["settings"] if document.get("format") == RUN_FORMAT else None
        except FileNotFoundError:
            recorded = None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            recorded = None
            self.changes = [f"{self.settings_path} is unreadable"]
        if not isinstance(recorded, dict):
            self.changes = self.changes or [f"nothing kept in {self.folder}"]
            return
        differences = setting_differences(recorded, self.settings)
        refused = differences["features"] + differences["pairs"]
        if refused and self.resume == "reuse":
            raise ValueError(
                f"`--resume`: {self.folder} was made with other settings: {'; '.join(refused)}. Run with the same "
                "settings, or with --resume=overwrite to recompute what they change, or choose another --out."
            )
        group = "features" if differences["features"] else "pairs" if differences["pairs"] else "results"
        self.stale = _STALE[group]
        self.changes = [*refused, *differences["results"]]

    def start(self) -> None:
        """Removes what a killed writer left and the stale kept files, then records this run's settings (main
        process only, after :meth:`check` and before any process reads or writes kept files)."""
        os.makedirs(self.out_dir, exist_ok=True)
        for path in remove_temporaries(self.out_dir):
            logger.info("removed %s, left by an interrupted writer", path)
        legacy = os.path.join(self.folder, LEGACY_FEATURES)
        if os.path.isfile(legacy):  # an older cosegment's features file: the features are now kept as a store
            os.remove(legacy)
            logger.info(
                "removed %s (an older cosegment's features file; features are kept in %s now)",
                legacy,
                self.features_path,
            )
        if "features" in self.stale:
            for path in (self.features_path, self.mirrored_path):
                shutil.rmtree(path, ignore_errors=True)
        if "pairs" in self.stale:
            shutil.rmtree(os.path.join(self.folder, "pairs"), ignore_errors=True)
        os.makedirs(os.path.join(self.folder, "pairs"), exist_ok=True)
        write_json(self.settings_path, {"format": RUN_FORMAT, "settings": self.settings}, indent=1)

    def started(self) -> None:
        """On every process once :meth:`start` has run on the main one: what is kept now belongs to this run's
        settings (the stale files are gone), so it all counts, and what this run keeps next too."""
        self.stale = ()

    def _missing_by_store(self) -> dict[str, set[int]]:
        """Per feature store of the run, the images it does not hold yet (every image when the features are stale
        or the store is absent). A store that cannot be read is removed (with a warning) and counts as empty."""
        from cosegment.store import FeatureStore

        every = set(range(self.num_images))
        missing = {}
        for path in self._store_paths():
            missing[path] = every
            if "features" in self.stale or not os.path.isdir(path):
                continue
            try:
                store = FeatureStore(path, self._read_header)
                if store.num_images != self.num_images:
                    raise ValueError(f"a store of {store.num_images} images, the run has {self.num_images}")
            except (FileNotFoundError, ValueError) as error:
                logger.warning("cannot reuse %s (%s): capturing again", path, error)
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                missing[path] = set(store.missing())
            except ValueError as error:  # a damaged batch: only its images are captured again
                logger.warning("cannot reuse %s (%s): capturing its images again", store.remove_damaged(), error)
                missing[path] = set(store.missing())
        return missing

    def _read_header(self, path: str) -> tuple[int, dict]:
        """A shard's header (`read_safetensors_header`) for this run's feature stores, read once: a run asks what is
        kept several times (before the model loads, after `start`, after the capture, when it reads the features back:
        seconds of reads each at 10^4 images). Read again when the file is another than the one read (its inode, size
        or times differ: shards are replaced atomically, never changed in place), so that the shards other processes
        write, or that replace others, are seen."""
        from cosegment.store import read_safetensors_header

        status = os.stat(path)
        version = (status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
        known = self._headers.get(path)
        if known is None or known[0] != version:
            known = self._headers[path] = (version, read_safetensors_header(path))
        return known[1]

    def missing_images(self) -> list[int]:
        """The images whose features (or, with `--flip`, mirrored captures) are not kept yet, ascending."""
        return sorted(set().union(*self._missing_by_store().values()))

    def has_features(self) -> bool:
        """Whether every image's features are kept (and the mirrored ones with `--flip`, the reference with
        `--reference auto`): then the run needs no model."""
        if self.missing_images():
            return False
        return self.settings.get("reference") != "auto" or os.path.isfile(self._reference_path)

    @property
    def _reference_path(self) -> str:
        from cosegment.store import STORE_REFERENCE

        return os.path.join(self.features_path, STORE_REFERENCE)

    def load_features(self, device: torch.device | str = "cpu"):
        """The kept features as :class:`~cosegment.store.LazyFeatures` (each image read from disk when a step needs
        it, `mirrored` with `--flip`, the reference saved with `--reference auto`), or `None` when some are missing."""
        from cosegment.store import FeatureStore

        if not self.has_features():
            return None
        features = FeatureStore(self.features_path, self._read_header).features(device)
        if self.settings.get("flip"):
            features.mirrored = FeatureStore(self.mirrored_path, self._read_header).features(device)
        return features

    def capture(
        self,
        pipe,
        images: Sequence,
        share: Sequence[int],
        batch_size: int,
        generator: torch.Generator,
        progress: Callable[[int], Any] | None = None,
        **capture_arguments,
    ) -> int:
        """Captures the images of `share` (a process's share: whole batches of the one-process run, ascending) that
        are not kept yet, one unit (:func:`capture_units`) at a time, each kept as a shard as soon as it is captured:
        an interrupted capture resumes from the last unit kept. `generator` starts at the collection's first image:
        the noise of the images before each captured unit is drawn and dropped, so that every image gets the noise of
        a one-process run of the whole collection. `capture_arguments`: those of `pipe.capture_features` (`flip`
        too). Returns the number of images captured."""
        from cosegment.store import FeatureStore

        missing = self._missing_by_store()
        captured, skipped = 0, share[0] if share else 0
        for unit in capture_units(share, batch_size):
            count = len(set().union(*missing.values()).intersection(unit))
            if not count:
                skipped += len(unit)
                continue
            with _skipping_noise(pipe, skipped):
                features = pipe.capture_features(
                    [images[i] for i in unit], batch_size=batch_size, generator=generator, **capture_arguments
                )
            skipped = 0
            for path, one in zip(self._store_paths(), (features, features.mirrored)):
                rows = [row for row, image in enumerate(unit) if image in missing[path]]
                if rows:  # a store holds each image once (a unit kept whole in one store, not yet in the other)
                    store = FeatureStore.create(path, self.num_images, one.grid_size, one.layer_names, one.metadata)
                    store.write(
                        [unit[row] for row in rows],
                        [q[rows].cpu() for q in one.queries],
                        [k[rows].cpu() for k in one.keys],
                        [one.image_sizes[row] for row in rows],
                    )
            captured += count
            if progress is not None:
                progress(count)
        return captured

    def save_features(self, features) -> None:
        """Keeps `features` (in memory or on disk; their `mirrored` captures and reference too) as this run's."""
        from cosegment.store import FeatureStore

        FeatureStore.from_features(self.features_path, features)
        if features.mirrored is not None:
            FeatureStore.from_features(self.mirrored_path, features.mirrored)

    def save_reference(self, reference) -> None:
        """Keeps the reference captured with `--reference auto` beside the features."""
        from cosegment.store import FeatureStore

        FeatureStore(self.features_path).save_reference(reference)

    def load_pair(self, source: int, target: int, orientation: list[bool] | None = None):
        """The kept analysis of pair `(source, target)`, or `None` when there is none to reuse (also when it was
        analysed in another orientation than `orientation`, `--flip`: the decision depends on the pairs analysed)."""
        path = self.pair_path(source, target)
        if "pairs" in self.stale or not os.path.isfile(path):
            return None
        if pair_orientation(path) != orientation:
            logger.info("%s was analysed in another orientation: analysing the pair again", path)
            return None
        try:
            return load_pair_analysis(path)
        except ValueError as error:
            logger.warning("cannot reuse %s (%s): analysing the pair again", path, error)
            return None

    def pair_analyses(
        self,
        features,
        pairs: Sequence[tuple[int, int]],
        analyze: Callable[..., list],
        progress: Callable[[int], Any] | None = None,
        orientations: Sequence[bool] | None = None,
        **analysis,
    ) -> tuple[list, list[tuple[int, int]]]:
        """The analyses of `pairs`, in order: kept ones loaded, the others made by `analyze`
        (:func:`cosegment.analyze_pairs`, called with `**analysis`) one pair at a time and kept as each finishes.
        `orientations` (`--flip`): each image's decided orientation; a kept pair is reused only if analysed the same
        way round.

        Returns:
            the analyses (on the CPU) and the pairs reused.
        """
        analyses, reused = [], []
        for source, target in pairs:
            bits = pair_bits(orientations, source, target)
            kept = self.load_pair(source, target, bits)
            if kept is None:
                kept = analyze_one_pair(features, source, target, analyze, **analysis).to("cpu")
                save_pair_analysis(kept, self.pair_path(source, target), orientation=bits)
            else:
                reused.append((source, target))
            analyses.append(kept)
            if progress is not None:
                progress(1)
        return analyses, reused


def pair_bits(orientations: Sequence[bool] | None, source: int, target: int) -> list[bool] | None:
    """`[flipped source, flipped target]`: how pair `(source, target)` is analysed with `--flip` (the `orientation` of
    :func:`save_pair_analysis` and :meth:`RunState.load_pair`), from each image's decided orientation; `None` without."""
    return None if orientations is None else [bool(orientations[source]), bool(orientations[target])]


def capture_units(share: Sequence[int], batch_size: int) -> list[list[int]]:
    """A process's share (whole batches of the one-process run, ascending) cut into the units it captures and keeps
    one at a time: its batches, of at least 2 images (the capture's minimum: with `batch_size` 1, two batches a unit),
    a lone last image joined to the unit before it. The UNet batches within a unit are the run's batches, so the
    features do not depend on the cut."""
    size = max(int(batch_size), 2)
    units = [list(share[start : start + size]) for start in range(0, len(share), size)]
    if len(units) > 1 and len(units[-1]) == 1:
        units[-2].extend(units.pop())
    return units


@contextlib.contextmanager
def _skipping_noise(pipe, skipped: int) -> Iterator[None]:
    """Within the block, `pipe.prepare_noise` first draws (and drops) the noise of `skipped` images from the
    generator it is given, then draws as it does: the images of a capture unit get the noise of their place in the
    collection (the generator draws each image's noise in collection order, :func:`cosegment.capture.draw_noise`)."""
    prepare_noise = pipe.prepare_noise

    def skipping(num_images, ensemble_size, shape, generator, device, dtype, image_indices=None):
        for start in range(0, skipped, _SKIP_CHUNK):
            prepare_noise(min(_SKIP_CHUNK, skipped - start), ensemble_size, shape, generator, device, dtype)
        return prepare_noise(num_images, ensemble_size, shape, generator, device, dtype, image_indices)

    pipe.prepare_noise = skipping
    try:
        yield
    finally:
        del pipe.prepare_noise  # the pipeline's own method again


def analyze_one_pair(features, source: int, target: int, analyze: Callable[..., list], **analysis):
    """`analyze(features, [(source, target)], **analysis)[0]`, computed on the two images' features alone: the same
    values, without checking every image's features for each pair (`analyze_pairs` validates all of them, which at 40
    images of SD 2.1's default layers takes as long as a pair's analysis)."""
    two = features.select([source, target])  # reads the two images only (of features on disk too)
    result = analyze(two, [(0, 1)], **analysis)[0]
    index = {0: source, 1: target}
    passes = tuple(
        dataclasses.replace(one, source_index=index[one.source_index], target_index=index[one.target_index])
        for one in result.passes
    )
    return dataclasses.replace(result, source_index=source, target_index=target, passes=passes)


def describe_kept(out_dir: str | os.PathLike) -> str:
    """What `out_dir/resume/` holds, in words: `"the features and 3 pair analyses in out/resume"`."""
    folder = os.path.join(os.fspath(out_dir), STATE_FOLDER)
    pairs_folder = os.path.join(folder, "pairs")
    names = os.listdir(pairs_folder) if os.path.isdir(pairs_folder) else []
    pairs = len([name for name in names if name.endswith(".safetensors") and not is_temporary(name)])
    features = _holds_shards(os.path.join(folder, "features"))
    if not features and not pairs:
        return "nothing kept yet"
    kept = ["the features"] if features else []
    if pairs:
        kept.append(f"{pairs} pair analys{'is' if pairs == 1 else 'es'}")
    return f"{' and '.join(kept)} in {folder}"


def forget_empty_state(out_dir: str | os.PathLike, remove_out: bool = False) -> list[str]:
    """After a run failed or was stopped: when `out_dir/resume/` keeps nothing to resume (no features, no pair
    analysis), removes its `settings.json` and the folders left empty, and `out_dir` itself when `remove_out` (the run
    created it) and it is empty; so a run that kept nothing leaves the folder as it was. Kept files are never removed.

    Returns:
        the removed paths.
    """
    out_dir = os.fspath(out_dir)
    folder = os.path.join(out_dir, STATE_FOLDER)
    if describe_kept(out_dir) != "nothing kept yet":
        return []
    removed = []
    settings = os.path.join(folder, "settings.json")
    if os.path.isfile(settings):
        os.remove(settings)
        removed.append(settings)
    for name in ("features", "mirrored"):  # a store made before its first batch was kept
        index = os.path.join(folder, name, "store.json")
        if os.path.isfile(index):
            os.remove(index)
            removed.append(index)
    for path in (*(os.path.join(folder, name) for name in ("pairs", "features", "mirrored")), folder):
        with contextlib.suppress(OSError):  # only an empty folder goes
            os.rmdir(path)
            removed.append(path)
    if remove_out:
        with contextlib.suppress(OSError):
            os.rmdir(out_dir)
            removed.append(out_dir)
    return removed


def _holds_shards(store: str) -> bool:
    """Whether the feature store folder `store` holds a captured batch (a shard, not a temporary file)."""
    names = os.listdir(store) if os.path.isdir(store) else []
    return any(
        name.startswith("images-") and name.endswith(".safetensors") and not is_temporary(name) for name in names
    )


# ---------------------------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------------------------


class RunInterrupted(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM within :func:`stop_on_signals`. Like `KeyboardInterrupt` it is
    not an `Exception`, so that no `except Exception` (e.g. the one naming the pair of an analysis error) takes it.

    Attributes:
        signum (`int`): the signal; `exit_code` is `128 + signum` (130 for SIGINT, 143 for SIGTERM), as a shell
            reports a process the signal ended.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, the first of `signals` raises :class:`RunInterrupted` where the main thread is (so `finally`
    blocks and atomic writers clean up); later ones are ignored, so that the clean-up is not cut short. The previous
    handlers come back at the end. Outside the main thread, does nothing."""
    received = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise RunInterrupted(signum)

    previous = {}
    try:
        for number in signals:
            previous[number] = signal.signal(number, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
