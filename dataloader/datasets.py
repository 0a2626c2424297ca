"""Read and validate the public IEMOCAP / MELD feature pickles.

Two pickles per dataset: a feature pickle (speakers, labels, audio, visual, split ids) and a
RoBERTa pickle (four text layers). Everything is checked and converted to float32 numpy arrays
once, here, so the loaders and the model never see lists, py2 strings or bad values.
Labels and speakers come from the feature pickle, exactly as the reference M3Net code takes them.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from pathlib import Path

import numpy as np

TEXT_LAYERS = 4
TEXT_DIM = 1024
VISUAL_DIM = 342
SPLITS = ("train", "test")
# The modalities by their letters in --modals.
MODALITY_NAMES = {"l": "text", "a": "audio", "v": "visual"}
# Far above any real feature (RoBERTa activations, openSMILE descriptors in Hz or frames) yet
# small enough that squares summed over the widest layer stay far below float32's maximum.
MAX_FEATURE_MAGNITUDE = 1e6


class DataError(Exception):
    """Missing or malformed data. The message is one line naming the file (and the dialogue)."""

    def __init__(self, message: str):
        # Messages embed reprs and exception texts; fold them so the CLI prints a single line.
        super().__init__(" ".join(str(message).split()))


class DataUnreadable(DataError):
    """A data folder or file the OS refuses to read (permissions, I/O errors); `path` names it."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # pickled with its own arguments, not the message, to cross processes
        return type(self), (self.path, self.reason)


def _unreadable(path: Path, exc: OSError) -> DataUnreadable:
    """The DataUnreadable of an OSError met looking at `path`: it names the innermost folder the OS
    will not look into (the one a chmod denies), else `path` itself."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    chain = [*reversed(path.parents), path]
    for folder, child in zip(chain, chain[1:]):
        try:
            os.stat(child)
        except (FileNotFoundError, NotADirectoryError):
            break
        except OSError:
            return DataUnreadable(folder, reason)
    return DataUnreadable(path, reason)


def _is_file(path: Path) -> bool:
    """Path.is_file, where a folder that cannot be read is a DataError rather than an OSError."""
    try:
        return path.is_file()
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _is_dir(path: Path) -> bool:
    """Path.is_dir, where a folder that cannot be read is a DataError rather than an OSError."""
    try:
        return path.is_dir()
    except OSError as exc:
        raise _unreadable(path, exc) from None


@dataclass(frozen=True)
class DatasetInfo:
    """What the public files of one dataset look like, and how the paper trains and scores it."""

    name: str
    folder: str
    feature_file: str
    roberta_file: str
    feature_fields: tuple[str, ...]
    roberta_fields: tuple[str, ...]
    class_names: tuple[str, ...]
    n_speakers: int
    audio_dim: int
    loss: str                                   # the multimodal loss: "nll" (class-weighted) or "focal"
    micro_f1_classes: tuple[int, ...] | None    # the classes micro-F1 covers (None: all)
    # The defaults of run/train_OGM_Shapley_MMPareto_<name>.py: the DGS README's settings.
    train_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


_FEATURE_FIELDS = ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio",
                   "videoVisual", "videoSentence", "trainVid", "testVid")
_ROBERTA_LAYERS = tuple(f"roberta{k}" for k in range(1, TEXT_LAYERS + 1))

DATASETS: dict[str, DatasetInfo] = {
    "IEMOCAP": DatasetInfo(
        name="IEMOCAP", folder="IEMOCAP_features",
        feature_file="IEMOCAP_features.pkl", roberta_file="iemocap_features_roberta.pkl",
        feature_fields=_FEATURE_FIELDS,
        roberta_fields=("speakers", "labels", *_ROBERTA_LAYERS, "sentences",
                        "trainIds", "testIds", "validIds"),
        class_names=("hap", "sad", "neu", "ang", "exc", "fru"),
        n_speakers=2, audio_dim=1582, loss="nll", micro_f1_classes=None,
        train_defaults=dict(seed=1475, base_model="GRU", dropout=0.5, lr=1e-4, batch_size=8, epochs=80, norm="BN",
                            num_L=1, num_K=1, use_modal=True, modulation_ends=80, alpha_=0.6, pareto_gamma=0.2)),
    "MELD": DatasetInfo(
        name="MELD", folder="MELD_features",
        feature_file="MELD_features_raw1.pkl", roberta_file="meld_features_roberta.pkl",
        # The tenth entry is never read (the reference unpacks it into `_`).
        feature_fields=(*_FEATURE_FIELDS, "unused"),
        roberta_fields=("speakers", "emotion_labels", "sentiment_labels", *_ROBERTA_LAYERS,
                        "sentences", "trainIds", "testIds", "validIds"),
        class_names=("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
        # MELD papers report micro-F1 over the emotions other than neutral.
        n_speakers=9, audio_dim=300, loss="focal", micro_f1_classes=(1, 2, 3, 4, 5, 6),
        train_defaults=dict(seed=67137, base_model="GRU", dropout=0.4, lr=1e-5, batch_size=8, epochs=50, norm="BN",
                            num_L=1, num_K=1, use_modal=False, modulation_ends=50, alpha_=0.6, pareto_gamma=1.0)),
}

# IEMOCAP speaker letters -> index; the reference builds qmask as [1,0] for 'M', [0,1] for 'F'.
IEMOCAP_SPEAKERS = {"M": 0, "F": 1}


@dataclass
class Dialogue:
    """One conversation, utterances in order."""

    id: object
    text: np.ndarray      # [n, 4, 1024] float32, RoBERTa layers 1..4
    audio: np.ndarray     # [n, Da] float32
    visual: np.ndarray    # [n, 342] float32
    speakers: np.ndarray  # [n] int64 speaker index
    labels: np.ndarray    # [n] int64 class index
    n_speakers: int       # width of the speaker one-hot (2 IEMOCAP, 9 MELD)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Conversations:
    """All dialogues of a dataset, per split, in file order, plus the dataset's metadata."""

    info: DatasetInfo
    splits: dict[str, list[Dialogue]]
    files: tuple[Path, Path]

    @property
    def dataset(self) -> str:
        return self.info.name

    @property
    def n_classes(self) -> int:
        return self.info.n_classes

    @property
    def n_speakers(self) -> int:
        return self.info.n_speakers

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def dims(self) -> dict[str, int]:
        """Feature width per modality (text: per RoBERTa layer)."""
        return {"text": TEXT_DIM, "audio": self.info.audio_dim, "visual": VISUAL_DIM}

    def utterances(self, split: str) -> int:
        return sum(len(d) for d in self.splits[split])

    def class_counts(self, split: str) -> np.ndarray:
        """Utterances per class in a split: int64 [n_classes]."""
        labels = [d.labels for d in self.splits[split]]
        return np.bincount(np.concatenate(labels), minlength=self.n_classes)

    def with_splits(self, splits: dict[str, list[Dialogue]]) -> "Conversations":
        return replace(self, splits=splits)


def dataset_info(dataset: str) -> DatasetInfo:
    """The DatasetInfo of 'IEMOCAP' or 'MELD'."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DataError(f"unknown dataset {dataset!r}: expected one of "
                        f"{', '.join(DATASETS)}") from None


def data_files(dataset: str, data_dir: str | Path) -> tuple[Path, Path]:
    """Paths of the (feature, RoBERTa) pickles under data_dir; DataError saying what is missing.

    data_dir is the folder holding `IEMOCAP_features/` (resp. `MELD_features/`); pointing at
    that folder itself also works, since it is an easy mistake to make.
    """
    info = dataset_info(dataset)
    data_dir = Path(data_dir)
    folder = data_dir if data_dir.name == info.folder else data_dir / info.folder
    paths = (folder / info.feature_file, folder / info.roberta_file)
    missing = [str(p) for p in paths if not _is_file(p)]
    if missing:
        # The generator's command only where it cannot meet a real file of the pair.
        hint = (f"to generate synthetic ones run: python -m dataloader.synthetic --Dataset {info.name} --out {data_dir}"
                if len(missing) == len(paths) else "put the missing file beside the other one")
        raise DataError(
            f"{info.name} data not found: missing {' and '.join(missing)} (expected "
            f"{info.folder}/{info.feature_file} and {info.folder}/{info.roberta_file} under "
            f"{data_dir}); {hint}")
    return paths


REPO_DATA = Path(__file__).resolve().parents[1] / "data"


def find_data_dir(dataset: str, data_dir: str | Path | None = None) -> Path:
    """data_dir when given; else the current directory or, failing that, the repository's data/
    (the first holding <Dataset>_features/). DataError when neither does."""
    if data_dir:
        return Path(data_dir)
    folder = dataset_info(dataset).folder
    for candidate in (Path.cwd(), REPO_DATA):
        if _is_dir(candidate / folder):
            return candidate
    raise DataError(f"no {folder}/ in the current directory or in {REPO_DATA}: pass --data-dir, or make "
                    f"synthetic features with: python -m dataloader.synthetic --Dataset {dataset} --out {REPO_DATA}")


def load_conversations(dataset: str, data_dir: str | Path) -> Conversations:
    """Load, validate and convert both pickles of a dataset; splits 'train' and 'test'.

    The split is trainVid / testVid of the feature pickle, dialogues in the order listed there
    (a set, having no order, is sorted). Any problem raises DataError.
    """
    info = dataset_info(dataset)
    feature_path, roberta_path = data_files(dataset, data_dir)
    features = _read_tuple(feature_path, info.feature_fields)
    roberta = _read_tuple(roberta_path, info.roberta_fields)
    split_ids = {split: _split_ids(features, f"{split}Vid", feature_path) for split in SPLITS}
    overlap = set(split_ids["train"]) & set(split_ids["test"])
    if overlap:
        vid = sorted(overlap, key=repr)[0]
        raise DataError(f"{feature_path}: dialogue {vid!r} is in both trainVid and testVid")
    splits = {split: [_dialogue(info, vid, features, roberta, feature_path, roberta_path)
                      for vid in ids]
              for split, ids in split_ids.items()}
    return Conversations(info=info, splits=splits, files=(feature_path, roberta_path))


def _read_tuple(path: Path, fields: tuple[str, ...]) -> dict[str, object]:
    """Unpickle a py2/py3 pickle holding a tuple of len(fields) entries; name the entries."""
    try:
        with open(path, "rb") as f:
            value = pickle.load(f, encoding="latin1")
    except OSError as exc:  # the file (or its folder) is unreadable, not malformed
        raise _unreadable(path, exc) from None
    except Exception as exc:  # any unpickling failure is a bad file, whatever its type
        raise DataError(f"{path}: cannot read the pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, (tuple, list)) or len(value) != len(fields):
        got = f"a {len(value)}-tuple" if isinstance(value, (tuple, list)) else type(value).__name__
        raise DataError(f"{path}: expected a {len(fields)}-tuple ({', '.join(fields)}), got {got}")
    return dict(zip(fields, value))


def _split_ids(features: dict[str, object], name: str, path: Path) -> list:
    ids = features[name]
    if isinstance(ids, (Mapping, str, bytes)) or not isinstance(ids, Iterable):
        raise DataError(f"{path}: {name} is a {type(ids).__name__}, "
                        f"expected a list of dialogue ids")
    if isinstance(ids, (set, frozenset)):
        # A set has no file order; sorting keeps runs reproducible across processes.
        try:
            ids = sorted(ids)
        except TypeError:
            ids = sorted(ids, key=repr)
    ids = list(ids)
    if not ids:
        raise DataError(f"{path}: {name} is empty (no dialogues in this split)")
    if len(set(ids)) != len(ids):
        vid = next(v for v in ids if ids.count(v) > 1)
        raise DataError(f"{path}: dialogue {vid!r} is listed twice in {name}")
    return ids


def _entry(table: dict[str, object], name: str, vid: object, path: Path) -> object:
    """table[name][vid], or a DataError naming the file, the dict and the dialogue."""
    mapping = table[name]
    if not isinstance(mapping, Mapping):
        raise DataError(f"{path}: {name} is a {type(mapping).__name__}, "
                        f"expected a dict keyed by dialogue id")
    try:
        return mapping[vid]
    except (KeyError, TypeError):
        raise DataError(f"{path}: dialogue {vid!r} (listed in the split) is missing "
                        f"from {name}") from None


def _dialogue(info: DatasetInfo, vid: object, features: dict[str, object],
              roberta: dict[str, object], feature_path: Path, roberta_path: Path) -> Dialogue:
    labels = _labels(info, vid, _entry(features, "videoLabels", vid, feature_path), feature_path)
    n = len(labels)
    speakers = _speakers(info, vid, _entry(features, "videoSpeakers", vid, feature_path), n,
                         feature_path)
    audio = _matrix(_entry(features, "videoAudio", vid, feature_path), "videoAudio", vid, n,
                    info.audio_dim, feature_path)
    visual = _matrix(_entry(features, "videoVisual", vid, feature_path), "videoVisual", vid, n,
                     VISUAL_DIM, feature_path)
    layers = [_matrix(_entry(roberta, name, vid, roberta_path), name, vid, n, TEXT_DIM,
                      roberta_path) for name in _ROBERTA_LAYERS]
    return Dialogue(id=vid, text=np.stack(layers, axis=1), audio=audio, visual=visual,
                    speakers=speakers, labels=labels, n_speakers=info.n_speakers)


def _labels(info: DatasetInfo, vid: object, value: object, path: Path) -> np.ndarray:
    where = f"{path}: dialogue {vid!r}: videoLabels"
    try:
        labels = np.asarray(value)
    except Exception as exc:
        raise DataError(f"{where} is not a list of class indices ({exc})") from None
    if labels.ndim != 1 or labels.size == 0:
        raise DataError(f"{where} must be a non-empty list of class indices, got shape "
                        f"{labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where} holds {labels.dtype} values, expected integer class indices")
    bad = np.flatnonzero((labels < 0) | (labels >= info.n_classes))
    if bad.size:
        raise DataError(f"{where}: label {labels[bad[0]]} at utterance {bad[0]} is outside "
                        f"0..{info.n_classes - 1} ({info.name} has {info.n_classes} classes)")
    return labels.astype(np.int64)


def _speakers(info: DatasetInfo, vid: object, value: object, n: int, path: Path) -> np.ndarray:
    where = f"{path}: dialogue {vid!r}: videoSpeakers"
    if info.name == "IEMOCAP":
        letters = list(value) if isinstance(value, Iterable) else []
        if len(letters) != n:
            raise DataError(f"{where} has {len(letters)} utterances but videoLabels has {n}")
        try:
            return np.array([IEMOCAP_SPEAKERS[s] for s in letters], dtype=np.int64)
        except (KeyError, TypeError):
            odd = next(s for s in letters if not isinstance(s, str) or s not in IEMOCAP_SPEAKERS)
            raise DataError(f"{where}: speaker {odd!r} is not 'M' or 'F'") from None
    # MELD: one-hot rows over the speaker slots.
    onehot = _matrix(value, "videoSpeakers", vid, n, info.n_speakers, path)
    valid = np.isin(onehot, (0.0, 1.0)).all(axis=1) & (onehot.sum(axis=1) == 1)
    if not valid.all():
        row = int(np.argmin(valid))
        raise DataError(f"{where}: utterance {row} is not a one-hot speaker vector")
    return onehot.argmax(axis=1).astype(np.int64)


def _matrix(value: object, name: str, vid: object, n: int, dim: int, path: Path) -> np.ndarray:
    """A [n, dim] float32 array, finite and within MAX_FEATURE_MAGNITUDE, from an array or a list
    of per-utterance vectors."""
    where = f"{path}: dialogue {vid!r}: {name}"
    try:
        # Values beyond float32 become Inf here and are reported below with their real value.
        with np.errstate(over="ignore"):
            array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where} is not a list of equal-length vectors ({exc})") from None
    if array.ndim != 2:
        raise DataError(f"{where} has shape {array.shape}, expected ({n}, {dim})")
    if array.shape[0] != n:
        raise DataError(f"{where} has {array.shape[0]} utterances but videoLabels has {n}")
    if array.shape[1] != dim:
        raise DataError(f"{where} has dimension {array.shape[1]}, expected {dim}")
    finite = np.isfinite(array)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        original = _row_as_float64(value, row)
        if original is None or not np.isfinite(original).all():
            raise DataError(f"{where} has NaN/Inf values (utterance {row})")
    big = np.abs(array) > MAX_FEATURE_MAGNITUDE     # the Inf of a value beyond float32 counts too
    if big.any():
        row, column = (int(i[0]) for i in np.nonzero(big))
        shown = float(array[row, column])
        if not np.isfinite(shown):
            shown = float(_row_as_float64(value, row)[column])
        # A flipped exponent bit keeps a value finite but makes float32 training overflow.
        raise DataError(f"{where}: value {shown:g} at utterance {row}, dimension {column}, is beyond "
                        f"{MAX_FEATURE_MAGNITUDE:g}, the bound on feature magnitudes (a corrupted file?)")
    return array


def _row_as_float64(value: object, row: int) -> np.ndarray | None:
    """Utterance `row` of a feature matrix as the file holds it, before the float32 cast."""
    try:
        return np.asarray(value[row], dtype=np.float64)  # type: ignore[index]
    except Exception:  # an odd container: report it as NaN/Inf, as it reads in float32
        return None
