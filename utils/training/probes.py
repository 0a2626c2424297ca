"""Linear probes of a trained run: how much of the emotion each frozen encoder output z_m carries.

For each modality, a logistic regression on the standardised z_m of best.pt (eval mode) over the
run's train split (its train part with --valid), scored on the test split: the measure the
OGM-GE paper uses to show an under-trained encoder. A modality whose probe scores far above its
unimodal head (or the fused model leaning on it little) was left under-used by the fusion.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataloader.datasets import find_data_dir, load_conversations
from dataloader.loaders import make_loaders
from model.checkpoint import read_checkpoint
from model.m3net import M3Net
from utils.dgs.step import utterance_labels
from utils.errors import UserError, first_line
from utils.training.config import build_parser
from utils.training.main import build_model, pick_device

# Fixed so that a probe is a function of the checkpoint and the data alone. C: 1024 features
# against a few hundred to a few thousand utterances overfit at sklearn's default of 1.
PROBE_C = 0.01
PROBE_MAX_ITER = 1000
PROBE_SEED = 0


@dataclass
class ProbeResult:
    scores: dict[str, dict[str, float]]   # modality (--modals order) -> test "acc", "weighted_f1" in percent
    majority_acc: float                   # test accuracy of always answering the train split's commonest class
    chance_acc: float                     # expected test accuracy of guessing by the train split's class shares
    n_train: int                          # utterances fitted on
    n_test: int                           # utterances scored on
    epoch: int                            # best.pt's epoch, counted from 0 as in metrics.jsonl


def linear_probes(checkpoint_path: str | Path, data_dir: str | Path | None = None) -> ProbeResult:
    """Probe every modality of the run whose best.pt is `checkpoint_path`; `data_dir` replaces the
    data folder saved in its flags (data moved since). UserError / DataError for bad input."""
    checkpoint = read_checkpoint(checkpoint_path)
    if "args" not in checkpoint:
        raise UserError(f"{checkpoint_path}: not a checkpoint of this project's training (it has no saved flags)")
    saved = checkpoint["args"]
    # A flag newer than the run is absent from its saved ones: the run had the flag's plain default.
    args = argparse.Namespace(**{**vars(build_parser(saved["Dataset"], {}).parse_args([])), **saved})
    data = load_conversations(args.Dataset, find_data_dir(args.Dataset, data_dir or args.data_dir))
    loaders = make_loaders(data, args.batch_size, valid_frac=args.valid, seed=args.seed, shuffle_train=False)
    model = build_model(args, data)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise UserError(f"{checkpoint_path}: its weights do not fit the model its saved flags build "
                        f"({first_line(e)})") from None
    device = pick_device(args)
    model.to(device).eval()
    train, y_train = encoder_outputs(model, loaders["train"], device, "probe features: train")
    test, y_test = encoder_outputs(model, loaders["test"], device, "probe features: test")
    scores = {}
    # One BLAS thread: on small shared CPU boxes lbfgs with more threads ran several times slower.
    with threadpool_limits(limits=1, user_api="blas"):
        for m in args.modals:
            probe = make_pipeline(StandardScaler(),
                                  LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=PROBE_SEED))
            predicted = probe.fit(train[m], y_train).predict(test[m])
            scores[m] = {"acc": 100 * accuracy_score(y_test, predicted),
                         "weighted_f1": 100 * f1_score(y_test, predicted, average="weighted", zero_division=0)}
    train_shares = np.bincount(y_train, minlength=data.n_classes) / len(y_train)
    test_shares = np.bincount(y_test, minlength=data.n_classes) / len(y_test)
    return ProbeResult(scores, majority_acc=100 * float(test_shares[train_shares.argmax()]),
                       chance_acc=100 * float(train_shares @ test_shares), n_train=len(y_train), n_test=len(y_test),
                       epoch=int(checkpoint["epoch"]))


@torch.no_grad()
def encoder_outputs(model: M3Net, loader: DataLoader, device: torch.device,
                    desc: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each modality's z_m of the real utterances [N, 1024], and their labels [N], in loader order."""
    features: dict[str, list[torch.Tensor]] = {m: [] for m in model.cfg.modalities}
    labels = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        batch = batch.to(device)
        out = model(batch)
        for m, z in out.encoded.items():
            features[m].append(out.graph.gather_utterances(z).float().cpu())
        labels.append(utterance_labels(batch, out).cpu())
    return {m: torch.cat(parts).numpy() for m, parts in features.items()}, torch.cat(labels).numpy()
