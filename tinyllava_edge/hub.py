"""Hugging Face Hub repository ids wherever a model folder is taken (`--model`, `load`, `from_pretrained`).

    folder = resolve_model("tinyllava/TinyLLaVA-Phi-2-SigLIP-3.1B", revision="main")

returns the snapshot folder of the Hugging Face cache (``HF_HUB_CACHE``:
``models--OWNER--NAME/snapshots/<commit>/``) that holds what this project reads, fetched with
``huggingface_hub.snapshot_download`` when it is not cached yet. Every command and the Python API
go through :func:`resolve_model`, so the rules are the same everywhere:

* an existing path always wins over a repository id of the same spelling; a string that is neither
  an existing path nor ``owner/name`` comes back as the path it spells, so that the caller's
  "does not exist" sentence names it;
* only what the project reads is fetched, never a pickle (``PICKLES``: loading one can run code).
  A checkpoint repository gives its safetensors weights (and index), config, tokenizer and
  processor files (``CHECKPOINT_FILES``); a bundle repository (``manifest.json``) gives its
  manifest and exactly the files the manifest lists. A checkpoint whose weights exist only as
  pickles is refused;
* the network is reached here only, only for a repository id the user named, and never with
  ``HF_HUB_OFFLINE=1``: then, or when the Hub cannot be reached, the cache answers, and a model
  that is not cached is one sentence with the command that fetches it (offline.py draws the same
  line for the rest of the stack).

huggingface_hub is imported only once a repository id has to be looked up (a runtime-only install
running local bundles never imports it), and nothing here imports torch: the edge path uses this.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from fnmatch import fnmatch
from pathlib import Path

from tinyllava_edge.bundle import MANIFEST_NAME
from tinyllava_edge.errors import TinyLlavaError

CONFIG_NAME = "config.json"
# What tells a bundle repository from a checkpoint repository; fetched first, both small.
PROBE_FILES = (MANIFEST_NAME, CONFIG_NAME)
# snapshot_download matches with fnmatch on the whole repository path, where `*` crosses `/`:
# "*config.json" also takes language_model/config.json of a GPTQ checkpoint and generation_config.json.
CHECKPOINT_FILES = (
    "*.safetensors", "*.safetensors.index.json",  # weights
    "*config.json",  # config, generation, tokenizer, preprocessor and processor configs
    "*tokenizer.json", "*tokenizer.model", "*special_tokens_map.json", "*added_tokens.json", "*vocab.json",
    "*vocab.txt", "*merges.txt", "*chat_template.json", "*chat_template.jinja",
)
# Bundle files, for the fetch command of a repository whose kind is not known yet (a bundle's own
# list is exact: its manifest's `files`): the LLM and mmproj GGUF, the vision graphs and their data.
BUNDLE_FILES = (MANIFEST_NAME, "*.gguf", "*.onnx", "*.onnx.data", "*.onnx_data")
ANY_MODEL_FILES = BUNDLE_FILES + CHECKPOINT_FILES
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
# owner/name as the Hub spells them (huggingface_hub's validate_repo_id, with the owner required).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_REPO_ID_MAX = 96
_CACHE_PREFIX = "models--"
_TRUE = ("1", "ON", "YES", "TRUE")


def is_repo_id(text: str) -> bool:
    """True for `owner/name` as the Hub allows it (a path such as runs/x/model or ./model is not one)."""
    return (len(text) <= _REPO_ID_MAX and _REPO_ID.fullmatch(text) is not None and "--" not in text
            and ".." not in text and not text.endswith((".git", ".")))


def repo_of(path: str | os.PathLike) -> str | None:
    """`owner/name` when `path` is a snapshot folder of the Hugging Face cache, else None."""
    folder = Path(path).absolute()
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith(_CACHE_PREFIX):
        return repo[len(_CACHE_PREFIX):].replace("--", "/")
    return None


def model_name(path: str | os.PathLike) -> str:
    """What a model is called where it is shown or served: its Hub id, else its folder's name."""
    return repo_of(path) or Path(path).resolve().name


def resolve_model(model: str | os.PathLike, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None,
                  token: str | bool | None = None, local_files_only: bool = False, force_download: bool = False,
                  folder_ignores_revision: bool = False) -> Path:
    """The folder `model` names: an existing path as it is, a Hub repository id as its cached
    snapshot (fetched if needed, see the module docstring).

    `revision` (branch, tag or commit) applies to repository ids; given with a local folder it is
    refused, unless `folder_ignores_revision` (transformers' `from_pretrained` passes one always).
    The other options are huggingface_hub's.
    """
    path = Path(model)
    if path.exists():
        if revision is not None and not folder_ignores_revision:
            raise TinyLlavaError(f"{model} is a local folder; a revision (--revision) applies to Hugging Face Hub "
                                 "repository ids (owner/name) only")
        return path
    if not is_repo_id(str(model)):
        return path
    return _HubModel(str(model), revision, cache_dir, token, local_files_only).fetch(force_download)


class _HubModel:
    """One repository id at one revision: what to fetch, and the sentences for what goes wrong."""

    def __init__(self, repo_id: str, revision: str | None, cache_dir, token, local_files_only: bool):
        try:
            from huggingface_hub import constants
        except ImportError:
            raise TinyLlavaError(f"{repo_id} is not a local folder, and reading a Hugging Face Hub repository id "
                                 "needs huggingface_hub (pip install huggingface_hub)") from None
        self.repo_id, self.revision, self.token = repo_id, revision, token
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
        # read now as well as at import: the variable may have been set after huggingface_hub was imported
        self.offline = (local_files_only or constants.HF_HUB_OFFLINE
                        or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE)

    @property
    def spelled(self) -> str:
        return f"{self.repo_id} (revision {self.revision or 'main'})"

    def fetch(self, force_download: bool) -> Path:
        head = self._download(self.revision, PROBE_FILES, force_download, ANY_MODEL_FILES)
        commit = head.name  # snapshots/<commit>: the second call cannot land on a newer commit of a branch
        if (head / MANIFEST_NAME).is_file():
            names = self._bundle_files(head / MANIFEST_NAME)
            folder = self._download(commit, (MANIFEST_NAME, *names), force_download, (MANIFEST_NAME, *names))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise self._not_cached(f"is in the cache without the bundle files {', '.join(missing)}",
                                       (MANIFEST_NAME, *names))
            return folder
        if not (head / CONFIG_NAME).is_file():
            if self.offline:
                raise self._not_cached(f"is in the cache without its {MANIFEST_NAME} or {CONFIG_NAME}",
                                       ANY_MODEL_FILES)
            raise TinyLlavaError(f"Hugging Face Hub repository {self.spelled} holds neither a bundle ({MANIFEST_NAME}) "
                                 f"nor a checkpoint ({CONFIG_NAME})")
        folder = self._download(commit, CHECKPOINT_FILES, force_download, CHECKPOINT_FILES)
        if not any(folder.rglob("*.safetensors")):
            pickled = [name for name in self._listing(folder, commit) if any(fnmatch(name, p) for p in PICKLES)]
            if pickled:
                raise TinyLlavaError(f"Hugging Face Hub repository {self.spelled} holds its weights only as pickles "
                                     f"({', '.join(pickled)}), which tinyllava-edge never loads (unpickling can run "
                                     "code): use a repository with safetensors weights (model.safetensors)")
            if self.offline:
                raise self._not_cached("is in the cache without its safetensors weights", CHECKPOINT_FILES)
            raise TinyLlavaError(f"Hugging Face Hub repository {self.spelled} holds a config.json but no safetensors "
                                 "weights (model.safetensors or shards with model.safetensors.index.json)")
        return folder

    def _download(self, revision: str | None, patterns: tuple[str, ...], force_download: bool,
                  fetch_patterns: tuple[str, ...]) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return Path(snapshot_download(self.repo_id, revision=revision, cache_dir=self.cache_dir, token=self.token,
                                          local_files_only=self.offline, force_download=force_download,
                                          allow_patterns=list(patterns), ignore_patterns=list(PICKLES)))
        except LocalEntryNotFoundError:  # not cached (or cached in part), and offline or the Hub unreachable
            raise self._not_cached("is not in the cache", fetch_patterns) from None
        except RevisionNotFoundError:
            raise TinyLlavaError(f"Hugging Face Hub repository {self.repo_id} has no revision {revision!r}") from None
        except RepositoryNotFoundError:  # gated repositories too
            raise TinyLlavaError(f"{self.repo_id} is not a local folder, and the Hugging Face Hub has no repository "
                                 "of that name that this login may read (a private or gated one needs `hf auth "
                                 "login` or HF_TOKEN)") from None
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else "no answer"
            raise TinyLlavaError(f"the Hugging Face Hub answered {status} for {self.spelled}: "
                                 f"{str(err).splitlines()[0]}") from None

    def _bundle_files(self, manifest_path: Path) -> list[str]:
        """The file names a bundle's manifest lists: plain names in the bundle folder, none a pickle."""
        try:
            files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
            names = [str(record["name"]) for record in files]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise TinyLlavaError(f"{MANIFEST_NAME} of Hugging Face Hub repository {self.spelled} is not a bundle "
                                 f"manifest ({exc!r})") from None
        odd = [n for n in names if Path(n).name != n or n in ("", ".", "..") or any(fnmatch(n, p) for p in PICKLES)]
        if odd:
            raise TinyLlavaError(f"{MANIFEST_NAME} of Hugging Face Hub repository {self.spelled} lists "
                                 f"{', '.join(map(repr, odd))}; a bundle lists plain file names in its folder, never "
                                 "a pickle")
        return names

    def _listing(self, folder: Path, commit: str) -> list[str]:
        """The repository's files as far as this machine knows them: the tree listing huggingface_hub
        caches beside the snapshots (all files, fetched or not), and the snapshot folder itself."""
        names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
        try:
            from huggingface_hub import get_cached_repo_tree
            from huggingface_hub.errors import CachedRepoTreeNotFoundError
        except ImportError:  # huggingface_hub before the tree cache: the folder is all there is
            return sorted(names)
        try:
            names |= {f.path for f in get_cached_repo_tree(self.repo_id, revision=commit, cache_dir=self.cache_dir)}
        except CachedRepoTreeNotFoundError:
            pass  # downloaded by an older huggingface_hub, or placed by hand
        return sorted(names)

    def _not_cached(self, what: str, patterns: tuple[str, ...]) -> TinyLlavaError:
        why = "HF_HUB_OFFLINE is set" if self.offline else "the Hugging Face Hub could not be reached"
        return TinyLlavaError(f"{self.repo_id} is not a local folder, and the Hugging Face Hub model {self.spelled} "
                              f"{what} ({self.cache_dir}; {why}); fetch it with: "
                              f"{fetch_command(self.repo_id, self.revision, patterns)}")


def fetch_command(repo_id: str, revision: str | None, patterns: tuple[str, ...]) -> str:
    """The shell command that puts `patterns` of `repo_id` into the cache, with the CLI the installed
    huggingface_hub provides (`hf`; `huggingface-cli` before 0.34, whose --include takes a list)."""
    cli = _hub_cli()
    words = [cli, "download", repo_id]
    if revision is not None:
        words += ["--revision", revision]
    if cli == "hf":
        for pattern in patterns:
            words += ["--include", pattern]
    else:
        words += ["--include", *patterns]
    return shlex.join(words)


def _hub_cli() -> str:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        scripts = {ep.name for ep in distribution("huggingface_hub").entry_points if ep.group == "console_scripts"}
    except PackageNotFoundError:
        scripts = set()
    return "huggingface-cli" if "hf" not in scripts and "huggingface-cli" in scripts else "hf"
