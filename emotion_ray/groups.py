"""Groups of pictures that must share a split: exact copies, near-duplicates, and the user's own groups.

Three relations put two pictures in one group, and a group is their union (connected components
of the graph they make, scipy.sparse.csgraph):
- the same bytes (sha256 `content_hash`), as the plain hash split always did;
- near-duplicates: perceptual hashes within `near_duplicate_distance` bits (Hamming distance);
- the same user group key: `group_pattern`'s first capture group on the file's path within its
  class folder, or the `group` of the file's row in the `group_file` CSV (both: both relations).
  One person, source or session then never sits in two splits.

The perceptual hash is pHash as imagehash computes it (imagehash.phash, 64 bits: the sign of the
8x8 lowest-frequency DCT coefficients of a 32x32 grey thumbnail against their median; the
method of Zauner 2010, "Implementation and Benchmarking of Perceptual Image Hash Functions", as
Krawetz's "Looks Like It" (hackerfactor.com, 2011) and imagehash's documentation describe it).

A group's split comes from the sha256 of its key (the smallest user key in it, else its smallest
content hash), mapped to [0, 1) as prepare_tasks.split_of does; a file in no group keeps its own sha256,
so it gets exactly the split the plain hash split gives it. Deterministic (input order plays no
part) and stable as data grows: a group moves only when a new picture joins it with a smaller
key or bridges it to another group, and a user group (a person) never moves.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

# Pictures are box-reduced by a whole factor to no less than this many pixels on the shorter
# side before imagehash sees them (as JPEG draft decoding does): much faster, and the hash
# barely moves (figures: README, "What pHash catches").
PHASH_INPUT_SIDE = 64
# Pairs are compared in blocks of at most this many (rows x columns): 32 MiB of XORs at a time.
PAIR_BLOCK = 1 << 22


def perceptual_hash(picture: np.ndarray) -> int:
    """pHash (imagehash.phash, 64 bits) of an (H, W, 3) uint8 RGB picture, as an unsigned int
    (the hash's bits in row-major order, most significant first: imagehash's hex string)."""
    import imagehash
    from PIL import Image

    image = Image.fromarray(picture)
    factor = min(image.size) // PHASH_INPUT_SIDE
    if factor >= 2:
        image = image.reduce(factor)
    return int(str(imagehash.phash(image)), 16)


def near_duplicate_pairs(hashes: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of `hashes` (uint64) whose Hamming distance is at most `distance` bits.

    Every pair is compared (vectorised XOR and popcount, a block of rows at a time, into buffers
    allocated once): O(n²). Pass distinct values (plan_groups does) to keep n small.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    step = max(1, PAIR_BLOCK // max(n, 1))
    xor, bits, near = np.empty(step * n, np.uint64), np.empty(step * n, np.uint8), np.empty(step * n, np.bool_)
    firsts, seconds = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, n, step):
        block = hashes[start:start + step]
        shape = (len(block), n - start)  # this block's rows against itself and every later row
        size = shape[0] * shape[1]
        np.bitwise_xor(block[:, None], hashes[None, start:], out=xor[:size].reshape(shape))
        np.bitwise_count(xor[:size].reshape(shape), out=bits[:size].reshape(shape))
        rows, cols = np.nonzero(np.less_equal(bits[:size].reshape(shape), distance, out=near[:size].reshape(shape)))
        keep = cols > rows  # the upper triangle: each pair once, no picture with itself
        firsts.append(rows[keep] + start)
        seconds.append(cols[keep] + start)
    return np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)


def components(n: int, firsts: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """The connected component of each of `n` nodes joined by the edges firsts[k] -- seconds[k]."""
    if n == 0:
        return np.zeros(0, np.int64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(firsts), np.int8), (firsts, seconds)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def pattern_key(pattern: re.Pattern[str] | None, path_in_class: str) -> str | None:
    """`pattern`'s first capture group searched in a file's path within its class folder
    ('/'-separated, e.g. `alice_03.jpg` or `session2/img1.jpg`); None when it does not match
    or the group is empty."""
    if pattern is None:
        return None
    found = pattern.search(path_in_class)
    return (found.group(1) or None) if found else None


def read_group_file(data: bytes, name: str) -> dict[str, str]:
    """The `path` -> `group` rows of a group CSV (UTF-8, a header row naming both columns; other
    columns are ignored, rows with an empty group skipped). ValueError naming `name` when it is
    not such a CSV or gives one path two groups."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"group_file {name} is not UTF-8 text: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"path", "group"} <= {f.strip() for f in reader.fieldnames}:
        raise ValueError(f"group_file {name} needs a header row with `path` and `group` columns, "
                         f"found {reader.fieldnames}")
    groups: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        path, group = _normal_path(row.get("path", "")), row.get("group", "")
        if not path or not group:
            continue
        if groups.setdefault(path, group) != group:
            raise ValueError(f"group_file {name} line {line}: {path} is given two groups "
                             f"({groups[path]!r} and {group!r})")
    return groups


def _normal_path(path: str) -> str:
    while path.startswith("./"):
        path = path[2:]
    return path


@dataclass
class UserKeys:
    """The user's group keys of each listed file (by URI), and how many listed files and CSV rows matched."""

    by_path: dict[str, tuple[str, ...]] = field(default_factory=dict)
    file_rows_unmatched: int = 0


def user_keys(names: dict[str, tuple[str, str, str]], pattern: str | None,
              file_groups: dict[str, str] | None) -> UserKeys:
    """Each listed file's group keys. `names`: URI (as the `path` column writes it) -> (its real
    name, path relative to its input root, path within its class folder). The pattern sees the
    path within the class folder; a CSV row matches a file by its full name or its path
    relative to its input root."""
    compiled = re.compile(pattern) if pattern else None
    keys = UserKeys()
    matched: set[str] = set()
    for uri, (full, relative, in_class) in names.items():
        found = []
        if (key := pattern_key(compiled, in_class)) is not None:
            found.append(key)
        if file_groups:
            for name in (full, _normal_path(relative)):
                if name in file_groups:
                    matched.add(name)
                    found.append(file_groups[name])
                    break
        if found:
            keys.by_path[uri] = tuple(dict.fromkeys(found))
    if file_groups:
        keys.file_rows_unmatched = len(set(file_groups) - matched)
    return keys


def _near_duplicate_edges(nodes: Sequence[int], phashes: Sequence[int | None],
                          distance: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Edges joining pictures (graph nodes) whose pHashes are within `distance`, and how many
    pairs of distinct pictures that is. Pictures with one pHash value are joined to that
    value's first picture, and only distinct values are compared."""
    hash_of_node = {node: value for node, value in zip(nodes, phashes) if value is not None}
    ordered = np.array(sorted(hash_of_node), dtype=np.int64)
    values, first, inverse, count = np.unique(np.array([hash_of_node[n] for n in ordered.tolist()], dtype=np.uint64),
                                              return_index=True, return_inverse=True, return_counts=True)
    a, b = near_duplicate_pairs(values, distance)
    representative = ordered[first]
    pairs = int(np.sum(count[a] * count[b]) + np.sum(count * (count - 1) // 2))
    return np.concatenate([ordered, representative[a]]), np.concatenate([representative[inverse], representative[b]]), pairs


@dataclass
class GroupPlan:
    """Each picture's group and split (by path), and the figures the manifest reports."""

    group: dict[str, str]
    split: dict[str, str]
    stats: dict[str, Any]


def plan_groups(paths: Sequence[str], content_hashes: Sequence[str], phashes: Sequence[int | None],
                keys: dict[str, tuple[str, ...]], distance: int, split_of: Callable[[str], str],
                given_splits: Sequence[str | None] | None = None) -> GroupPlan:
    """Group pictures (one entry per file: its path, sha256 hex, pHash or None, and user keys by
    path) and give each group one split: `split_of(hex digest)` of its key's sha256 (of a lone
    file's own sha256), or with
    `given_splits` (split_by folder) each file's own, and then the groups that cross given
    splits are only counted; a file whose given split is None takes its group's. `distance` 0
    turns near-duplicate grouping off.
    """
    digests = sorted(set(content_hashes))
    node_of = {d: i for i, d in enumerate(digests)}
    key_names = sorted({k for ks in keys.values() for k in ks})
    key_node = {k: len(digests) + i for i, k in enumerate(key_names)}
    links = [(node_of[d], key_node[k]) for p, d in zip(paths, content_hashes) for k in keys.get(p, ())]
    firsts = [np.array([a for a, _ in links], np.int64)]
    seconds = [np.array([b for _, b in links], np.int64)]
    near_pairs = 0
    if distance > 0:
        a, b, near_pairs = _near_duplicate_edges([node_of[d] for d in content_hashes], phashes, distance)
        firsts.append(a)
        seconds.append(b)
    label = components(len(digests) + len(key_names), np.concatenate(firsts), np.concatenate(seconds))
    canonical: dict[int, str] = {}
    for name in key_names + digests:  # keys first, each sorted: a component's first name met is its key
        canonical.setdefault(int(label[key_node[name] if name in key_node else node_of[name]]), name)
    # A lone file's point is its own sha256, as without groups. Any other group's is the sha256 of
    # its key: the smallest of several digests is no uniform point (it falls in train too often).
    nodes_in = np.bincount(label, minlength=len(canonical))
    group_split = {c: split_of(key if nodes_in[c] == 1 else hashlib.sha256(key.encode("utf-8")).hexdigest())
                   for c, key in canonical.items()}

    group, split = {}, {}
    members: dict[int, set[str]] = {}
    plain: dict[int, set[str]] = {}
    final: dict[int, set[str]] = {}
    for i, (path, digest) in enumerate(zip(paths, content_hashes)):
        c = int(label[node_of[digest]])
        group[path] = canonical[c]
        # A null given split (split_by folder, a train/ file of an input without val/): the group's own.
        split[path] = given_splits[i] if given_splits is not None and given_splits[i] is not None else group_split[c]
        members.setdefault(c, set()).add(path)
        plain.setdefault(c, set()).add(split_of(digest))
        final.setdefault(c, set()).add(split[path])
    sizes = {c: len(m) for c, m in members.items()}
    stats = {
        "groups": len(members),
        "groups_of_several_pictures": sum(1 for s in sizes.values() if s > 1),
        "largest_group_pictures": max(sizes.values(), default=0),
        "near_duplicate_pairs": near_pairs,
        # What grouping prevents: groups whose pictures' own sha256 splits differ.
        "groups_straddling_hash_split": sum(1 for s in plain.values() if len(s) > 1),
        # 0 when prepare assigns the splits; with given splits (split_by folder), the leaks.
        "groups_across_splits": sum(1 for s in final.values() if len(s) > 1),
        "pictures_with_group_key": sum(1 for p in set(paths) if keys.get(p)),
        "group_keys": len(key_names),
    }
    return GroupPlan(group, split, stats)
