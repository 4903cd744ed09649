# Shared by the setup scripts (sourced): make a virtual environment from a lock of exact versions.
#
# Every environment the project makes (.venv, .venv-gptq, ...) installs through `env_pip`, which
# adds `-c locks/<env>.txt`: a pip constraints file of exact versions, so the same commands give
# the same environment on every machine. pyproject.toml keeps the ranges for people who install
# the package into their own environment.
#
# `--latest` (the first argument of a setup script) instead makes the environment anew from those
# ranges, the newest versions they allow, and rewrites the lock from what was installed
# (`env_write_lock`): upgrading is that one command, then the tests, then committing locks/.
#
# torch is not in the locks: TORCH_SPEC pins it (a CPU wheel on this machine kind; GPU users name
# their build), and the NVIDIA wheels a CUDA build brings follow from that choice.

ENV_LATEST=0
if [ "${1:-}" = "--latest" ]; then ENV_LATEST=1; shift; fi
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

# env_begin VENV LOCK [FILE...]: create VENV (anew with --latest); return 1 when the stamp over
# the lock, pyproject.toml and FILEs says it is already up to date.
env_begin() {
    ENV_DIR=$1 ENV_LOCK=$2
    shift 2
    ENV_FILES=("$@")
    if [ "$ENV_LATEST" = 1 ]; then
        rm -rf "$ENV_DIR"
    elif [ ! -f "$ENV_LOCK" ]; then
        echo "setup: $ENV_LOCK is missing; make it with: bash $0 --latest" >&2
        exit 2
    fi
    [ -x "$ENV_DIR/bin/python" ] || "$PYTHON" -m venv "$ENV_DIR"
    ENV_STAMP=$ENV_DIR/.tinyllava-edge-setup
    ENV_WANT=$(env_digest)
    [ "$ENV_LATEST" = 1 ] || [ "$(cat "$ENV_STAMP" 2>/dev/null || true)" != "$ENV_WANT" ]
}

env_digest() { cat pyproject.toml scripts/lib-env.sh "${ENV_FILES[@]}" "$ENV_LOCK" 2>/dev/null | sha256sum | cut -c1-16; }

# env_pip ARGS...: pip install into the environment, held to the lock unless --latest.
env_pip() {
    local lock=()
    [ "$ENV_LATEST" = 1 ] || lock=(-c "$ENV_LOCK")
    "$ENV_DIR/bin/python" -m pip install -q --disable-pip-version-check "${lock[@]}" "$@"
}

# env_check_torch: the torch the environment runs on is still TORCH_SPEC's (no dependency replaced it).
env_check_torch() {
    "$ENV_DIR/bin/python" - "$TORCH_SPEC" <<'PY'
import sys
from importlib.metadata import version

want, have = sys.argv[1].partition("==")[2], version("torch")
if want and not have.startswith(want):
    sys.exit(f"setup: torch {have} was installed instead of {want}")
PY
}

# env_end: with --latest, write the lock from what is installed (torch and its CUDA wheels left
# out, see above), through a temporary name; then stamp the environment.
env_end() {
    if [ "$ENV_LATEST" = 1 ]; then
        local tmp
        mkdir -p "$(dirname "$ENV_LOCK")"
        tmp=$(mktemp "$ENV_LOCK.XXXXXX")
        {
            echo "# Exact versions for $ENV_DIR (pip constraints). Made by: bash $0 --latest"
            echo "# on $(date -u +%Y-%m-%d) with $("$ENV_DIR/bin/python" -V). torch comes from TORCH_SPEC."
            "$ENV_DIR/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check \
                | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' | grep -v ' @ '
        } > "$tmp"
        chmod 644 "$tmp"
        mv "$tmp" "$ENV_LOCK"
        echo "setup: wrote $ENV_LOCK ($(grep -vc '^#' "$ENV_LOCK") packages); run the tests, then commit it"
        ENV_WANT=$(env_digest)
    fi
    echo "$ENV_WANT" > "$ENV_STAMP"
}
