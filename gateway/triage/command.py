"""``icse-gateway query --dir``: the options of a triage, checked, and the run they ask for.

:mod:`gateway.cli` turns its command line into :class:`TriageOptions`; nothing
below it sees the argument parser.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from gateway import interrupt
from gateway.triage import digests, report, report_html, sources, workers
from gateway.triage.cache import HashCache, default_cache_path
from gateway.triage.model import DEFAULT_BATCH, MAX_BATCH
from gateway.triage.result import TriageResult
from gateway.triage.run import FILE_TIMEOUT, WORKER_MEMORY, Triage

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.signing import Signer


class TriageUsageError(ValueError):
    """Bad combination of command-line options (reported like other usage errors)."""


@dataclass(frozen=True)
class TriageOptions:
    """What ``query`` was asked, as far as a triage is concerned.

    A triage looks at ``directories`` (``--dir``, repeatable), the paths listed
    in ``from_list`` and the digests listed in ``hashes`` (``-``: stdin). With
    none of them the query is not a triage: the other triage options must then
    be unset, which :meth:`check` says.
    """

    directories: tuple[Path, ...] = ()
    from_list: str | None = None
    hashes: str | None = None
    jobs: int | None = None
    batch: int | None = None
    jsonl: Path | None = None
    csv: Path | None = None
    html: Path | None = None
    cache: Path | None = None
    no_cache: bool = False
    dihedral: bool = False
    max_distance: int = 0
    timeout: float | None = None
    deadline: float | None = None
    officer: str | None = None
    json_summary: bool = False
    file_timeout: float | None = None
    worker_memory: int | None = None  # MB

    @property
    def active(self) -> bool:
        """Whether this query is a triage at all."""
        return bool(self.directories or self.from_list or self.hashes)

    def reports(self) -> dict[str, Path]:
        """The report files asked for, by format."""
        named = {"jsonl": self.jsonl, "csv": self.csv, "html": self.html}
        return {name: path for name, path in named.items() if path is not None}

    def check(self, *, with_digests_or_files: bool = False) -> None:
        """Raises :class:`TriageUsageError` for options that do not go together."""
        if not self.active:
            given = [f"--{name}" for name, value in (("jobs", self.jobs), ("batch", self.batch), ("jsonl", self.jsonl),
                                                     ("csv", self.csv), ("html", self.html), ("cache", self.cache),
                                                     ("file-timeout", self.file_timeout),
                                                     ("worker-memory", self.worker_memory))
                     if value is not None]
            if self.no_cache:
                given.append("--no-cache")
            if given:
                raise TriageUsageError(f"{', '.join(given)} only go with --dir")
            return
        if with_digests_or_files:
            raise TriageUsageError("--dir, --from-list and --hashes cannot be combined with --hash or --file")
        if self.from_list == "-" and self.hashes == "-":
            raise TriageUsageError("--from-list and --hashes cannot both read stdin")
        if self.jobs is not None and not 1 <= self.jobs <= 256:
            raise TriageUsageError("--jobs must be between 1 and 256")
        if self.batch is not None and not 1 <= self.batch <= MAX_BATCH:
            raise TriageUsageError(f"--batch must be between 1 and {MAX_BATCH} items")
        if self.file_timeout is not None and not 0 < self.file_timeout <= 86_400:
            raise TriageUsageError("--file-timeout must be more than 0 and at most 86400 seconds")
        if self.worker_memory is not None and not 256 <= self.worker_memory <= 1 << 24:
            raise TriageUsageError("--worker-memory must be between 256 and 16777216 MB")
        if self.no_cache and self.cache is not None:
            raise TriageUsageError("--cache and --no-cache exclude each other")


def _output_paths(options: TriageOptions) -> dict[str, Path]:
    outputs = options.reports()
    seen: dict[str, str] = {}
    for name, path in outputs.items():
        real = os.path.realpath(path)
        if real in seen:
            raise TriageUsageError(f"--{name} and --{seen[real]} name the same file")
        seen[real] = name
        if path.is_dir():
            raise TriageUsageError(f"--{name} {path}: is a directory")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise TriageUsageError(f"--{name} {path}: directory {parent} does not exist or is not writable")
    return outputs


def _name(source: str | None) -> str:
    return "stdin" if source == "-" else str(source)


def _roots(directories: tuple[Path, ...]) -> list[str]:
    """The real paths of the ``--dir`` trees; none inside another (its files would be listed twice)."""
    roots: list[str] = []
    for directory in directories:
        if not directory.is_dir():
            raise TriageUsageError(f"--dir {directory}: not a directory")
        real = os.path.realpath(directory)
        for other in roots:
            if real == other or real.startswith(other.rstrip(os.sep) + os.sep) or \
                    other.startswith(real.rstrip(os.sep) + os.sep):
                raise TriageUsageError(f"--dir {directory}: the same tree as, or inside, or around --dir {other}")
        roots.append(real)
    return roots


def _digest_list(source: str) -> sources.Reopen:
    """The ``--hashes`` list, checked whole before anything is sent: a bad line is named, nothing is asked."""
    try:
        reopen = sources.reopenable(source)
    except OSError as exc:
        raise TriageUsageError(f"--hashes {source}: {exc.strerror or exc}") from None
    try:
        with reopen() as lines:
            for _ in digests.read(lines, _name(source)):
                pass
    except digests.DigestListError as exc:
        raise TriageUsageError(f"--hashes: {exc}") from None
    return reopen


WRITERS: dict[str, Callable[[TriageResult, Path], None]] = {
    "jsonl": report.write_jsonl, "csv": report.write_csv, "html": report_html.write_html,
}


def command(options: TriageOptions, config: GatewayConfig, case: str, signer: Callable[[], Signer]) -> int:
    """Runs the triage ``options`` ask for; called by :mod:`gateway.cli` once the common options are checked."""
    options.check()
    # The process ends with the command, and on its way out the collector would look once more at
    # everything still alive (gRPC, numpy, the run's objects: a tenth of a second or more, on every
    # run) to free memory the end frees anyway: frozen then, it is skipped.
    atexit.register(gc.freeze)
    if options.directories or options.from_list:
        workers.start_forkserver()  # files to hash: the workers' server starts while the rest is set up
    roots = _roots(options.directories)
    digest_list = _digest_list(options.hashes) if options.hashes else None
    if options.from_list and options.from_list != "-" and not Path(options.from_list).is_file():
        raise TriageUsageError(f"--from-list {options.from_list}: not a readable file")
    root = "; ".join([*roots, *([f"paths listed in {_name(options.from_list)}"] if options.from_list else []),
                      *([f"digests listed in {_name(options.hashes)}"] if options.hashes else [])])
    outputs = _output_paths(options)
    console = Console(stderr=True, highlight=False)
    cache: HashCache | None = None
    exclude = {os.path.realpath(p) for p in outputs.values()}
    if not options.no_cache:
        cache_path = (options.cache or default_cache_path()).absolute()
        exclude |= {os.path.realpath(f"{cache_path}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")}
        try:
            cache = HashCache(cache_path)
        except (sqlite3.Error, OSError) as exc:
            console.print(f"icse-gateway: cache {cache_path} unusable ({exc}): every file is hashed",
                          style="yellow", markup=False)
    who = signer()
    triage = Triage(root, case, config.nodes, jobs=options.jobs, batch=options.batch or DEFAULT_BATCH, cache=cache,
                    dihedral=options.dihedral, max_distance=options.max_distance, timeout=options.timeout,
                    deadline=options.deadline, exclude=frozenset(exclude), progress=sys.stderr.isatty(),
                    console=console, file_timeout=options.file_timeout or FILE_TIMEOUT,
                    worker_memory=(options.worker_memory << 20) if options.worker_memory else WORKER_MEMORY,
                    entries=sources.entries(roots, options.from_list, digest_list, _name(options.hashes)))
    triage.result.gateway = config.gateway_id
    requester = config.requester
    triage.result.requester = " / ".join(x for x in (options.officer or requester.officer, requester.org,
                                                     requester.country) if x)
    try:
        result = interrupt.run(_run(triage, config, who))
    except KeyboardInterrupt:
        if cache is not None:
            console.print(f"interrupted: {triage.result.hashed_now} file(s) hashed in this run are kept in "
                          f"{cache.path}; the same command resumes", markup=False, soft_wrap=True)
        triage.store.close()
        raise
    except BaseException:
        triage.store.close()
        raise
    finally:
        if cache is not None:
            with contextlib.suppress(sqlite3.Error):
                cache.close()
    try:
        for name, path in outputs.items():
            if name == "html":
                report_html.write_html(result, path, outputs)
            else:
                WRITERS[name](result, path)
        if options.json_summary:
            print(json.dumps(report.summary_json(result, outputs), indent=2))
        else:
            report.print_summary(result, Console() if sys.stdout.isatty() else Console(width=160), outputs)
        return result.exit_status()
    finally:
        result.store.close()


async def _run(triage: Triage, config: GatewayConfig, signer: Signer) -> TriageResult:
    from gateway import private  # noqa: PLC0415 - only the run talks to nodes

    async with private.federation(config, signer) as federation:
        return await triage.run(federation)
