"""Image sources → a :class:`Manifest`: stable ids, paths, labels, class names, splits and a fingerprint.

Sources
-------
- an image folder: ``root/<class>/<image>``, or ``root/{train,val,test}/<class>/<image>``;
- a CSV/TSV manifest with a header ``path,label[,split]`` (paths relative to the manifest);
- a ``.txt`` list of image paths, one per line (unlabeled, for prediction);
- ``digits``: scikit-learn's 8×8 handwritten digits, the embedded demo (written once as PNGs to the cache);
- ``torchvision:NAME``: a torchvision dataset (downloaded on machines with internet, then written as PNGs);
- a ``.tar``/``.tar.gz``/``.zip`` archive of an image folder (unpacked once into the cache).

A manifest keeps the splits its source gives (``train`` when it gives none). The test and val splits a source
lacks are carved later, by a :class:`featx.data.splits.SplitPlan` (:meth:`Manifest.with_plan`), so that the
features, which depend on the images only, never depend on how the images are split.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import inspect
import logging
import os
import shutil
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from featx._runtime.env import cache_dir
from featx.data.archives import ArchiveLimits, unpack
from featx.data.manifest import _SOURCE_HINT, _SPLIT_ALIASES, IMAGE_EXTENSIONS, Manifest, _natural_key
from featx.exceptions import UnknownNameError, unknown

__all__ = [
    "ARCHIVE_SUFFIXES",
    "from_archive",
    "from_csv",
    "from_digits",
    "from_files",
    "from_folder",
    "from_torchvision",
    "load_source",
]

log = logging.getLogger(__name__)


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _finish(
    ids: list[str],
    paths: list[str],
    label_names: list[str | None],
    splits: list[str],
    source: str,
    class_names: Sequence[str] | None = None,
) -> Manifest:
    """Turn string labels into indices and build the manifest (its splits as the source gave them)."""
    names = (
        list(class_names)
        if class_names is not None
        else sorted({n for n in label_names if n is not None}, key=_natural_key)
    )
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index[n] if n is not None else -1 for n in label_names], dtype=np.int64)
    splits = ["unlabeled" if lab < 0 else s for lab, s in zip(labels, splits, strict=True)]
    order = sorted(range(len(ids)), key=lambda i: _natural_key(ids[i]))
    return Manifest(
        ids=[ids[i] for i in order],
        paths=[paths[i] for i in order],
        labels=labels[order] if len(order) else labels,
        splits=[splits[i] for i in order],
        class_names=names,
        source=source,
    )


def _file_identity(path: str, resolved: str) -> Hashable:
    """What makes two paths one file: its device and inode (hard links and symbolic links included), or, for a
    path that cannot be read (a missing file, reported at extraction), its ``resolved`` path."""
    try:
        st = os.stat(path)
    except OSError:
        return resolved
    return (st.st_dev, st.st_ino)


def _refuse_repeated_files(
    where: str,
    ids: Sequence[str],
    keys: Sequence[Hashable],
    labels: Sequence[str | None],
    splits: Sequence[str],
    rows: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
) -> None:
    """Refuse one file under several ids: it would count twice, and in train and test it leaks the test set.

    ``keys`` say which rows are one file (:func:`_file_identity`: a hard link or a symbolic link is the file
    it links); ``paths`` name the file in the message (the keys when not given); ``rows`` say where each row is
    written (``line 4``), if anywhere.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    repeated = [rows_of for rows_of in groups.values() if len(rows_of) > 1]
    if not repeated:
        return

    def row(i: int) -> str:
        label = f", {labels[i]}" if labels[i] is not None else ""
        return f"{rows[i] + ' ' if rows else ''}{ids[i]!r} ({splits[i]}{label})"

    def file(rows_of: list[int]) -> str:
        if paths is None:
            return str(keys[rows_of[0]])
        real = {os.path.realpath(paths[i]) for i in rows_of}
        return real.pop() if len(real) == 1 else f"{os.path.realpath(paths[rows_of[0]])} (hard-linked)"

    count = "1 file appears" if len(repeated) == 1 else f"{len(repeated)} files appear"
    shown = "; ".join(f"{file(rows_of)} as {', '.join(row(i) for i in rows_of)}" for rows_of in repeated[:5])
    more = f"; and {len(repeated) - 5} more files" if len(repeated) > 5 else ""
    raise ValueError(
        f"{where}: {count} under several ids, so their features would count twice and a file in "
        f"two splits leaks the test set: {shown}{more}. List each image once (one path per file)"
    )


# ------------------------------------------------------------------------------------------- sources
def from_folder(root: str | Path) -> Manifest:
    """An image folder: ``root/<class>/<image>`` or ``root/<split>/<class>/<image>``.

    Split folders are ``train``, ``val`` (or ``valid``/``validation``) and ``test``. Files whose
    extension is not an image extension, and hidden files, are skipped.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    unreadable: list[OSError] = []
    top = _subfolders(root, unreadable)
    if unreadable:
        _refuse_unreadable(root, unreadable)
    split_named = [p.name for p in top if p.name.lower() in _SPLIT_ALIASES]
    split_layout = bool(top) and len(split_named) == len(top)
    if split_named and not split_layout:
        others = [p.name for p in top if p.name.lower() not in _SPLIT_ALIASES]
        raise ValueError(
            f"{root} mixes split folders ({', '.join(split_named)}) with other folders ({', '.join(others[:5])}): "
            "use either root/<class>/<image> or root/{train,val,test}/<class>/<image>, or a CSV manifest"
        )
    groups = [(p, _SPLIT_ALIASES[p.name.lower()]) for p in top] if split_layout else [(root, "train")]
    ids, paths, keys, labels, splits = [], [], [], [], []
    skipped = 0
    for group_dir, split in groups:
        for class_dir in _subfolders(group_dir, unreadable):
            for file in _files_under(class_dir, unreadable):
                if not _is_image(file):
                    skipped += 1
                    continue
                ids.append(file.relative_to(root).as_posix())
                paths.append(str(file))
                keys.append(_file_identity(str(file), str(file)))
                labels.append(class_dir.name)
                splits.append(split)
    if unreadable:
        _refuse_unreadable(root, unreadable)
    if skipped:
        log.info("skipped %d non-image files under %s", skipped, root)
    if not ids:
        raise ValueError(
            f"no images found under {str(root)!r}: expected root/<class>/<image> or root/<split>/<class>/<image> "
            f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    if split_layout:
        train_classes = {lab for lab, s in zip(labels, splits, strict=True) if s == "train"}
        unseen = sorted({lab for lab in labels} - train_classes)
        if train_classes and unseen:
            log.warning("classes with no training images in %s: %s", root, ", ".join(unseen))
    _refuse_repeated_files(f"image folder {root}", ids, keys, labels, splits, paths=paths)
    return _finish(ids, paths, labels, splits, f"folder:{root}")


def _subfolders(folder: Path, unreadable: list[OSError]) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted; a folder that cannot be listed is noted in ``unreadable``,
    never taken for an empty one."""
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        unreadable.append(exc)
        return []


def _files_under(folder: Path, unreadable: list[OSError]) -> list[Path]:
    """Every file under ``folder`` at any depth, sorted (symbolic links to folders are not followed, as
    ``rglob`` does not); each folder that cannot be listed is noted in ``unreadable``."""
    files = []
    for parent, _, names in os.walk(folder, onerror=unreadable.append):
        files.extend(Path(parent, name) for name in names)
    return sorted(files)


def _refuse_unreadable(root: Path, unreadable: list[OSError]) -> None:
    """Refuse an image folder of which some folders cannot be listed: their images would silently be missing."""
    shown = "; ".join(f"{exc.filename} ({exc.strerror or exc})" for exc in unreadable[:5])
    more = f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
    many = len(unreadable) > 1
    error = PermissionError if all(isinstance(exc, PermissionError) for exc in unreadable) else OSError
    raise error(
        f"image folder {root}: {len(unreadable)} folder{'s' if many else ''} cannot be read, so "
        f"{'their' if many else 'its'} images would silently be missing: {shown}{more}. Make "
        f"{'them' if many else 'it'} readable (chmod -R u+rX), or move {'them' if many else 'it'} out of the folder"
    )


def from_csv(path: str | Path) -> Manifest:
    """A CSV/TSV manifest with a header row naming ``path`` and ``label`` (and optionally ``split``).

    Paths are relative to the manifest's folder unless absolute; an empty label means unlabeled.
    Files that do not exist are kept and reported as failures at extraction time.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    try:
        ids, paths, labels, splits, lines = _read_csv(path)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    keys = [_file_identity(p, p) for p in paths]
    _refuse_repeated_files(f"manifest {path}", ids, keys, labels, splits, [f"line {n}" for n in lines], paths)
    return _finish(ids, paths, labels, splits, f"csv:{path}")


def _read_csv(path: Path) -> tuple[list[str], list[str], list[str | None], list[str], list[int]]:
    """The ids (as written), resolved paths, label names, splits and line numbers of a CSV/TSV manifest."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "path" not in fields:
            raise ValueError(
                f"manifest {str(path)!r} needs a header row naming a 'path' column (and 'label', optionally "
                f"'split'); found columns {fields}"
            )
        reader.fieldnames = fields
        ids, paths, labels, splits, lines = [], [], [], [], []
        for line, row in enumerate(reader, start=2):
            rel = (row.get("path") or "").strip()
            if not rel:
                raise ValueError(f"{path}:{line}: empty path")
            label = (row.get("label") or "").strip() or None
            raw_split = (row.get("split") or "train").strip().lower() or "train"
            if raw_split not in _SPLIT_ALIASES:
                raise UnknownNameError(f"{path}:{line}: unknown split {raw_split!r}; use train, val or test")
            file = Path(rel) if Path(rel).is_absolute() else path.parent / rel
            ids.append(rel)
            paths.append(str(file.resolve()))
            labels.append(label)
            splits.append(_SPLIT_ALIASES[raw_split])
            lines.append(line)
    return ids, paths, labels, splits, lines


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> ValueError:
    """Name the file, the line and the first byte that is not UTF-8, and how to fix it."""
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        data[bom:].decode("utf-8")
        offset, reason = exc.start, exc.reason  # not reached: the whole file fails where the stream did
    except UnicodeDecodeError as whole:
        offset, reason = bom + whole.start, whole.reason
    line = data.count(b"\n", 0, offset) + 1
    return ValueError(
        f"{path}:{line}: not UTF-8 text (byte 0x{data[offset : offset + 1].hex()} at offset {offset}: {reason}); "
        "it is probably Latin-1 or Windows-1252. featx reads manifests as UTF-8: save the file as UTF-8 (a "
        f"spreadsheet's 'CSV UTF-8', or `iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`)"
    )


def from_files(files: Sequence[str | Path], source: str = "files") -> Manifest:
    """An unlabeled manifest from a list of image paths (for prediction)."""
    paths = [str(Path(f).expanduser().resolve()) for f in files]
    ids = list(dict.fromkeys(paths))
    if len(ids) != len(paths):
        log.warning("dropped %d repeated paths", len(paths) - len(ids))
    return Manifest(ids, ids, np.full(len(ids), -1), ["unlabeled"] * len(ids), [], source, "unlabeled")


def _from_list_file(path: Path) -> Manifest:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    files = [Path(ln) if Path(ln).is_absolute() else path.parent / ln for ln in lines if ln and not ln.startswith("#")]
    return from_files(files, source=f"list:{path.resolve()}")


def _materialise(target: Path, write) -> None:
    """Write a generated dataset once: into a temporary folder, renamed into place when complete."""
    if (target / ".complete").exists():
        return
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        (tmp / ".complete").write_text("ok\n")
    except BaseException:  # a failed or interrupted write leaves no half copy in the cache (Ctrl-C included)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if (target / ".complete").exists():  # another process finished first: never delete a complete copy
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished in between
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / ".complete").exists():
            raise


def from_digits() -> Manifest:
    """scikit-learn's 1,797 8×8 handwritten digits, written once as greyscale PNGs into the cache.

    The 17 grey levels (0–16) are scaled to 0–255. The images ship with scikit-learn, so this source
    works offline; it is featx's embedded demo.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    target = cache_dir() / "sources" / "digits-v1"

    def write(folder: Path) -> None:
        digits = load_digits()
        for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            out = folder / str(label)
            out.mkdir(exist_ok=True)
            pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(out / f"{i:04d}.png")

    _materialise(target, write)
    manifest = from_folder(target)
    manifest.source = "digits"
    return manifest


def _torchvision_split_kwargs(cls) -> list[tuple[str, dict]]:
    """The (split name, constructor kwargs) pairs a torchvision dataset class accepts."""
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        return [("train", {"train": True}), ("test", {"train": False})]
    if "split" in params:
        return [
            ("train", {"split": "train"}),
            ("train", {"split": "trainval"}),
            ("val", {"split": "val"}),
            ("test", {"split": "test"}),
        ]
    return [("train", {})]


def from_torchvision(name: str, *, download: bool = True) -> Manifest:
    """A torchvision dataset by class name (``CIFAR10``, ``Flowers102``, ...), written once as PNGs.

    Downloads into ``<cache>/torchvision/NAME`` on machines with internet; the images are then
    written to ``<cache>/sources/torchvision-NAME`` with a CSV manifest, so later runs need neither.
    """
    import torchvision.datasets as tvd

    available = sorted(
        n for n in tvd.__all__ if n[0].isupper() and n not in ("VisionDataset", "DatasetFolder", "ImageFolder")
    )
    if name not in available:
        raise unknown("torchvision dataset", name, available, f"Datasets are: {', '.join(available)}.")
    cls = getattr(tvd, name)
    params = inspect.signature(cls.__init__).parameters
    target = cache_dir() / "sources" / f"torchvision-{name}"

    def write(folder: Path) -> None:
        rows = []
        class_names = None
        seen_split_names = set()
        for split, kwargs in _torchvision_split_kwargs(cls):
            if split in seen_split_names:
                continue
            kw = dict(kwargs)
            if "root" in params:
                kw["root"] = str(cache_dir() / "torchvision" / name)
            if "download" in params:
                kw["download"] = download
            try:
                dataset = cls(**kw)
            except ValueError:  # a split name this dataset does not have
                continue
            except (RuntimeError, OSError) as exc:  # offline: urllib's URLError is an OSError
                root = cache_dir() / "torchvision" / name
                raise RuntimeError(
                    f"torchvision:{name} needs the network to download it, or a copy downloaded before, and this "
                    f"machine has neither (torchvision said: {exc}). Either run once where there is internet "
                    f"(it downloads into {root}), or copy the files torchvision downloads for {name} (the archive, "
                    f"e.g. cifar-10-python.tar.gz for CIFAR10, or its unpacked folder) into {root}; set "
                    "FEATX_CACHE_DIR to use another cache. An image folder or a CSV manifest of the images works "
                    "offline too"
                ) from exc
            seen_split_names.add(split)
            class_names = class_names or [str(c) for c in getattr(dataset, "classes", [])] or None
            (folder / split).mkdir(exist_ok=True)
            for i in range(len(dataset)):
                image, label = dataset[i]
                if hasattr(image, "save"):
                    file = f"{split}/{i:06d}.png"
                    image.save(folder / file)
                else:
                    raise TypeError(f"torchvision:{name} yields {type(image).__name__}, not PIL images")
                rows.append((file, int(label), split))
        if not rows:
            raise ValueError(f"torchvision:{name} yielded no images")
        labels_used = sorted({r[1] for r in rows})
        names = class_names or [str(i) for i in range(max(labels_used) + 1)]
        with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label", "split"])
            for file, label, split in rows:
                writer.writerow([file, names[label], split])
        (folder / "classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")

    _materialise(target, write)
    manifest = from_csv(target / "manifest.csv")
    names = (target / "classes.txt").read_text(encoding="utf-8").splitlines()
    # Keep the dataset's own class order (labels = its targets), not the alphabetical one.
    remap = np.array([names.index(c) for c in manifest.class_names])
    manifest.labels = np.where(manifest.labels >= 0, remap[np.maximum(manifest.labels, 0)], -1)
    manifest.class_names = names
    manifest.source = f"torchvision:{name}"
    return manifest


def from_archive(path: str | Path) -> Manifest:
    """A ``.tar``/``.tar.gz``/``.tgz``/``.zip`` of an image folder, unpacked once into the cache.

    The unpacked copy is keyed by the archive's name, size and modification time. Unpacking is bounded and
    safe (:func:`featx.data.archives.unpack`): members that would land outside the copy (absolute paths, ``..``,
    links) are refused, and so are archives over the size, member-count or expansion-ratio limits of
    :class:`~featx.data.archives.ArchiveLimits`. An archive holding a single top folder is read from inside
    that folder.

    Raises
    ------
    ArchiveError
        The archive is broken, truncated, unsafe or over a limit; the message names the file and the fix.
        Nothing is left in the cache then.
    """
    path = Path(path).expanduser().resolve()
    st = path.stat()
    digest = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "sources" / f"archive-{path.name.split('.')[0]}-{digest}"
    limits = ArchiveLimits.from_env()  # a bad variable is refused before anything is created
    _materialise(target, lambda folder: unpack(path, folder, limits))
    entries = [p for p in target.iterdir() if not p.name.startswith(".")]
    root = (
        entries[0]
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() not in _SPLIT_ALIASES
        else target
    )
    manifest = from_folder(root)
    manifest.source = f"archive:{path}"
    return manifest


def load_source(source: str | Path) -> Manifest:
    """Build a manifest from any source featx understands (see the module docstring).

    Raises
    ------
    FileNotFoundError
        A path that does not exist.
    UnknownNameError
        A source of no known kind.
    """
    text = str(source)
    if text == "digits":
        return from_digits()
    if text.startswith("torchvision:"):
        return from_torchvision(text.split(":", 1)[1])
    path = Path(text).expanduser()
    if path.is_dir():
        return from_folder(path)
    if path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return from_archive(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return from_csv(path)
        if suffix in (".txt", ".lst"):
            return _from_list_file(path)
        if suffix in IMAGE_EXTENSIONS:
            return from_files([path])
        raise UnknownNameError(f"source file {text!r} has suffix {suffix!r}. {_SOURCE_HINT}")
    raise FileNotFoundError(f"source {text!r} does not exist. {_SOURCE_HINT}")
