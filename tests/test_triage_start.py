"""What a triage costs before and around its first file: worker processes that import only what
they run, and a command line that imports only what the run asks for."""

from __future__ import annotations

import gc
import io
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

from rich.console import Console

from gateway import filehash, triage
from gateway.config import NodeEntry
from gateway.results import NodeAnswer, NodeStatus
from gateway.triage import scan, workers
from gateway.triage.progress import LiveProgress
from tests import media as draw

ROOT = Path(__file__).resolve().parents[1]


def test_no_hashing_process_imports_the_main_module(tmp_path: Path) -> None:
    """Every worker of a pool, also those started on demand after the first, leaves the main
    module alone (for the command line: gRPC, the reports and the rest, for nothing it runs)."""
    marker = tmp_path / "imported"
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import sys

        if __name__ != "__main__":  # a worker importing the main module: as "__mp_main__"
            with open({str(marker)!r}, "a") as out:
                out.write(f"{{os.getpid()}}\\n")

        if __name__ == "__main__":
            sys.path.insert(0, {str(ROOT)!r})
            from gateway.triage import workers

            pool = workers.new_pool(2)
            pids = set()
            for _ in range(200):  # the second worker starts once the first is busy
                pids |= {{future.result() for future in [pool.submit(os.getpid) for _ in range(20)]}}
                if len(pids) == 2:
                    break
            pool.shutdown()
            print(len(pids))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"
    assert not marker.exists(), f"workers {marker.read_text().split()} imported the main module"


def _loaded(code: str, *modules: str) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_command_line_loads_only_what_a_run_uses() -> None:
    """libsodium (private matching, only with a node that offers it), the metrics library
    (--metrics-file, never with --dir), rich's tables (the terminal's summary) and progress bar
    (a terminal's) are loaded when used, not by every start."""
    assert _loaded("import gateway.cli", "rbcl", "federation.oprf", "prometheus_client", "rich.table",
                   "rich.progress") == []


def test_hashing_processes_preload_no_numpy() -> None:
    """The fork server imports what every worker runs; numpy only comes with the first image."""
    assert _loaded(f"import {', '.join(workers.PRELOAD)}", "numpy", "PIL", "pdqhash", "grpc") == []


def test_triage_without_private_matching_never_loads_libsodium(federation, tmp_path: Path) -> None:
    """A whole run against nodes that offer no private matching: libsodium is never loaded."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for number in range(20):
        (tree / f"file{number}.bin").write_bytes(number.to_bytes(4, "big") * 1000)
    wrapper = ("import atexit, runpy, sys\n"
               "atexit.register(lambda: sys.stderr.write('LOADED ' + ' '.join(m for m in ('rbcl', 'federation.oprf') "
               "if m in sys.modules) + '\\n'))\n"
               "sys.argv = ['icse-gateway', *sys.argv[1:]]\n"
               "runpy.run_module('gateway.cli', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", wrapper, "query", "--config", str(federation.config), "--case",
                           "START/1", "--format", "json", "--dir", str(tree), "--no-cache", "--jobs", "2"],
                          capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    assert done.returncode == 1, done.stderr  # no hit, every node answered
    summary = json.loads(done.stdout)["summary"]
    assert (summary["files"], summary["hashed_now"], summary["nodes_complete"]) == (20, 20, summary["nodes"])
    loaded = [line for line in done.stderr.splitlines() if line.startswith("LOADED")]
    assert loaded == ["LOADED "], done.stderr


def test_plain_only_scan_leaves_media_and_odd_files_to_the_workers(tmp_path: Path) -> None:
    """What the run's own process reads while its workers start: plain files, hashed as a worker
    hashes them; an image (by name or by content), a FIFO, a link are left for the workers."""
    (tmp_path / "a.txt").write_bytes(b"plain text " * 500)
    draw.save_jpeg(draw.drawing(1, (160, 120)), tmp_path / "b.jpg", 85)
    (tmp_path / "c.bin").write_bytes((tmp_path / "b.jpg").read_bytes())  # an image by its content only
    os.mkfifo(tmp_path / "d.fifo")
    (tmp_path / "e.link").symlink_to(tmp_path / "a.txt")
    (tmp_path / "f.bin").write_bytes(bytes(range(256)) * 40)
    names = sorted(p.name for p in tmp_path.iterdir())
    early = scan.scan([(str(tmp_path), names)], False, None, 0, None, "", True)
    whole = scan.scan([(str(tmp_path), names)], False, None, 0, None, "")
    assert [names[p] for p in early.plain] == ["a.txt", "f.bin"]
    assert [names[p] for p in early.rest] == ["b.jpg", "c.bin", "d.fifo", "e.link"] and not early.others
    assert (early.plain, early.digests, early.sizes) == (whole.plain, whole.digests, whole.sizes)
    assert sorted(p for p, *_ in whole.others) == early.rest and not whole.rest
    expected = filehash.exact_and_head(tmp_path / "a.txt")[0]
    assert early.digests[0] == b"".join(expected[name] for name, _ in filehash.exact_kinds())


def test_decoding_in_a_worker_does_not_fault_in_fresh_memory_per_image(tmp_path: Path) -> None:
    """A decoder's buffers (a few hundred KB per image) are reused from one image to the next in a
    hashing process, not mapped and unmapped each time (over 500 page faults, a millisecond of system
    time per image: as much as the decoding itself)."""
    for number in range(60):
        draw.save_jpeg(draw.drawing(number, (320, 240)), tmp_path / f"img{number:02d}.jpg", 85)
    names = sorted(p.name for p in tmp_path.iterdir())
    pool = workers.new_pool(1)
    try:
        pool.submit(scan.scan, [(str(tmp_path), names[:10])], False, None, 0, None, "").result()
        before = pool.submit(resource.getrusage, resource.RUSAGE_SELF).result()
        found = pool.submit(scan.scan, [(str(tmp_path), names[10:])], False, None, 0, None, "").result()
        after = pool.submit(resource.getrusage, resource.RUSAGE_SELF).result()
    finally:
        pool.shutdown()
    assert len(found.others) == 50 and all(fields[0] for _, fields, _ in found.others)  # hashed, PDQ included
    assert (after.ru_minflt - before.ru_minflt) / 50 < 50


class _NoHits:
    async def match(self, items, case, timeout=None, deadline=None):
        return [NodeAnswer("FR", "FR", NodeStatus.NO_HIT, hits=((),) * len(items), truncated=(False,) * len(items))]


async def test_a_run_in_process_hashes_everything_and_leaves_the_collector_as_it_found_it(tmp_path: Path) -> None:
    """The first files read by the run's own process, the rest by the workers, an image by a worker
    only; the collector's settings for the run (fewer passes over the waiting hashes) end with it."""
    for number in range(600):
        (tmp_path / f"f{number:03d}.bin").write_bytes(number.to_bytes(2, "big") * (number + 1))
    draw.save_jpeg(draw.drawing(3, (160, 120)), tmp_path / "pic.jpg", 85)
    before = gc.get_threshold()
    run = triage.Triage(str(tmp_path), "START", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=2, batch=100)
    result = await run.run(_NoHits())
    rows = {Path(r.path).name: r for r in result.store.rows()}
    assert len(rows) == 601 and all(r.status == "hashed" for r in rows.values())
    for name in ("f000.bin", "f599.bin"):
        assert rows[name].hashes.exact == filehash.exact_and_head(tmp_path / name)[0]
    assert rows["pic.jpg"].hashes.pdq is not None
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    result.store.close()


def test_progress_line_on_a_terminal_and_nothing_elsewhere() -> None:
    """Shown on a terminal (rich's progress imported then); otherwise nothing, for no cost."""
    shown = io.StringIO()
    with LiveProgress(Console(file=shown, force_terminal=True, width=200), True) as progress:
        progress.update(description="hashing", total=10, completed=4, known=1, hits=2, items=30, cached=0)
    assert "hashing" in shown.getvalue() and "files hashed" in shown.getvalue()
    silent = io.StringIO()
    with LiveProgress(Console(file=silent), False) as progress:
        progress.update(description="hashing", total=10, completed=4)
    assert silent.getvalue() == ""
