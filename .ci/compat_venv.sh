#!/usr/bin/env bash
# A second Python environment pinned like the official BabyLM evaluation pipeline (transformers 4.51.3,
# tokenizers 0.21.1), for tests/test_compat_transformers451.py: the directories we write must load there
# through their own remote code, with ltgbert NOT importable.
#
#   bash .ci/compat_venv.sh        builds it once (idempotent, safe to run concurrently), prints its python
#
# LTGBERT_COMPAT_VENV: where it lives (default ~/.cache/ltgbert/venv-transformers-4.51.3). PYTHON: the
# interpreter whose torch is reused (default python3).
#
# torch is not downloaded again: its packages and dist-info are linked from the interpreter's site-packages
# into a directory of their own, which a .pth file puts on the environment's path. Not --system-site-packages:
# that would also run the system site's .pth files, and `pip install -e .` makes ltgbert importable through
# one (a plain `pip install .` would put it right there), so only torch's own directories are shared.
set -euo pipefail

PINS=(transformers==4.51.3 tokenizers==0.21.1)
VENV="${LTGBERT_COMPAT_VENV:-$HOME/.cache/ltgbert/venv-transformers-4.51.3}"
PYTHON="${PYTHON:-python3}"
VPY="$VENV/bin/python"

log() { echo "compat_venv: $*" >&2; }

# torch's location, the names its wheel installs at top level, and its runtime requirements
TORCH_INFO="$("$PYTHON" - <<'EOF'
import importlib.metadata as md
import pathlib
from packaging.requirements import Requirement

dist = md.distribution("torch")
site = pathlib.Path(dist.locate_file("")).resolve()
info = next((f.parts[0] for f in dist.files or [] if f.name == "METADATA"), "")
tops = (dist.read_text("top_level.txt") or "torch").split()
reqs = [Requirement(r) for r in dist.requires or []]
reqs = [f"{r.name}{r.specifier}" for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
print(dist.version)
print(site)
print(info)
print(" ".join(tops))
print(" ".join(reqs))
EOF
)"
{ read -r TORCH_VERSION; read -r TORCH_SITE; read -r TORCH_DISTINFO; read -r TORCH_TOPS; read -r TORCH_REQS; } <<<"$TORCH_INFO"
WANT="${PINS[*]} torch==$TORCH_VERSION"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # a second caller waits here, then finds the environment ready

check() {
  # the pins import, torch is the reused one, and ltgbert cannot be imported (-I: no PYTHONPATH, no cwd)
  (cd / && "$VPY" -I - "$TORCH_VERSION" <<'EOF'
import sys
import tokenizers, torch, transformers
assert transformers.__version__ == "4.51.3", transformers.__version__
assert tokenizers.__version__ == "0.21.1", tokenizers.__version__
assert torch.__version__ == sys.argv[1], torch.__version__
try:
    import ltgbert
except ImportError:
    pass
else:
    sys.exit(f"ltgbert is importable inside the compatibility environment (from {ltgbert.__file__})")
EOF
  )
}

if [[ -f "$VENV/.ltgbert-compat" && "$(cat "$VENV/.ltgbert-compat")" == "$WANT" ]] && check 2>/dev/null; then
  echo "$VPY"
  exit 0
fi

log "building $VENV ($WANT)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$VENV/system-torch"
for name in $TORCH_TOPS $TORCH_DISTINFO; do
  if [[ -e "$TORCH_SITE/$name" ]]; then ln -s "$TORCH_SITE/$name" "$VENV/system-torch/$name"; fi
done
echo "$VENV/system-torch" >"$SITE/ltgbert-compat-system-torch.pth"
# torch's small pure-Python requirements are installed for real; the pins bring the rest
# shellcheck disable=SC2086  # TORCH_REQS is a space-separated list of requirement strings
"$VPY" -m pip install -q --disable-pip-version-check "${PINS[@]}" $TORCH_REQS >&2
check
echo "$WANT" >"$VENV/.ltgbert-compat"
log "ready"
echo "$VPY"
