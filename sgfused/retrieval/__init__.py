"""Retrieval for users: index a split once, search it by caption or by image, and show why a pair matched.

    from sgfused.retrieval import build_index, Searcher
    build_index("runs/sgraf/best.pt", "data/synth", "test", "index/")
    result = Searcher("index/").by_caption("a man holding a red cup", top=10, shortlist=100, explain=True)
    print(format_results(result)); write_html("report.html", result)

Modules: :mod:`.index` (the memory-mapped index and its checks), :mod:`.pooled` (global
vectors and the shortlist), :mod:`.late` (SGM's shortlist by late interaction), :mod:`.search` (one- and two-stage search), :mod:`.explain`
(word -> region alignment), :mod:`.report` (table, JSON, HTML).
"""

from .explain import Region, WordAlignment, scan_attention_weights
from .index import GalleryIndex, build_index, checkpoint_fingerprint
from .pooled import SUPPORTED_MODELS, faiss_available
from .report import format_results, write_html, write_json
from .search import Hit, Searcher, SearchResult

__all__ = [
    "GalleryIndex", "Hit", "Region", "SUPPORTED_MODELS", "SearchResult", "Searcher", "WordAlignment", "build_index",
    "checkpoint_fingerprint", "faiss_available", "format_results", "scan_attention_weights", "write_html", "write_json",
]
