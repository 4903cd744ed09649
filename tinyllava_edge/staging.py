"""What every writer of an output folder shares: the destination check, the source record and the
tool versions each one records, and step lines.

Every writer of a folder (export's edge bundle and HF LLaVA folder, the quantization stage's
bundles and GPTQ checkpoints) builds it in a staged folder beside the final path
(tinyllava_edge/atomic.py: staged_folder, replace_folder) and renames it into place only when it
is complete: an interrupted or failed run leaves nothing at the final path. Here, beside the
bundle format (tinyllava_edge/bundle.py), rather than in one stage: export and quant both use it.

Standard library only: `tinyllava-export --help` stays fast.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from tinyllava_edge.bundle import MANIFEST_NAME, is_bundle, sha256_file
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.hub import repo_of
from tinyllava_edge.memory import StagePeak, release_freed_memory


class Steps:
    """`[k/n] what` lines on stderr, each closed with its wall time and the stage's peak resident
    memory; `records` keeps both per stage for the manifest (a bundle says what it cost to make)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.k, self.t0 = total, enabled, 0, None
        self.what = ""
        self.records: list[dict] = []
        self.peak: StagePeak | None = None

    def start(self, what: str) -> None:
        self.done()
        self.k += 1
        self.what = what
        release_freed_memory()
        self.peak = StagePeak()  # each stage's own peak (Linux); elsewhere the process's so far
        self.t0 = time.perf_counter()
        if self.enabled:
            print(f"[{self.k}/{self.total}] {what} ...", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.t0 is None:
            return
        seconds, peak = time.perf_counter() - self.t0, self.peak.peak()
        self.peak.close()
        self.records.append({"stage": self.what, "seconds": round(seconds, 2), "peak_rss_bytes": peak})
        if self.enabled:
            print(f"      done in {seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        self.t0 = None


class DiskFull(TinyLlavaError):
    """The disk filled up while an output was written (raised by `disk_full_is_one_sentence`)."""


@contextmanager
def disk_full_is_one_sentence(final: Path) -> Iterator[None]:
    """A write that runs out of space (ENOSPC, EDQUOT) becomes one sentence naming `final`; the
    staged folder the block writes into is removed by its own context, so nothing is left at
    `final`. Nested (a scratch bundle inside a quantized export), the outermost `final` is named."""
    try:
        yield
    except (OSError, DiskFull) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        reason = exc.strerror if isinstance(exc, OSError) else "No space left on device"
        raise DiskFull(f"the disk filled up while writing {final} ({reason}); nothing was written there: free some "
                       "space or choose another output folder") from None


def check_destination(final: Path, overwrite: bool, *, what: str, is_ours: Callable[[Path], bool],
                      record_name: str) -> None:
    """Refuse a destination the export cannot take, naming it: a file, an unwritable parent, or a
    non-empty folder unless `overwrite` is given and `is_ours(final)` (it holds `record_name`)."""
    if final.is_file() or (final.exists() and not final.is_dir()):
        raise TinyLlavaError(f"output path {final} is a file; expected a directory for the {what}")
    parent = final.parent
    for above in (parent, *parent.parents):
        if above.exists():
            if not above.is_dir():
                raise TinyLlavaError(f"cannot create the {what} directory {final}: {above} is a file")
            if not os.access(above, os.W_OK | os.X_OK):
                raise TinyLlavaError(f"cannot write the {what} {final}: {above} is not writable")
            break
    if final.is_dir() and any(final.iterdir()):
        if not overwrite:
            raise TinyLlavaError(f"output directory {final} is not empty; pass overwrite=True (--overwrite) to "
                                 f"replace a previous {what}")
        if not is_ours(final):
            raise TinyLlavaError(f"output directory {final} is not empty and holds no {what} {record_name}; "
                                 "refusing to replace it")


def check_bundle_destination(final: Path, overwrite: bool) -> None:
    """:func:`check_destination` for an edge bundle: only a previous bundle may be replaced."""
    check_destination(final, overwrite, what="bundle", is_ours=is_bundle, record_name=MANIFEST_NAME)


def source_record(source: Path, layout: str) -> dict:
    """The checkpoint's path, layout and the sha256 of its config and weights files; for a snapshot
    of the Hugging Face cache also `hub`: the repository id and the commit (tinyllava_edge/hub.py)."""
    names = ["config.json"]
    index = source / "model.safetensors.index.json"
    if (source / "model.safetensors").is_file():
        names.append("model.safetensors")
    elif index.is_file():
        names.append(index.name)
        names += sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    files = [{"name": n, "size": (source / n).stat().st_size, "sha256": sha256_file(source / n)} for n in names]
    combined = hashlib.sha256("".join(f"{f['name']}:{f['sha256']}\n" for f in files[1:]).encode()).hexdigest()
    record = {"path": str(source.resolve()), "layout": layout, "sha256": combined, "files": files}
    repo_id = repo_of(source)
    if repo_id is not None:
        record["hub"] = {"repo_id": repo_id, "commit": source.absolute().name}
    return record


def tool_versions(packages: tuple[str, ...]) -> dict:
    """Python's version and each package's installed version (None where it is not installed)."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
