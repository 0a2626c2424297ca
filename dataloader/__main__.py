"""Validate a dataset folder and summarise it.

    python -m dataloader --Dataset IEMOCAP|MELD [--data-dir DIR] [--json]

Exit status 0 when the data loads, 2 with a one-line error (no traceback) when it does not.
"""
from __future__ import annotations

import argparse
import json
import sys

from utils.errors import OneLineParser, stdout_gone

from .datasets import DATASETS, Conversations, DataError, find_data_dir, load_conversations


def summary(conversations: Conversations) -> dict:
    """The JSON summary: dialogues/utterances per split, dims, class counts, speakers."""
    splits = conversations.splits
    return {
        "dataset": conversations.dataset,
        "splits": {name: {"dialogues": len(dialogues),
                          "utterances": conversations.utterances(name)}
                   for name, dialogues in splits.items()},
        "dims": conversations.dims,
        "class_counts": {name: conversations.class_counts(name).tolist() for name in splits},
        "speakers": conversations.n_speakers,
    }


def _print_table(conversations: Conversations) -> None:
    names = conversations.class_names
    print(f"{conversations.dataset}: {conversations.files[0]}")
    print(f"{' ' * len(conversations.dataset)}  {conversations.files[1]}")
    dims = conversations.dims
    print(f"dims: text 4 x {dims['text']}, audio {dims['audio']}, visual {dims['visual']}; "
          f"speaker slots: {conversations.n_speakers}")
    print(f"{'split':<6} {'dialogues':>9} {'utterances':>10} {'longest':>7}  "
          + " ".join(f"{n:>8}" for n in names))
    for split, dialogues in conversations.splits.items():
        counts = conversations.class_counts(split)
        print(f"{split:<6} {len(dialogues):>9} {conversations.utterances(split):>10} "
              f"{max(len(d) for d in dialogues):>7}  " + " ".join(f"{c:>8}" for c in counts))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dataloader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--Dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data-dir", help="folder holding <Dataset>_features/ (default: as training finds it, "
                                           "the current folder, else the repository's data/)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        conversations = load_conversations(args.Dataset, find_data_dir(args.Dataset, args.data_dir))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps(summary(conversations)))
        else:
            _print_table(conversations)
        sys.stdout.flush()
    except BrokenPipeError:              # `| head`: stop quietly, as Python's own tools do
        stdout_gone()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
