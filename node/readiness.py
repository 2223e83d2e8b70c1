"""Start-up readiness: the search kernels compiled before the node says it is
ready, and systemd told so (``Type=notify``).

The compiled kernels are cached on disk by numba in ``NUMBA_CACHE_DIR``, which
must be set before numba is first imported: ``numba_cache_dir`` chooses it (the
node's state directory, which the systemd unit makes writable) and the CLI
sets it before importing anything that imports numba.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from federation.algorithms import PDQ

CACHE_VARIABLE = "NUMBA_CACHE_DIR"


def numba_cache_dir(store: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """Where compiled kernels are cached: as set in the environment, else beside the store."""
    return Path(environ.get(CACHE_VARIABLE) or store.parent / "numba-cache")


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Sends ``state`` (``READY=1``, ``STOPPING=1``) to systemd's notify socket, if
    there is one (sd_notify's protocol: one datagram). Whether it was sent."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def warm_up() -> None:
    """Runs searches through each kernel with the array types a mapped segment
    has (read-only memory maps), so the first real query pays no compilation.

    The multi-index's tables are left empty (every bucket empty is a valid
    index): the point is the types, and building real tables would compile
    the build kernel too, which only an import needs.
    """
    from node import exact_kernels, hamming_index  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set

    exact_kernels.warm()

    rows = 64
    digests = np.random.default_rng(0).integers(0, 256, (rows, PDQ.digest_size), dtype=np.uint8)
    scan = hamming_index.ScanHammingIndex(PDQ, np.arange(rows), digests).arrays()
    multi = {**scan, "offsets": np.zeros((hamming_index.TABLES, hamming_index.BUCKETS + 1), dtype=np.uint32),
             "positions": np.zeros((hamming_index.TABLES - 1, rows), dtype=np.uint32)}
    with tempfile.TemporaryDirectory(prefix="icse-warm-up-") as directory:
        for kind, arrays in (("scan", scan), ("multi", multi)):
            mapped = {}
            for name, array in arrays.items():
                path = Path(directory) / f"{kind}.{name}.npy"
                np.save(path, array)
                mapped[name] = np.load(path, mmap_mode="r")
            hamming_index.load_hamming_index(mapped).search([digests[0].tobytes(), digests[1].tobytes()], [31, 64])
