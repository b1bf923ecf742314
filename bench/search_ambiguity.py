"""How many gallery images a relation-blind shortlist key cannot tell from a query's true image.

For the caption queries ``bench/bench_search.py`` draws (seed 0), counts the test images that hold
every object the caption names with the attributes it gives them, relations ignored: a perfect
bag-of-objects key scores all of them alike, so when a query has more than K' of them its true image
may miss the shortlist whatever the key. Prints the median count and the share of queries above 100
and 1,000.

Usage: python bench/search_ambiguity.py DATA_FOLDER QUERIES   (e.g. /tmp/sgfused_bench_search/data_5000 300)
"""

from __future__ import annotations

import json
import sys

import torch


def matching_images(data: str, n_queries: int) -> torch.Tensor:
    """Per query: the number of test images holding all of its objects with their attributes."""
    images = json.load(open(f"{data}/test_ims_graphs.json"))
    captions = json.load(open(f"{data}/test_caps_graphs.json"))
    objects = []
    for graph in images:
        attributes: dict[int, set[str]] = {}
        for node, attribute in graph["attrs"]:
            attributes.setdefault(node, set()).add(attribute)
        objects.append([(label, attributes.get(i, set())) for i, label in enumerate(graph["labels"])])
    queries = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0))[:n_queries].tolist()
    counts = []
    for query in queries:
        caption, tokens = captions[query], captions[query]["tokens"]
        wanted = [(tokens[o], {tokens[a] for node, a in caption["attributes"] if node == o}) for o in caption["objects"]]
        counts.append(sum(all(any(label == w and want <= have for label, have in image) for w, want in wanted)
                          for image in objects))
    return torch.tensor(counts, dtype=torch.float)


if __name__ == "__main__":
    data, n = sys.argv[1], int(sys.argv[2])
    counts = matching_images(data, n)
    print(f"{data}: test images holding a query's objects and attributes (relations ignored): median "
          f"{counts.median():.0f}; more than 100 for {100 * (counts > 100).float().mean():.1f}% of {n} queries, "
          f"more than 1000 for {100 * (counts > 1000).float().mean():.1f}%")
