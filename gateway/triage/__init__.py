"""Triage of a whole seized device: every file hashed here, only digests asked.

``icse-gateway query --dir PATH`` (repeatable), ``--from-list FILE`` and
``--hashes FILE`` say what to look at (:mod:`.sources`: trees walked by
:mod:`.walk`, listed paths, digest lists read by :mod:`.digests`). Files are
hashed in worker processes under a per-file time limit and a memory limit
(:mod:`.workers`, :mod:`.apart`; exact digests, and the perceptual hashes
:func:`gateway.filehash.hash_file` computes), remembered for resuming
(:mod:`.cache`) and asked of the federation in batches while the hashing goes
on (:mod:`.run`, :mod:`.progress`). Each file's row (:mod:`.model`) is kept on
disk once final (:mod:`.store`, never all in memory; :mod:`.result`) and
reported by :mod:`.report` (JSON lines, CSV, the summary on stdout) and
:mod:`.report_html`; :mod:`.command` is the command line's entry. Nothing here
is fatal for a file: what cannot be read or decoded is listed with the reason.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.triage.asking import FIRST_BATCH, PENDING_BATCHES, MatchingFederation
    from gateway.triage.cache import HashCache
    from gateway.triage.model import DEFAULT_BATCH, MAX_BATCH, FileRow, Hashed, Task
    from gateway.triage.result import TriageResult
    from gateway.triage.run import CHUNK_FILES, Triage
    from gateway.triage.store import RowStore

# Where each name lives. Imported when first asked for, not with the package: a hashing process
# imports a few of its modules (gateway.triage.scan), not the run, the reports and what they need.
_WHERE = {
    "HashCache": "cache", "DEFAULT_BATCH": "model", "MAX_BATCH": "model", "FileRow": "model", "Hashed": "model",
    "Task": "model", "TriageResult": "result", "CHUNK_FILES": "run", "FIRST_BATCH": "asking",
    "PENDING_BATCHES": "asking", "MatchingFederation": "asking", "Triage": "run", "RowStore": "store",
}

__all__ = ["CHUNK_FILES", "DEFAULT_BATCH", "FIRST_BATCH", "MAX_BATCH", "PENDING_BATCHES", "FileRow", "HashCache",
           "Hashed", "MatchingFederation", "RowStore", "Task", "Triage", "TriageResult"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
