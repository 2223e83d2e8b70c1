"""Triage of a whole seized directory: every file hashed here, only digests asked.

``icse-gateway query --dir PATH`` walks the tree (:mod:`.walk`), hashes every
regular file in worker processes (:mod:`.workers`; exact digests, and the
perceptual hashes :func:`gateway.filehash.hash_file` computes), remembers what
it hashed (:mod:`.cache`) and asks the federation in batches while the hashing
goes on (:mod:`.run`). The result is one row per file (:mod:`.model`), kept on disk
(:mod:`.store`, never all in memory) and reported by
:mod:`.report` (JSON lines, CSV, the summary on stdout) and :mod:`.report_html`;
:mod:`.command` is the command line's entry. Nothing here is fatal for a file: what cannot be read
or decoded is listed with the reason.
"""

from gateway.triage.cache import HashCache
from gateway.triage.model import DEFAULT_BATCH, MAX_BATCH, FileRow, Hashed, Task
from gateway.triage.result import TriageResult
from gateway.triage.run import CHUNK_FILES, FIRST_BATCH, PENDING_BATCHES, MatchingFederation, Triage
from gateway.triage.store import RowStore

__all__ = ["CHUNK_FILES", "DEFAULT_BATCH", "FIRST_BATCH", "MAX_BATCH", "PENDING_BATCHES", "FileRow", "HashCache",
           "Hashed", "MatchingFederation", "RowStore", "Task", "Triage", "TriageResult"]
