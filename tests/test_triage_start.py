"""What a triage costs before and around its first file: worker processes that import only what
they run, and a command line that imports only what the run asks for."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
