"""The vision parts of an export (mmproj, vision-fp16.onnx, vision.onnx), made in a child process.

    python -m tinyllava_edge.export.vision_stage REQUEST.json RESULT.json

Measured at bench-scale (SigLIP-so400m, 1.7 GB of float32 weights): after torch.onnx has exported
the tower and onnxruntime has checked the graph, the process keeps about 1.8 GB more than before,
held from C++ (no Python object refers to it, so neither deleting the model nor gc nor
malloc_trim gives it back). In a child process it is returned when the child exits, so the LLM
stages that follow start from the interpreter's size. The child's figures are recorded per stage
like the parent's, each with the parent's resident size added (both processes are alive then):
what the machine needs, not the child's share alone.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.memory import rss_bytes
from tinyllava_edge.staging import Steps


def run_vision_stage(source: Path, folder: Path, steps: Steps, gguf_type: str, ftype: str, **flags) -> dict:
    """Run :func:`export.bundle.write_vision_parts` for `source` into `folder` in a child process;
    its step lines continue `steps`' numbering and its records join `steps.records`."""
    steps.done()
    request = {"source": str(source), "folder": str(folder), "gguf_type": gguf_type, "ftype": ftype,
               "first_step": steps.k, "total": steps.total, "progress": steps.enabled, **flags}
    with tempfile.TemporaryDirectory(prefix="tinyllava-vision-") as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_file.write_text(json.dumps(request), encoding="utf-8")
        parent = rss_bytes() or 0
        child = subprocess.Popen([sys.executable, "-m", "tinyllava_edge.export.vision_stage", str(request_file),
                                  str(result_file)])
        _, status, usage = os.wait4(child.pid, 0)
        result = json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else None
    if result is None or "error" in result:
        if result is not None and result.get("errno") in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(result["errno"], os.strerror(result["errno"]))
        message = result["error"] if result is not None else f"exit status {os.waitstatus_to_exitcode(status)}"
        raise TinyLlavaError(message if result is not None and result.get("user_error")
                             else f"the vision stage of the export failed ({message})")
    for record in result["records"]:
        steps.records.append({**record, "peak_rss_bytes": record["peak_rss_bytes"] + parent,
                              "process": "child (the parent's resident size added)"})
    steps.k += len(result["records"])
    return result["parts"]


def _main(request_file: str, result_file: str) -> int:
    from tinyllava_edge.export.bundle import CheckpointParts, write_vision_parts
    from tinyllava_edge.model.checkpoint import load_checkpoint

    request = json.loads(Path(request_file).read_text(encoding="utf-8"))
    steps = Steps(request["total"], request["progress"])
    steps.k = request["first_step"]
    out: dict
    try:
        steps.start("loading the vision tower + connector (float32; the LLM's weights stay on disk)")
        model = load_checkpoint(Path(request["source"]), parts=CheckpointParts.VISION)
        parts = write_vision_parts(model, Path(request["folder"]), steps, request["gguf_type"], request["ftype"],
                                   gguf=request["gguf"], mmproj=request["mmproj"], with_fp16=request["with_fp16"],
                                   verify=request["verify"], progress=request["progress"])
        steps.done()
        out = {"parts": parts, "records": steps.records}
    except TinyLlavaError as exc:
        out = {"error": str(exc), "user_error": True}
    except OSError as exc:
        out = {"error": str(exc), "errno": exc.errno}
    Path(result_file).write_text(json.dumps(out), encoding="utf-8")
    return 0 if "error" not in out else 3


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2]))
