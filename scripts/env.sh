# Sourced by the set-up scripts: creates or reuses .venv and installs the project into it.
# Usage: source scripts/env.sh EXTRAS   (e.g. "dev" or "dev,trainer"; empty for none)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLMOPS_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"

find_python() {
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 14))'; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "error: Python 3.11 to 3.13 is needed (apt-get install python3 python3-venv)" >&2
    return 1
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtual environment $VENV"
    "$(find_python)" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

# Reinstall only when the dependency declaration or the extras change.
stamp="$VENV/.llmops-installed-$(echo "${EXTRAS:-base}" | tr ',' '-')"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    target="$ROOT"
    [ -n "$EXTRAS" ] && target="$ROOT[$EXTRAS]"
    echo "==> installing llmops${EXTRAS:+[$EXTRAS]} into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target"
    echo "$want" > "$stamp"
fi

export PATH="$VENV/bin:$PATH"
