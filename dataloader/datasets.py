"""Read and validate the public IEMOCAP / MELD feature pickles (SPEC §2).

Two pickles per dataset: a feature pickle (speakers, labels, audio, visual, split ids) and a
RoBERTa pickle (four text layers). Everything is checked and converted to float32 numpy arrays
once, here, so the loaders and the model never see lists, py2 strings or bad values.
Labels and speakers come from the feature pickle, exactly as the reference M3Net code takes them.
"""
from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

TEXT_LAYERS = 4
TEXT_DIM = 1024
VISUAL_DIM = 342
SPLITS = ("train", "test")


class DataError(Exception):
    """Missing or malformed data. The message is one line naming the file (and the dialogue)."""

    def __init__(self, message: str):
        # Messages embed reprs and exception texts; fold them so the CLI prints a single line.
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class DatasetInfo:
    """What the public files of one dataset look like."""

    name: str
    folder: str
    feature_file: str
    roberta_file: str
    feature_fields: tuple[str, ...]
    roberta_fields: tuple[str, ...]
    class_names: tuple[str, ...]
    n_speakers: int
    audio_dim: int

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
        n_speakers=2, audio_dim=1582),
    "MELD": DatasetInfo(
        name="MELD", folder="MELD_features",
        feature_file="MELD_features_raw1.pkl", roberta_file="meld_features_roberta.pkl",
        # The tenth entry is never read (the reference unpacks it into `_`).
        feature_fields=(*_FEATURE_FIELDS, "unused"),
        roberta_fields=("speakers", "emotion_labels", "sentiment_labels", *_ROBERTA_LAYERS,
                        "sentences", "trainIds", "testIds", "validIds"),
        class_names=("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
        n_speakers=9, audio_dim=300),
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
    missing = [str(p) for p in paths if not p.is_file()]
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
        if (candidate / folder).is_dir():
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
    """A [n, dim] finite float32 array from an array or a list of per-utterance vectors."""
    where = f"{path}: dialogue {vid!r}: {name}"
    try:
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
        raise DataError(f"{where} has NaN/Inf values (utterance {row})")
    return array
