"""Video matching over per-frame PDQ hashes, following vPDQ's rule.

A stored video is a sequence of frame hashes. A query video matches it when
at least ``min_share`` of the query's frames have a near match (within the
item's distance) among that video's frames. All frames of all stored videos
sit in one Hamming index, so a query costs one batched search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from federation.algorithms import Algorithm
from node.index import Candidate, Index, hits_of

HammingFactory = Callable[[Algorithm, Sequence[int], Sequence[bytes]], Index]


def split_frames(algorithm: Algorithm, digest: bytes) -> list[bytes]:
    size = algorithm.digest_size
    return [digest[i : i + size] for i in range(0, len(digest), size)]


class FrameIndex:
    def __init__(self, algorithm: Algorithm, ids: Sequence[int], digests: Sequence[bytes],
                 hamming: HammingFactory):
        self._algorithm = algorithm
        self._videos = len(ids)
        frames: list[bytes] = []
        owners: list[int] = []
        for record_id, digest in zip(ids, digests, strict=True):
            video_frames = split_frames(algorithm, digest)
            frames += video_frames
            owners += [record_id] * len(video_frames)
        # The frame index returns positions; owners maps them to videos.
        self._owners = np.asarray(owners, dtype=np.int64)
        self._frames = hamming(algorithm, list(range(len(frames))), frames)

    @classmethod
    def from_parts(cls, algorithm: Algorithm, videos: int, owners: np.ndarray, frames: Index) -> FrameIndex:
        """An index over frames already indexed (loaded from a segment's files): no build."""
        index = cls.__new__(cls)
        index._algorithm, index._videos, index._owners, index._frames = algorithm, videos, owners, frames
        return index

    @property
    def owners(self) -> np.ndarray:
        """The stored video (record id) of each indexed frame."""
        return self._owners

    @property
    def frames(self) -> Index:
        return self._frames

    def __len__(self) -> int:
        return self._videos

    @property
    def nbytes(self) -> int:
        return self._owners.nbytes + getattr(self._frames, "nbytes", 0)

    def search(self, digests: Sequence[bytes], max_distance: Sequence[int]) -> list[list[Candidate]]:
        queries = [split_frames(self._algorithm, d) for d in digests]
        flat = [frame for frames in queries for frame in frames]
        distances = [d for frames, d in zip(queries, max_distance, strict=True) for _ in frames]
        found = self._frames.search(flat, distances) if flat else []
        results, start = [], 0
        for frames in queries:
            results.append(self._videos_for(found[start : start + len(frames)], len(frames)))
            start += len(frames)
        return results

    def hits(self, digests: Sequence[bytes] | np.ndarray, max_distance: Sequence[int]) -> dict[int, list[Candidate]]:
        return hits_of(self.search(list(digests), max_distance))

    def _videos_for(self, per_frame: Sequence[Sequence[Candidate]], count: int) -> list[Candidate]:
        # For each stored video: the best distance of each query frame that hit it.
        best: dict[int, dict[int, int]] = {}
        for position, candidates in enumerate(per_frame):
            for candidate in candidates:
                video = int(self._owners[candidate.record_id])
                frames = best.setdefault(video, {})
                frames[position] = min(frames.get(position, candidate.distance), candidate.distance)
        matches = []
        for video, frames in best.items():
            share = len(frames) / count
            if share >= self._algorithm.min_share:
                distance = int(np.median(list(frames.values())))
                matches.append(Candidate(video, distance, round(share, 4)))
        return matches
