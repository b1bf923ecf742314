"""What ``sgfused index`` and ``sgfused search`` do, given their parsed arguments (sgfused/cli.py wires them)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .index import build_index
from .late import SHORTLIST_BY
from .report import format_results, write_html, write_json
from .search import Searcher


def _device(name: str) -> torch.device:
    from ..train import TrainOptionError, resolve_device

    try:
        return resolve_device(name)
    except TrainOptionError as error:
        raise ValueError(f"--device {error.problem}") from None


def run_index(args: argparse.Namespace) -> None:
    """Build the index and print its manifest's summary."""
    for name in ("batch_size", "captions_per_image"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    manifest = build_index(args.checkpoint, args.data, args.split, args.out, batch_size=args.batch_size,
                           device=_device(args.device), captions_per_image=args.captions_per_image, progress=not args.quiet,
                           shortlist_checkpoint=args.shortlist_checkpoint)
    keys = ("model", "checkpoint", "shortlist", "data", "split", "n_images", "n_captions")
    print(json.dumps({"index": str(args.out), **{key: manifest[key] for key in keys}}, indent=2))


def run_search(args: argparse.Namespace) -> None:
    """Run one query; print the table (with the alignment under --explain or --html), write JSON / HTML when asked."""
    if args.faiss and args.shortlist is None:
        raise ValueError("--faiss needs --shortlist K': faiss only builds the shortlist")
    if args.shortlist_by != "vectors" and args.shortlist is None:
        raise ValueError(f"--shortlist-by {args.shortlist_by} needs --shortlist K': it only picks the shortlist")
    if args.faiss and args.shortlist_by != "vectors":
        raise ValueError(f"--faiss searches global vectors; --shortlist-by {args.shortlist_by} uses SGM's nodes instead")
    use_faiss = True if args.faiss else None
    if args.faiss:
        from .pooled import faiss_available

        if not faiss_available():
            raise ImportError("--faiss: the faiss package is not installed (pip install 'sgfused[faiss]')")
    searcher = Searcher(args.index, args.checkpoint, device=_device(args.device), use_faiss=use_faiss,
                        shortlist_checkpoint=args.shortlist_checkpoint, shortlist_by=args.shortlist_by)
    explain = args.explain or bool(args.html)
    if args.shortlist_by == "late-ivf" and args.caption is not None and not args.quiet:
        print(f"building the late-ivf first stage: k-means over the object nodes of {searcher.index.n_images} images "
              "(once per process; a program that keeps one Searcher pays it once)", file=sys.stderr, flush=True)
    if args.caption is not None:
        result = searcher.by_caption(args.caption, args.top, args.shortlist, explain)
    else:
        result = searcher.by_image(args.image, args.top, args.shortlist, explain)
    print(format_results(result))
    if args.json:
        write_json(args.json, result)
    if args.html:
        write_html(args.html, result, searcher.index.sizes)
        print(f"report -> {args.html}")


def add_arguments(index: argparse.ArgumentParser, search: argparse.ArgumentParser) -> None:
    """The options of the two subcommands."""
    index.add_argument("checkpoint", help="best.pt or last.pt written by `sgfused train` (sgraf, sgm or vsepp)")
    index.add_argument("--data", required=True, help="dataset folder (SCAN precomp layout)")
    index.add_argument("--split", default="test", help="split to index (default test)")
    index.add_argument("--out", required=True, help="index folder to write")
    index.add_argument("--batch-size", type=int, default=128, help="images or captions encoded at once (default 128)")
    index.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    index.add_argument("--captions-per-image", type=int, default=5, help="captions per image in SPLIT_caps.txt (default 5)")
    index.add_argument("--shortlist-checkpoint", metavar="CKPT",
                       help="take the shortlist's global vectors from this trained checkpoint (e.g. VSE++) instead of "
                            "the model's own pooled vectors")

    search.add_argument("index", help="index folder written by `sgfused index`")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--caption", help="text -> image: the images that best match this caption")
    query.add_argument("--image", type=int, help="image -> text: the captions that best match image N of the index")
    search.add_argument("--top", type=int, help="hits to show (default 10, or fewer when the gallery or K' is smaller)")
    search.add_argument("--shortlist", type=int, metavar="K'",
                        help="two stages: keep the K' best by the first stage (--shortlist-by), re-rank them with the full score "
                             "(default: score the whole gallery)")
    search.add_argument("--shortlist-by", choices=SHORTLIST_BY, default="vectors",
                        help="the first stage: the global vectors (default), or, for SGM, late interaction: its object-level "
                             "score S_o plus its relation level pooled, exact (late) or over an inverted file of "
                             "node centroids (late-ivf, text -> image)")
    search.add_argument("--faiss", action="store_true", help="require faiss for the shortlist (default: faiss when installed)")
    search.add_argument("--checkpoint", help="the checkpoint (default: the one recorded in the index; it must have built it)")
    search.add_argument("--shortlist-checkpoint", metavar="CKPT",
                        help="the shortlist key's checkpoint (default: the one recorded in the index; it must have built it)")
    search.add_argument("--explain", action="store_true", help="show each word's most attended regions for every hit")
    search.add_argument("--html", help="write a self-contained HTML report (implies the alignment)")
    search.add_argument("--json", help="write the results as JSON")
    search.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
