"""Synthetic IEMOCAP / MELD feature pickles with the public layouts (see the README: Data).

    python -m dataloader.synthetic --Dataset IEMOCAP|MELD --out DIR [--scale F] [--seed N]
    python -m dataloader.synthetic --probe --Dataset IEMOCAP|MELD [--data-dir DIR]

The real features sit behind a licence, so tests, benchmarks and smoke runs use these files.
How the data is made:

* dialogues: lengths drawn from a gamma law clipped to the real range, then nudged so the
  utterance totals match the real ones exactly at --scale 1; speakers take turns;
* emotions persist: each dialogue has a mood (the class prior pulled towards one class) and
  each speaker keeps their previous emotion with high probability, else draws from the mood;
  over many dialogues class frequencies follow the real priors;
* features: per modality, a class prototype plus unit Gaussian noise in a small latent space,
  embedded in the feature space by a random projection, plus nuisance directions (content,
  speaker identity) and per-dimension noise, scale and offset, so vectors look like features
  rather than one-hot codes. Modality imbalance is built in: text has the strongest
  prototypes but blurs some class pairs (IEMOCAP hap/exc and ang/fru, MELD joy/surprise and
  anger/disgust); audio is weaker but carries an arousal axis that separates those pairs;
  visual is weakest. A share of utterances comes across as another emotion in every
  modality (annotators disagree on the real data too), which caps what fusion gains over
  text. The four RoBERTa layers are noisy views of one text vector.

Files: the feature pickle holds per-utterance lists of float32 vectors, the RoBERTa pickle
(n, 1024) arrays; IEMOCAP split lists are shuffled (so loaders must keep file order, not sort)
and its RoBERTa validIds are the last 10% of trainVid; MELD's tenth feature-pickle entry and
its RoBERTa sentiment_labels are sentiment labels (0 neutral, 1 positive, 2 negative).

Same seed, same bytes: one numpy Generator drawn in a fixed order, dicts filled in a fixed
order, pickle protocol 4.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import OneLineParser, UserError
from utils.files import atomic_path

from .datasets import (DATASETS, TEXT_DIM, VISUAL_DIM, DataError, DataUnreadable, DatasetInfo, find_data_dir,
                       load_conversations)

PICKLE_PROTOCOL = 4
LATENT_DIM = 12      # signal subspace of each modality
NUISANCE_DIM = 16    # label-free structure (content, speaker identity)
UTTERANCE_NUISANCE = 2.0
SPEAKER_NUISANCE = 0.5
# Pickle bytes per utterance beyond its float32 features: ids, sentences, labels, per-row array headers.
UTTERANCE_OVERHEAD = 300
# Generation holds every feature matrix, their per-row views and a temporary at once: a bound on
# its memory as a multiple of the bytes written.
MEMORY_PER_BYTE_WRITTEN = 2


@dataclass(frozen=True)
class Recipe:
    """Size, dialogue statistics and signal strengths of one synthetic dataset."""

    n_train: int            # train dialogues, dev included (MELD's trainVid holds train+dev)
    n_test: int
    dev_frac: float         # share of train listed as validIds in the RoBERTa pickle
    utt_train: int
    utt_test: int
    min_len: int
    max_len: int
    len_shape: float        # gamma shape of dialogue lengths (small: many short dialogues)
    priors: tuple[float, ...]
    switch_prob: float      # next utterance is by another speaker
    max_participants: int
    stay_prob: float        # a speaker keeps their previous emotion
    ambiguity: float        # share of utterances expressed (in every modality) as another class
    mood_weight: float      # how far a dialogue's mood leans to one class
    glove_dim: int          # videoText width (unused by the model, present in the files)
    arousal: tuple[float, ...]           # per class, read by audio
    blur_pairs: tuple[tuple[int, int], ...]  # classes text hardly tells apart
    text_blur: float        # 0: pair merged in text, 1: as distinct as other classes
    text_strength: float    # prototype norms in the latent space (noise std is 1)
    audio_strength: float
    arousal_strength: float
    visual_strength: float


RECIPES: dict[str, Recipe] = {
    "IEMOCAP": Recipe(
        n_train=120, n_test=31, dev_frac=0.1, utt_train=5810, utt_test=1623,
        min_len=8, max_len=110, len_shape=5.0,
        priors=(0.087, 0.144, 0.228, 0.161, 0.128, 0.253),
        switch_prob=0.85, max_participants=2, stay_prob=0.8, ambiguity=0.3, mood_weight=0.5,
        glove_dim=100,
        #        hap   sad   neu   ang   exc   fru
        arousal=(-0.6, -1.0, 0.0, 1.0, 1.0, 0.0),
        blur_pairs=((0, 4), (3, 5)), text_blur=0.3,
        text_strength=4.0, audio_strength=1.2, arousal_strength=1.8, visual_strength=0.9),
    "MELD": Recipe(
        n_train=1153, n_test=280, dev_frac=114 / 1153, utt_train=11098, utt_test=2610,
        min_len=1, max_len=33, len_shape=2.0,
        priors=(0.47, 0.12, 0.03, 0.07, 0.17, 0.03, 0.11),
        switch_prob=0.8, max_participants=9, stay_prob=0.5, ambiguity=0.3, mood_weight=0.3,
        glove_dim=600,
        #        neu  sur  fear  sad  joy   dis  ang
        arousal=(0.0, 1.0, 0.5, -1.0, 0.2, -0.4, 1.0),
        blur_pairs=((4, 1), (6, 5)), text_blur=0.3,
        text_strength=3.0, audio_strength=1.0, arousal_strength=1.5, visual_strength=0.8),
}


@dataclass
class _Layout:
    """Dialogue structure before features: ids, speakers (slot index), labels, split ids."""

    ids: list
    speakers: list[np.ndarray]
    labels: list[np.ndarray]
    train_ids: list
    test_ids: list
    dev_ids: list


def generate(dataset: str, out_dir: str | Path, scale: float = 1.0, seed: int = 0, overwrite: bool = False) -> Path:
    """Write both pickles of `dataset` under out_dir/<Dataset>_features/; return that folder.

    Files already there are replaced only when they hold the same bytes (a rerun of the same
    command) or with `overwrite`: the folder may hold real features.
    """
    if dataset not in RECIPES:
        raise DataError(f"unknown dataset {dataset!r}: expected one of {', '.join(RECIPES)}")
    if not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive number, got {scale}")
    check_size(dataset, out_dir, scale)
    info, recipe = DATASETS[dataset], RECIPES[dataset]
    rng = np.random.default_rng(seed)
    layout = _layout(info, recipe, scale, rng)
    features = _features(info, recipe, layout, rng)
    folder = Path(out_dir) / info.folder
    folder.mkdir(parents=True, exist_ok=True)
    if dataset == "IEMOCAP":
        feature_tuple, roberta_tuple = _iemocap_tuples(layout, features)
    else:
        feature_tuple, roberta_tuple = _meld_tuples(layout, features, rng)
    feature_path, roberta_path = folder / info.feature_file, folder / info.roberta_file
    # Renamed together when the block ends; a raise inside removes both temp files.
    with atomic_path(feature_path) as feature_tmp, atomic_path(roberta_path) as roberta_tmp:
        _dump(feature_tuple, feature_tmp)
        _dump(roberta_tuple, roberta_tmp)
        kept = [path for path, tmp in ((feature_path, feature_tmp), (roberta_path, roberta_tmp))
                if not overwrite and path.exists() and not filecmp.cmp(tmp, path, shallow=False)]
        if kept:
            raise DataError(f"{' and '.join(map(str, kept))} already there with other contents (real features?); "
                            f"nothing written: pass --overwrite to replace them, or give another --out")
    return folder


# ---------------------------------------------------------------- size

def utterances(dataset: str, scale: float) -> float:
    """Utterances the generator makes at `scale` (the totals _layout gives its dialogues); inf
    where the count overflows a float."""
    recipe = RECIPES[dataset]
    total = 0.0
    for real_dialogues, real_utterances, least in ((recipe.n_train, recipe.utt_train, 2),
                                                   (recipe.n_test, recipe.utt_test, 1)):
        count = real_dialogues * scale
        if not math.isfinite(count):
            return math.inf
        count = max(least, round(count))
        total += min(max(round(real_utterances / real_dialogues * count), recipe.min_len * count),
                     recipe.max_len * count)
    return total


def estimated_bytes(dataset: str, scale: float) -> float:
    """About the bytes of both pickles at `scale`: the float32 features of each utterance plus overhead."""
    info, recipe = DATASETS[dataset], RECIPES[dataset]
    per_utterance = 4 * (4 * TEXT_DIM + info.audio_dim + VISUAL_DIM + recipe.glove_dim) + UTTERANCE_OVERHEAD
    return utterances(dataset, scale) * per_utterance


def check_size(dataset: str, out_dir: str | Path, scale: float) -> None:
    """UserError, before anything is generated, when the pickles of `scale` would not fit the free
    space of out_dir's file system or their generation would not fit the memory available."""
    written = estimated_bytes(dataset, scale)
    limits = []                      # (bytes needed per byte written, bytes there, what they are)
    where, free = _free_disk(Path(out_dir))
    if free is not None:
        limits.append((1, free, f"free on {where}"))
    available = _available_memory()
    if available is not None:
        limits.append((MEMORY_PER_BYTE_WRITTEN, available, "of memory available"))
    over = [limit for limit in limits if written * limit[0] > limit[1]]
    if not over:
        return
    factor, have, what = min(over, key=lambda limit: limit[1] / limit[0])
    # Sizes grow in proportion to the scale, so the tightest limit tells the largest scale that fits.
    fits = _round_down(have / (factor * estimated_bytes(dataset, 1.0)))
    # Dialogue counts are rounded, and never below 2 + 1: step down until the scale named does fit.
    for _ in range(100):
        if estimated_bytes(dataset, fits) * factor <= have:
            break
        fits = _round_down(fits * 0.99)
    else:
        fits = 0.0
    largest = f"the largest --scale that fits is about {fits:g}" if fits > 0 else "no --scale fits"
    memory = f" and {_human(written * factor)} of memory to generate" if factor != 1 else ""
    raise UserError(f"--scale {scale:g}: the {dataset} pickles would take {_human(written)}{memory}, more than the "
                    f"{_human(have).removeprefix('about ')} {what}; {largest}")


def _free_disk(out_dir: Path) -> tuple[Path, int | None]:
    """Free bytes of the file system out_dir would be made on (its nearest existing folder); None when unknown."""
    where = out_dir.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return where, shutil.disk_usage(where).free
    except OSError:                # the write itself then reports what is wrong with --out
        return where, None


def _available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory this process can still take: MemAvailable, or less where its cgroup's limit
    is tighter; None when unknown."""
    amounts = []
    try:
        with open(meminfo) as f:
            amounts += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        try:
            amounts.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            # Page cache counts in memory.current but is given back under pressure.
            cache = next((int(line.split()[1]) for line in (cgroup / "memory.stat").read_text().splitlines()
                          if line.startswith("file ")), 0)
            amounts.append(int(limit) - used + cache)
    except (OSError, ValueError, IndexError):
        pass
    return min(amounts) if amounts else None


def _round_down(value: float) -> float:
    """value rounded down to two significant digits (so that the scale named does fit)."""
    if not value > 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return math.floor(value / step) * step


def _human(n: float) -> str:
    """'about 184 MB'; beyond what a float counts, 'over 1e+308 B'."""
    if not math.isfinite(n):
        return "over 1e+308 B"
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000:
            return f"about {n:.3g} {unit}"
        n /= 1000
    return f"about {n:.3g} EB"


# ---------------------------------------------------------------- dialogue structure

def _layout(info: DatasetInfo, recipe: Recipe, scale: float, rng: np.random.Generator) -> _Layout:
    n_train = max(2, round(recipe.n_train * scale))
    n_test = max(1, round(recipe.n_test * scale))
    lengths = np.concatenate([
        _lengths(n_train, recipe.utt_train / recipe.n_train, recipe, rng),
        _lengths(n_test, recipe.utt_test / recipe.n_test, recipe, rng)])
    ids = _dialogue_ids(info.name, n_train, n_test)
    speakers = [_turns(int(n), recipe, rng) for n in lengths]
    labels = [_emotions(s, recipe, rng) for s in speakers]
    train_ids, test_ids = ids[:n_train], ids[n_train:]
    n_dev = round(recipe.dev_frac * n_train)
    if info.name == "IEMOCAP":
        # Real split lists are in no particular order; shuffling makes "file order" testable.
        train_ids = [train_ids[i] for i in rng.permutation(n_train)]
        test_ids = [test_ids[i] for i in rng.permutation(n_test)]
    return _Layout(ids=ids, speakers=speakers, labels=labels, train_ids=train_ids,
                   test_ids=test_ids, dev_ids=train_ids[n_train - n_dev:] if n_dev else [])


def _lengths(count: int, mean: float, recipe: Recipe, rng: np.random.Generator) -> np.ndarray:
    """Dialogue lengths with the given mean, clipped to the real range; exact total."""
    lo, hi = recipe.min_len, recipe.max_len
    total = int(np.clip(round(mean * count), lo * count, hi * count))
    draw = rng.gamma(recipe.len_shape, mean / recipe.len_shape, size=count)
    lengths = np.clip(np.rint(draw), lo, hi).astype(np.int64)
    # Nudge random dialogues by one utterance until the total is exact (the real sizes).
    while (diff := total - int(lengths.sum())) != 0:
        step = 1 if diff > 0 else -1
        room = np.flatnonzero(lengths < hi) if step > 0 else np.flatnonzero(lengths > lo)
        pick = rng.choice(room, size=min(abs(diff), len(room)), replace=False)
        lengths[pick] += step
    return lengths


def _dialogue_ids(dataset: str, n_train: int, n_test: int) -> list:
    if dataset == "MELD":
        return list(range(n_train + n_test))
    # IEMOCAP names: sessions 1-4 are train, session 5 is test, as in the real split.
    def name(session: int, i: int) -> str:
        return f"Ses{session:02d}{'FM'[i % 2]}_{('impro', 'script')[i // 2 % 2]}{i // 4 + 1:02d}"
    train = [name(1 + i % 4, i // 4) for i in range(n_train)]
    return train + [name(5, i) for i in range(n_test)]


def _turns(n: int, recipe: Recipe, rng: np.random.Generator) -> np.ndarray:
    """Speaker slot of each utterance: mostly alternating among the dialogue's participants."""
    participants = int(min(n, recipe.max_participants, 2 + rng.poisson(0.6)))
    turns = np.zeros(n, dtype=np.int64)
    turns[0] = rng.integers(participants)
    switches = rng.random(n) < recipe.switch_prob
    others = rng.integers(1, max(participants, 2), size=n)
    for j in range(1, n):
        turns[j] = (turns[j - 1] + others[j]) % participants if switches[j] else turns[j - 1]
    return turns


def _emotions(turns: np.ndarray, recipe: Recipe, rng: np.random.Generator) -> np.ndarray:
    """Emotion labels: a per-speaker Markov chain whose fresh draws follow the dialogue mood."""
    priors = np.asarray(recipe.priors) / sum(recipe.priors)
    mood = (1 - recipe.mood_weight) * priors
    mood[rng.choice(len(priors), p=priors)] += recipe.mood_weight
    fresh = rng.choice(len(priors), size=len(turns), p=mood)
    stay = rng.random(len(turns)) < recipe.stay_prob
    last: dict[int, int] = {}
    labels = np.empty(len(turns), dtype=np.int64)
    for j, speaker in enumerate(turns.tolist()):
        labels[j] = last[speaker] if speaker in last and stay[j] else fresh[j]
        last[speaker] = int(labels[j])
    return labels


# ---------------------------------------------------------------- features

def _features(info: DatasetInfo, recipe: Recipe, layout: _Layout,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All utterances' features, dialogues concatenated in layout order."""
    labels = np.concatenate(layout.labels)
    # Speaker identity is shared by all utterances of one speaker in one dialogue.
    groups = np.concatenate([k * recipe.max_participants + s
                             for k, s in enumerate(layout.speakers)])
    text_proto, audio_proto, visual_proto = _prototypes(recipe, info.n_classes, rng)
    # Some utterances come across as another emotion in every modality (annotators disagree
    # on IEMOCAP/MELD too): this caps what fusing modalities can gain over text alone.
    priors = np.asarray(recipe.priors) / sum(recipe.priors)
    shown = np.where(rng.random(len(labels)) < recipe.ambiguity,
                     rng.choice(len(priors), size=len(labels), p=priors), labels)

    text_latent = text_proto[shown] + rng.standard_normal((len(labels), LATENT_DIM))
    text = _embed(rng, text_latent, TEXT_DIM, noise=0.2, nuisance=_nuisance(rng, len(labels)))
    # Each RoBERTa layer: the shared text vector plus its own noise (deeper = cleaner).
    layers = [text + rng.standard_normal(text.shape, dtype=np.float32) * np.float32(sd)
              for sd in (0.4, 0.35, 0.3, 0.25)]
    glove = _embed(rng, text_latent, recipe.glove_dim, noise=2.0)
    audio = _embed(rng, audio_proto[shown] + rng.standard_normal((len(labels), LATENT_DIM)),
                   info.audio_dim, noise=0.3, nuisance=_nuisance(rng, len(labels), groups),
                   affine=True)
    visual = _embed(rng, visual_proto[shown] + rng.standard_normal((len(labels), LATENT_DIM)),
                    VISUAL_DIM, noise=0.3, nuisance=_nuisance(rng, len(labels), groups),
                    affine=True)
    return {"roberta": layers, "glove": glove, "audio": audio, "visual": visual}


def _prototypes(recipe: Recipe, n_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class means [C, LATENT_DIM] of text, audio and visual (the latent noise std is 1)."""
    text = recipe.text_strength * _unit_rows(rng, n_classes)
    for a, b in recipe.blur_pairs:
        text[b] = text[a] + recipe.text_blur * (text[b] - text[a])
    audio = (recipe.audio_strength * _unit_rows(rng, n_classes)
             + recipe.arousal_strength * np.outer(recipe.arousal, _unit_rows(rng, 1)[0]))
    visual = recipe.visual_strength * _unit_rows(rng, n_classes)
    return text, audio, visual


def _unit_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    v = rng.standard_normal((rows, LATENT_DIM))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _nuisance(rng: np.random.Generator, rows: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Label-free latent structure larger than the signal, as in real features.

    With `groups` (speaker of each utterance, per dialogue) part of it is a speaker identity
    shared by that speaker's utterances; since emotions persist, it is a confound to overfit.
    """
    out = UTTERANCE_NUISANCE * rng.standard_normal((rows, NUISANCE_DIM))
    if groups is not None:
        out += SPEAKER_NUISANCE * rng.standard_normal((groups.max() + 1, NUISANCE_DIM))[groups]
    return out


def _embed(rng: np.random.Generator, latent: np.ndarray, dim: int, noise: float,
           nuisance: np.ndarray | None = None, affine: bool = False) -> np.ndarray:
    """Random linear embedding of latent (+ nuisance) into `dim` features plus Gaussian noise."""
    n, k = latent.shape
    out = latent.astype(np.float32) @ (rng.standard_normal((k, dim), dtype=np.float32)
                                       / np.float32(np.sqrt(k)))
    if nuisance is not None:
        out += nuisance.astype(np.float32) @ (rng.standard_normal((nuisance.shape[1], dim),
                                                                  dtype=np.float32)
                                              / np.float32(np.sqrt(nuisance.shape[1])))
    out += rng.standard_normal((n, dim), dtype=np.float32) * np.float32(noise)
    if affine:
        # Hand-crafted acoustic/face descriptors have per-dimension scales and offsets.
        out *= np.exp(0.5 * rng.standard_normal(dim)).astype(np.float32)
        out += rng.standard_normal(dim).astype(np.float32)
    return out


# ---------------------------------------------------------------- public tuple layouts

def _per_dialogue(layout: _Layout, block: np.ndarray, as_rows: bool) -> dict:
    """Split an utterance block by dialogue: {id: [vector, ...]} or {id: (n, d) array}."""
    out, start = {}, 0
    for vid, labels in zip(layout.ids, layout.labels):
        part = block[start:start + len(labels)]
        out[vid] = list(part) if as_rows else part
        start += len(labels)
    return out


def _iemocap_tuples(layout: _Layout, feats: dict) -> tuple[tuple, tuple]:
    speakers = {vid: ["MF"[s] for s in turns.tolist()]
                for vid, turns in zip(layout.ids, layout.speakers)}
    labels = {vid: lab.tolist() for vid, lab in zip(layout.ids, layout.labels)}
    utt_ids = {vid: [f"{vid}_{spk}{j:03d}" for j, spk in enumerate(speakers[vid])]
               for vid in layout.ids}
    sentences = _sentences(layout)
    feature_tuple = (utt_ids, speakers, labels,
                     _per_dialogue(layout, feats["glove"], as_rows=True),
                     _per_dialogue(layout, feats["audio"], as_rows=True),
                     _per_dialogue(layout, feats["visual"], as_rows=True),
                     sentences, layout.train_ids, layout.test_ids)
    dev = set(layout.dev_ids)
    roberta_tuple = (speakers, labels,
                     *[_per_dialogue(layout, r, as_rows=False) for r in feats["roberta"]],
                     sentences, [v for v in layout.train_ids if v not in dev], layout.test_ids,
                     layout.dev_ids)
    return feature_tuple, roberta_tuple


def _meld_tuples(layout: _Layout, feats: dict, rng: np.random.Generator) -> tuple[tuple, tuple]:
    eye = np.eye(DATASETS["MELD"].n_speakers, dtype=np.int64)
    speakers = {vid: eye[turns].tolist() for vid, turns in zip(layout.ids, layout.speakers)}
    labels = {vid: lab.tolist() for vid, lab in zip(layout.ids, layout.labels)}
    # Sentiment (0 neutral, 1 positive, 2 negative) follows the emotion; surprise goes either way.
    sentiment_of = np.array([0, 1, 2, 2, 1, 2, 2])
    sentiment = {}
    for vid, lab in zip(layout.ids, layout.labels):
        value = sentiment_of[lab]
        value[lab == 1] = rng.integers(1, 3, size=int((lab == 1).sum()))
        sentiment[vid] = value.tolist()
    utt_ids = {vid: list(range(len(lab))) for vid, lab in zip(layout.ids, layout.labels)}
    sentences = _sentences(layout)
    feature_tuple = (utt_ids, speakers, labels,
                     _per_dialogue(layout, feats["glove"], as_rows=True),
                     _per_dialogue(layout, feats["audio"], as_rows=True),
                     _per_dialogue(layout, feats["visual"], as_rows=True),
                     sentences, layout.train_ids, layout.test_ids, sentiment)
    dev = set(layout.dev_ids)
    roberta_tuple = (speakers, labels, sentiment,
                     *[_per_dialogue(layout, r, as_rows=False) for r in feats["roberta"]],
                     sentences, [v for v in layout.train_ids if v not in dev], layout.test_ids,
                     layout.dev_ids)
    return feature_tuple, roberta_tuple


def _sentences(layout: _Layout) -> dict:
    return {vid: [f"synthetic utterance {j + 1} of dialogue {vid}" for j in range(len(lab))]
            for vid, lab in zip(layout.ids, layout.labels)}


def _dump(value: tuple, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(value, f, protocol=PICKLE_PROTOCOL)


# ---------------------------------------------------------------- modality-imbalance probe

def probe(dataset: str, data_dir: str | Path) -> dict[str, float]:
    """Test weighted F1 of a per-utterance logistic regression on each modality and on all three.

    Text is the mean of the four RoBERTa layers; features are standardised on train. A quick
    check that the data has the intended imbalance (text > audio > visual, all > text).
    """
    # sklearn is only needed here; importing it lazily keeps generation fast to start.
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    conversations = load_conversations(dataset, data_dir)

    def modalities(split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        dialogues = conversations.splits[split]
        feats = {"text": np.concatenate([d.text.mean(axis=1) for d in dialogues]),
                 "audio": np.concatenate([d.audio for d in dialogues]),
                 "visual": np.concatenate([d.visual for d in dialogues])}
        feats["all"] = np.concatenate(list(feats.values()), axis=1)
        return feats, np.concatenate([d.labels for d in dialogues])

    (train, y_train), (test, y_test) = modalities("train"), modalities("test")
    scores = {}
    # One BLAS thread: on small shared CPU boxes lbfgs with more threads ran 5-10x slower.
    with threadpool_limits(limits=1, user_api="blas"):
        for name in train:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.001, max_iter=500))
            model.fit(train[name], y_train)
            scores[name] = float(f1_score(y_test, model.predict(test[name]), average="weighted"))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dataloader.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--Dataset", required=True, choices=sorted(RECIPES))
    parser.add_argument("--out", help="folder that receives <Dataset>_features/")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the real dialogue counts (default 1: real size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace pickles already in --out even when they differ (they may be real features)")
    parser.add_argument("--probe", action="store_true",
                        help="instead of generating, score per-modality logistic regressions "
                             "on the data in --data-dir")
    parser.add_argument("--data-dir", help="with --probe: folder holding <Dataset>_features/ (default: as "
                                           "training finds it, the current folder, else the repository's data/)")
    parser.add_argument("--json", action="store_true", help="with --probe: print one JSON object")
    args = parser.parse_args(argv)
    if args.probe:
        return _probe_main(args)
    try:
        if not args.out:
            parser.error("--out is required (or use --probe [--data-dir DIR])")
        if not 0 < args.scale < float("inf"):
            parser.error(f"--scale must be a positive number, got {args.scale}")
        if args.seed < 0:
            parser.error(f"--seed must be non-negative, got {args.seed}")
        start = time.perf_counter()
        folder = generate(args.Dataset, args.out, scale=args.scale, seed=args.seed, overwrite=args.overwrite)
        print(f"wrote {folder} in {time.perf_counter() - start:.1f} s")
        return 0
    except (DataError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:          # --out not a folder, not writable, a full disk
        print(f"error: --out {args.out}: cannot write {exc.filename or args.out} ({exc.strerror})", file=sys.stderr)
        return 2


def _probe_main(args: argparse.Namespace) -> int:
    """--probe: it only reads, so a failure names --data-dir (when given) and what cannot be read."""
    flag = f"--data-dir {args.data_dir}: " if args.data_dir else ""
    try:
        scores = probe(args.Dataset, find_data_dir(args.Dataset, args.data_dir))
    except DataUnreadable as exc:
        print(f"error: {flag}{exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {flag}cannot read {exc.filename or args.data_dir or 'the data'}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"dataset": args.Dataset, "weighted_f1": scores}))
    else:
        for name, value in scores.items():
            print(f"{args.Dataset} {name:<7} test weighted F1 {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
