#!/usr/bin/env python3
"""Checks of backfilld's deployment artifacts, driven by scripts/check-deploy.sh.

Each sub-command prints what it checked, "ERROR: ..." lines for failures and "WARN: ..." lines
for things it could not check, and exits 1 on any error. Needs PyYAML (and tomllib, i.e.
Python >= 3.11, or the tomli package).

  sync-rules [--check]            write (or compare) deploy/k8s/base/prometheusrule.yaml from
                                  deploy/prometheus/alerts.yaml
  metric-names                    every backfill_* name used in dashboard, rules, tests and
                                  docs is in deploy/metric-names.txt (and that file is sane)
  dashboard OUT_RULES_FILE        Grafana dashboard structure; writes every panel query as a
                                  recording rule into OUT_RULES_FILE for `promtool check rules`
  manifests RENDERED.yaml NAME    semantic checks of one rendered kustomization; also writes
                                  the PrometheusRule's spec next to it (NAME.rules.yaml)
  config-keys                     TOML keys and BACKFILLD_* variables used under deploy/ exist
                                  in config/default.toml
  docker                          Dockerfile/.dockerignore invariants hadolint does not know
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

# How panels select the chosen jobs: a job also selects its slices (name#1, name#2, ...).
JOB_SELECTOR = 'backfill_job=~"($backfill_job)(#.*)?"'

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
PROMRULE = DEPLOY / "k8s" / "base" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "backfilld.json"
METRIC_NAMES = DEPLOY / "metric-names.txt"
DEFAULT_CONFIG = ROOT / "config" / "default.toml"

# Used only while config/default.toml does not exist; otherwise its sections are the truth.
CONFIG_SECTIONS = {"database", "worker", "batch", "throttle", "http", "log"}
METRICS_PORT = 9187
CONFIG_PATH = "/etc/backfilld/backfilld.toml"
NONROOT_UID = 65532


class Report:
    def __init__(self) -> None:
        self.errors = 0

    def error(self, msg: str) -> None:
        self.errors += 1
        print(f"ERROR: {msg}")

    def warn(self, msg: str) -> None:
        print(f"WARN: {msg}")

    def ok(self, msg: str) -> None:
        print(f"ok: {msg}")

    def check(self, cond: bool, msg: str) -> bool:
        if not cond:
            self.error(msg)
        return cond

    def exit(self) -> None:
        sys.exit(1 if self.errors else 0)


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------- sync-rules
PROMRULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml (the source of truth) by
# `scripts/check-deploy.sh --sync-rules`. Do not edit by hand: edit alerts.yaml, then re-run.
#
# The same alerting rules as a PrometheusRule for the Prometheus operator. Your Prometheus must
# select it (ruleSelector / ruleNamespaceSelector), often via a label an overlay adds.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: backfilld
  labels:
    app.kubernetes.io/name: backfilld
    app.kubernetes.io/part-of: backfilld
spec:
"""


def render_promrule() -> str:
    lines = ALERTS.read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("groups:"))
    body = ["  " + l if l.strip() else "" for l in lines[start:]]
    return PROMRULE_HEADER + "\n".join(body) + "\n"


def cmd_sync_rules(args: list[str]) -> None:
    r = Report()
    want = render_promrule()
    # The generated text must mean exactly the same rules.
    gen = yaml.safe_load(want)
    src = yaml.safe_load(ALERTS.read_text())
    r.check(gen["spec"]["groups"] == src["groups"], "internal: generated PrometheusRule differs from alerts.yaml")
    if "--check" in args:
        have = PROMRULE.read_text() if PROMRULE.exists() else ""
        if have != want:
            r.error(f"{rel(PROMRULE)} is out of date with {rel(ALERTS)}: run scripts/check-deploy.sh --sync-rules")
        else:
            r.ok(f"{rel(PROMRULE)} matches {rel(ALERTS)}")
    else:
        PROMRULE.write_text(want)
        r.ok(f"wrote {rel(PROMRULE)} from {rel(ALERTS)}")
    r.exit()


# --------------------------------------------------------------------------- metric-names
METRIC_RE = re.compile(r"(?<![A-Za-z0-9_.])backfill_[a-z0-9_]+")
HISTO_SUFFIXES = ("_bucket", "_sum", "_count")


def load_metric_names(r: Report) -> set[str]:
    raw = METRIC_NAMES.read_text().splitlines()
    names = [l.strip() for l in raw if l.strip()]
    r.check(len(raw) == len(names), f"{rel(METRIC_NAMES)}: blank lines are not allowed")
    for n in names:
        r.check(re.fullmatch(r"backfill_[a-z][a-z0-9_]*[a-z0-9]", n) is not None,
                f"{rel(METRIC_NAMES)}: {n!r} is not a valid backfill_* metric name")
    r.check(len(set(names)) == len(names), f"{rel(METRIC_NAMES)}: duplicate names")
    r.check(names == sorted(names), f"{rel(METRIC_NAMES)}: keep the names sorted")
    s = set(names)
    for n in names:
        for suf in HISTO_SUFFIXES:
            if n.endswith(suf):
                base = n[: -len(suf)]
                for other in HISTO_SUFFIXES:
                    r.check(base + other in s, f"{rel(METRIC_NAMES)}: histogram {base} lists {n} but not {base + other}")
                r.check(base not in s, f"{rel(METRIC_NAMES)}: histogram {base} must be listed as its _bucket/_sum/_count series only")
    return s


# Label names that look like metric names: the per-job label, and the parent job of slices
# that the dashboard's slice panels sum by.
LABEL_NAMES = {"backfill_job", "backfill_job_name"}


def cmd_metric_names(_: list[str]) -> None:
    r = Report()
    exported = load_metric_names(r)
    histograms = {n[: -len("_bucket")] for n in exported if n.endswith("_bucket")}
    files = [DASHBOARD, ALERTS, ALERTS_TEST, PROMRULE]
    files += sorted(DEPLOY.glob("*.md"))
    used: dict[str, set[str]] = {}
    for f in files:
        if not f.exists():
            r.error(f"{rel(f)} is missing")
            continue
        for m in METRIC_RE.findall(f.read_text()):
            if m not in LABEL_NAMES:
                used.setdefault(m, set()).add(rel(f))
    for name in sorted(used):
        if name in exported:
            continue
        if name in histograms:  # prose may name a histogram by its base name
            continue
        hint = ""
        for suf in HISTO_SUFFIXES:
            if name.endswith(suf) and name[: -len(suf)] in exported:
                hint = f" ({name[: -len(suf)]} is not a histogram)"
        r.error(f"{name} used in {', '.join(sorted(used[name]))} is not an exported metric "
                f"(deploy/metric-names.txt){hint}")
    dash_used = set(METRIC_RE.findall(DASHBOARD.read_text())) if DASHBOARD.exists() else set()
    unused = sorted(n for n in exported if n not in dash_used and not (n[: n.rfind("_")] in histograms and any(
        (n[: n.rfind("_")] + s) in dash_used for s in HISTO_SUFFIXES)))
    if unused:
        print(f"note: exported but not on the dashboard: {', '.join(unused)}")
    r.ok(f"{len(used)} distinct backfill_* names used in {len(files)} files, all among {len(exported)} exported names")
    r.exit()


# --------------------------------------------------------------------------- dashboard
RANGE_RE = re.compile(r"\[([^\]]*)\]")
PROMQL_VARS = {
    "${__rate_interval}": "2m", "$__rate_interval": "2m",
    "${__range}": "6h", "$__range": "6h",
    "${backfill_job}": ".*", "$backfill_job": ".*",
    "${namespace}": ".*", "$namespace": ".*",
    "${scrape_job}": "backfilld", "$scrape_job": "backfilld",
}


def selectors(expr: str) -> list[tuple[str, str]]:
    """The metric selectors of a PromQL expression, (name, "{matchers}" or ""): names outside
    braces, strings and by/on/without (...) label lists."""
    bare = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1()", expr)
    found, i = [], 0
    while i < len(bare):
        c = bare[i]
        if c == '"':
            i = bare.index('"', i + 1) + 1
            continue
        m = re.compile(r"[A-Za-z_:][\w:]*").match(bare, i)
        if not m:
            i += 1
            continue
        name, i = m.group(0), m.end()
        if name.startswith("backfill_") or name == "up":
            matchers = ""
            if i < len(bare) and bare[i] == "{":
                end = bare.index("}", i) + 1
                matchers, i = bare[i:end], end
            found.append((name, matchers))
        elif i < len(bare) and bare[i] == "{":
            i = bare.index("}", i) + 1
    return found


def iter_panels(panels):
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def cmd_dashboard(args: list[str]) -> None:
    r = Report()
    out_rules = Path(args[0])
    try:
        d = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        r.error(f"{rel(DASHBOARD)} is not valid JSON: {e}")
        r.exit()
    r.check(isinstance(d.get("schemaVersion"), int) and d["schemaVersion"] >= 36,
            f"schemaVersion must be >= 36, is {d.get('schemaVersion')!r}")
    r.check(bool(d.get("uid")) and bool(d.get("title")), "dashboard needs a uid and a title")
    r.check(d.get("id") is None, "dashboard id must be null for import")
    tv = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = tv.get("datasource", {})
    r.check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
            "template variable 'datasource' (type datasource, query prometheus) is required")
    wanted_vars = {
        "namespace": "label_values(backfill_build_info, namespace)",
        "backfill_job": 'label_values(backfill_job_progress_ratio{namespace=~"$namespace"}, backfill_job)',
    }
    for var, query in wanted_vars.items():
        v = tv.get(var, {})
        q = v.get("query")
        qtext = q.get("query") if isinstance(q, dict) else q
        r.check(v.get("type") == "query" and qtext == query, f"template variable {var!r} must query {query}")
        r.check(v.get("multi") is True and v.get("includeAll") is True and v.get("allValue") == ".*",
                f"variable {var!r} must be multi-value with 'All' (.*)")
        r.check((v.get("datasource") or {}).get("uid") == "${datasource}", f"variable {var!r} must use ${{datasource}}")

    ids: set = set()
    cells: dict = {}
    rules = []
    for p in iter_panels(d.get("panels", [])):
        title = p.get("title", "?")
        pid = p.get("id")
        r.check(pid not in ids, f"panel {title!r}: duplicate id {pid}")
        ids.add(pid)
        gp = p.get("gridPos", {})
        x, y, w, h = gp.get("x", -1), gp.get("y", -1), gp.get("w", 0), gp.get("h", 0)
        if r.check(0 <= x and 0 < w and x + w <= 24 and y >= 0 and h > 0, f"panel {title!r}: bad gridPos {gp}"):
            for cx in range(x, x + w):
                for cy in range(y, y + h):
                    if (cx, cy) in cells:
                        r.error(f"panel {title!r} overlaps panel {cells[(cx, cy)]!r}")
                        break
                    cells[(cx, cy)] = title
                else:
                    continue
                break
        if p.get("type") == "row":
            continue
        r.check((p.get("datasource") or {}).get("uid") == "${datasource}", f"panel {title!r}: datasource must be ${{datasource}}")
        targets = p.get("targets", [])
        r.check(len(targets) > 0, f"panel {title!r}: no queries")
        for t in targets:
            r.check((t.get("datasource") or {}).get("uid") == "${datasource}",
                    f"panel {title!r} query {t.get('refId')}: datasource must be ${{datasource}}")
            expr = t.get("expr", "")
            if not r.check(bool(expr), f"panel {title!r} query {t.get('refId')}: empty expr"):
                continue
            for rng in RANGE_RE.findall(re.sub(r'"[^"]*"', '""', expr)):
                r.check(rng in ("$__rate_interval", "$__range"),
                        f"panel {title!r}: range [{rng}] must be [$__rate_interval] (or [$__range] in a stat): {expr}")
            for fn in ("rate", "irate", "increase"):
                for m in re.finditer(rf"\b{fn}\(", expr):
                    r.check("[$__rate_interval]" in expr[m.end():] or "[$__range]" in expr[m.end():],
                            f"panel {title!r}: {fn}() without [$__rate_interval]: {expr}")
            # Every selector filters by namespace, so the variable means what it says.
            for metric, matchers in selectors(expr):
                r.check('namespace=~"$namespace"' in matchers,
                        f"panel {title!r}: {metric}{matchers} lacks namespace=~\"$namespace\"")
            r.check(not re.search(r"\bjob=~|by \([^)]*\bjob\b", expr),
                    f"panel {title!r}: the per-job label is backfill_job (job is Prometheus' target label): {expr}")
            if "backfill_job=~" in expr:
                # A selected job also selects its slices (name#1, name#2, ...).
                r.check(JOB_SELECTOR in expr, f"panel {title!r}: filter jobs with {JOB_SELECTOR}: {expr}")
            # label_replace() replacements like "$1" are capture groups, not variables.
            concrete = re.sub(r'"\$\d+"', '"x"', expr)
            for k in sorted(PROMQL_VARS, key=len, reverse=True):
                concrete = concrete.replace(k, PROMQL_VARS[k])
            r.check("$" not in concrete, f"panel {title!r}: unknown variable in {expr}")
            rules.append({"record": f"dashboard:panel_{pid}:{t.get('refId', 'A')}".lower(), "expr": concrete})
    out_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, sort_keys=False))
    r.ok(f"{len([p for p in iter_panels(d['panels']) if p.get('type') != 'row'])} panels, {len(rules)} queries; "
         f"queries written to {out_rules} for promtool")
    r.exit()


# --------------------------------------------------------------------------- manifests
def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_pod_template(r: Report, kind: str, name: str, tmpl: dict, docs: list[dict]) -> None:
    where = f"{kind}/{name}"
    spec = tmpl.get("spec", {})
    psc = spec.get("securityContext", {})
    r.check(psc.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot must be true")
    r.check(psc.get("runAsUser") == NONROOT_UID, f"{where}: pod securityContext.runAsUser must be {NONROOT_UID}")
    r.check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{where}: pod seccompProfile must be RuntimeDefault")
    r.check(spec.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken must be false")
    tgp = spec.get("terminationGracePeriodSeconds", 30)
    r.check(15 <= tgp <= 120, f"{where}: terminationGracePeriodSeconds {tgp} must leave room for the ~10 s shutdown")
    cs = [c for c in spec.get("containers", []) if c.get("name") == "backfilld"]
    if not r.check(len(cs) == 1, f"{where}: needs exactly one container named backfilld"):
        return
    c = cs[0]
    image = c.get("image", "")
    tag = image.rsplit("/", 1)[-1]
    r.check(("@sha256:" in image) or (":" in tag and not tag.endswith(":latest")),
            f"{where}: image {image!r} needs an explicit tag or digest (not latest)")
    sc = c.get("securityContext", {})
    r.check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false")
    r.check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem must be true")
    r.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{where}: capabilities must drop ALL")
    r.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: container must run as non-root")
    r.check((sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
            f"{where}: container seccompProfile must be RuntimeDefault")
    ports = {p.get("name"): p for p in c.get("ports", [])}
    r.check(ports.get("metrics", {}).get("containerPort") == METRICS_PORT,
            f"{where}: container port 'metrics' must be {METRICS_PORT}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        hg = (c.get(probe) or {}).get("httpGet", {})
        r.check(hg.get("path") == path and hg.get("port") in ("metrics", METRICS_PORT),
                f"{where}: {probe} must GET {path} on port metrics")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for k in ("cpu", "memory"):
            r.check(k in (res.get(part) or {}), f"{where}: resources.{part}.{k} must be set")
    env = {e.get("name"): e for e in c.get("env", [])}
    db = env.get("DATABASE_URL", {})
    skr = (db.get("valueFrom") or {}).get("secretKeyRef") or {}
    r.check(skr.get("name") == "backfilld-database" and skr.get("key") == "url" and "value" not in db,
            f"{where}: DATABASE_URL must come from Secret backfilld-database key url")
    for e in c.get("env", []):
        if "value" in e and re.search(r"postgres(ql)?://[^\s:@/]+:[^\s@/]+@", str(e["value"])):
            r.error(f"{where}: env {e['name']} holds a URL with a password; use a Secret")
    args = list(c.get("command", [])) + list(c.get("args", []))
    r.check("run" in args, f"{where}: must run `backfilld run`")
    want_idle = kind == "Job"
    r.check(("--exit-when-idle" in args) == want_idle,
            f"{where}: --exit-when-idle must be {'set' if want_idle else 'absent'} for a {kind}")
    r.check(any(a == "--config" and args[i + 1:i + 2] == [CONFIG_PATH] for i, a in enumerate(args))
            or f"--config={CONFIG_PATH}" in args, f"{where}: must pass --config {CONFIG_PATH}")
    # The config file must come from a ConfigMap present in the output, holding backfilld.toml.
    mounts = {m.get("mountPath"): m for m in c.get("volumeMounts", [])}
    vols = {v.get("name"): v for v in spec.get("volumes", [])}
    m = mounts.get(str(Path(CONFIG_PATH).parent))
    if r.check(m is not None, f"{where}: nothing mounted at {Path(CONFIG_PATH).parent}"):
        cm_name = ((vols.get(m["name"]) or {}).get("configMap") or {}).get("name")
        cms = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == cm_name]
        if r.check(len(cms) == 1, f"{where}: config volume refers to ConfigMap {cm_name!r}, not in the output"):
            data = cms[0].get("data", {})
            if r.check(Path(CONFIG_PATH).name in data, f"ConfigMap {cm_name}: no key {Path(CONFIG_PATH).name}"):
                try:
                    cfg = tomllib.loads(data[Path(CONFIG_PATH).name])
                    listen = cfg.get("http", {}).get("listen", f"0.0.0.0:{METRICS_PORT}")
                    r.check(listen.rsplit(":", 1)[-1] == str(METRICS_PORT) and not listen.startswith("127."),
                            f"ConfigMap {cm_name}: http.listen {listen!r} must be reachable on port {METRICS_PORT}")
                    r.check(cfg.get("log", {}).get("format") == "json", f"ConfigMap {cm_name}: log.format should be json")
                except tomllib.TOMLDecodeError as e:
                    r.error(f"ConfigMap {cm_name}: invalid TOML: {e}")


def pod_spec_for_compare(tmpl: dict) -> dict:
    spec = json.loads(json.dumps(tmpl.get("spec", {})))
    for k in ("restartPolicy", "topologySpreadConstraints"):
        spec.pop(k, None)
    for c in spec.get("containers", []):
        c["args"] = [a for a in c.get("args", []) if a != "--exit-when-idle"]
        c.pop("env", None)  # overlays add environment-specific variables to one variant
    return spec


def cmd_manifests(args: list[str]) -> None:
    r = Report()
    path, name = Path(args[0]), args[1]
    docs = load_docs(path)
    kinds = {}
    for d in docs:
        kinds.setdefault(d.get("kind"), []).append(d)
    r.check(not kinds.get("Secret"), f"{name}: renders a Secret; the database URL must not be committed "
            "(create backfilld-database out of band, see the example overlay)")
    namespaces = {d["metadata"].get("namespace") for d in docs if d.get("kind") != "Namespace"}
    r.check(len(namespaces) == 1, f"{name}: objects spread over namespaces {sorted(map(str, namespaces))}")

    workloads = []
    for j in kinds.get("Job", []):
        s = j["spec"]
        jn = j["metadata"]["name"]
        r.check(isinstance(s.get("parallelism"), int) and s["parallelism"] >= 1, f"Job/{jn}: parallelism must be set")
        r.check(s.get("completions") in (None, s.get("parallelism")),
                f"Job/{jn}: completions must be unset (work queue) or equal to parallelism")
        r.check("backoffLimit" in s, f"Job/{jn}: backoffLimit must be set")
        r.check(s["template"]["spec"].get("restartPolicy") in ("Never", "OnFailure"), f"Job/{jn}: restartPolicy")
        workloads.append(("Job", j))
    for dep in kinds.get("Deployment", []):
        dn = dep["metadata"]["name"]
        r.check(dep["spec"].get("replicas", 1) >= 2, f"Deployment/{dn}: run at least 2 replicas")
        r.check(labels_match(dep["spec"]["selector"].get("matchLabels"), dep["spec"]["template"]["metadata"].get("labels", {})),
                f"Deployment/{dn}: selector does not match its pod labels")
        pdbs = [p for p in kinds.get("PodDisruptionBudget", [])
                if labels_match(p["spec"]["selector"].get("matchLabels"), dep["spec"]["template"]["metadata"].get("labels", {}))]
        r.check(len(pdbs) == 1, f"Deployment/{dn}: needs exactly one PodDisruptionBudget selecting its pods")
        workloads.append(("Deployment", dep))
    r.check(len(workloads) == 1, f"{name}: expected exactly one workload (the Job or the worker Deployment), "
            f"got {[k + '/' + w['metadata']['name'] for k, w in workloads]}")
    for kind, w in workloads:
        check_pod_template(r, kind, w["metadata"]["name"], w["spec"]["template"], docs)
        sa = w["spec"]["template"]["spec"].get("serviceAccountName")
        r.check(any(d["metadata"]["name"] == sa for d in kinds.get("ServiceAccount", [])),
                f"{kind}/{w['metadata']['name']}: ServiceAccount {sa!r} not in the output")

    if name.startswith("overlays/"):
        # An example overlay is what people copy: its monitoring objects must carry the label
        # kube-prometheus-stack selects them by, or nothing scrapes or alerts.
        for kind in ("PodMonitor", "PrometheusRule"):
            for obj in kinds.get(kind, []):
                r.check("release" in (obj["metadata"].get("labels") or {}),
                        f"{name}: {kind}/{obj['metadata']['name']} lacks the release label Prometheus selects by")
    pms = kinds.get("PodMonitor", [])
    if r.check(len(pms) == 1, f"{name}: expected one PodMonitor"):
        pm = pms[0]["spec"]
        for kind, w in workloads:
            pl = w["spec"]["template"]["metadata"].get("labels", {})
            r.check(labels_match(pm.get("selector", {}).get("matchLabels"), pl),
                    f"PodMonitor does not select the pods of {kind}/{w['metadata']['name']}")
            r.check(pm.get("jobLabel") in pl, f"PodMonitor jobLabel {pm.get('jobLabel')!r} is not a pod label")
            for tl in pm.get("podTargetLabels", []):
                r.check(tl in pl, f"PodMonitor podTargetLabels {tl!r} is not a label of the {kind} pods")
        eps = pm.get("podMetricsEndpoints", [])
        r.check(len(eps) == 1 and eps[0].get("port") == "metrics" and eps[0].get("path", "/metrics") == "/metrics",
                "PodMonitor must scrape port 'metrics' path /metrics")
        # backfilld exports no target label (job, instance, namespace, pod...), so both settings
        # give the same series; false is what overrideHonorLabels would force anyway.
        r.check(all(e.get("honorLabels") is not True for e in eps),
                "PodMonitor must not need honorLabels: true (backfilld exports no target label)")
        allowed = {"jobLabel", "podTargetLabels", "selector", "namespaceSelector", "podMetricsEndpoints", "sampleLimit",
                   "targetLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit", "attachMetadata",
                   "scrapeClass", "scrapeProtocols", "fallbackScrapeProtocol", "keepDroppedTargets"}
        for k in pm:
            r.check(k in allowed, f"PodMonitor: unexpected spec field {k!r}")
        ep_allowed = {"port", "portNumber", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
                      "honorLabels", "honorTimestamps", "trackTimestampsStaleness", "relabelings", "metricRelabelings",
                      "filterRunning", "enableHttp2", "followRedirects", "proxyUrl", "tlsConfig", "authorization",
                      "basicAuth", "oauth2", "bearerTokenSecret"}
        for e in eps:
            for k in e:
                r.check(k in ep_allowed, f"PodMonitor endpoint: unexpected field {k!r}")
    prs = kinds.get("PrometheusRule", [])
    if r.check(len(prs) == 1, f"{name}: expected one PrometheusRule"):
        src = yaml.safe_load(ALERTS.read_text())
        r.check(prs[0].get("spec", {}).get("groups") == src["groups"],
                f"{name}: PrometheusRule groups differ from {rel(ALERTS)}")
        r.check(set(prs[0]["spec"]) == {"groups"}, "PrometheusRule: spec must only hold groups")
        out = path.with_name(path.stem + ".rules.yaml")
        out.write_text(yaml.safe_dump(prs[0]["spec"], sort_keys=False))
    # The two variants must not drift apart (only the rendered one is here; compare with the
    # other variant's source when this is the Deployment).
    for kind, w in workloads:
        if kind == "Deployment":
            job = yaml.safe_load((DEPLOY / "k8s" / "base" / "job.yaml").read_text())
            a = pod_spec_for_compare(job["spec"]["template"])
            b = pod_spec_for_compare(w["spec"]["template"])
            for c in a.get("containers", []):
                c["image"] = None
            for c in b.get("containers", []):
                c["image"] = None
            b["volumes"] = [dict(v, configMap={"name": "backfilld-config"}) if "configMap" in v else v
                            for v in b.get("volumes", [])]
            if a != b:
                diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                r.error(f"{name}: Deployment pod spec drifted from deploy/k8s/base/job.yaml (fields: {diff})")
    r.ok(f"{name}: {len(docs)} objects ({', '.join(sorted(f'{k}x{len(v)}' for k, v in kinds.items()))})")
    r.exit()


# --------------------------------------------------------------------------- config-keys
def parse_duration(text: str) -> float:
    """Seconds in a humantime-style duration such as "500ms", "5s", "1m 30s"."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        if m.start() != pos or m.group(2) not in units:
            raise ValueError(f"cannot parse duration {text!r}")
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"cannot parse duration {text!r}")
    return total


ENV_RE = re.compile(r"\bBACKFILLD_([A-Z0-9]+)__([A-Z0-9_]+)\b")


def cmd_config_keys(_: list[str]) -> None:
    r = Report()
    used: dict[tuple[str, str], set[str]] = {}
    for f in sorted((DEPLOY / "k8s").rglob("*.toml")):
        try:
            cfg = tomllib.loads(f.read_text())
        except tomllib.TOMLDecodeError as e:
            r.error(f"{rel(f)}: invalid TOML: {e}")
            continue
        for sec, tbl in cfg.items():
            if not r.check(isinstance(tbl, dict), f"{rel(f)}: top-level key {sec!r} outside a section"):
                continue
            for key in tbl:
                used.setdefault((sec, key), set()).add(rel(f))
    for f in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for m in ENV_RE.finditer(f.read_text()):
            used.setdefault((m.group(1).lower(), m.group(2).lower()), set()).add(rel(f))
    if not DEFAULT_CONFIG.exists():
        for (sec, key), files in sorted(used.items()):
            r.check(sec in CONFIG_SECTIONS, f"[{sec}] {key} ({', '.join(sorted(files))}): unknown section "
                    f"(expected one of {sorted(CONFIG_SECTIONS)})")
        r.warn(f"{rel(DEFAULT_CONFIG)} not found: cannot check that these keys exist: "
               + ", ".join(f"{s}.{k}" for s, k in sorted(used)))
        r.exit()
    try:
        default = tomllib.loads(DEFAULT_CONFIG.read_text())
    except tomllib.TOMLDecodeError as e:
        r.error(f"{rel(DEFAULT_CONFIG)}: invalid TOML: {e}")
        r.exit()
    for (sec, key), files in sorted(used.items()):
        r.check(key in (default.get(sec) or {}),
                f"{sec}.{key} used in {', '.join(sorted(files))} is not a key of {rel(DEFAULT_CONFIG)} "
                "(backfilld rejects unknown keys)")
    # Kubernetes must not SIGKILL a worker that is still inside its own shutdown budget.
    grace = parse_duration(str((default.get("worker") or {}).get("shutdown_grace", "5s")))
    for f in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            tgp = (((doc or {}).get("spec") or {}).get("template") or {}).get("spec", {}).get("terminationGracePeriodSeconds")
            if tgp is not None:
                r.check(tgp >= grace + 10, f"{rel(f)}: terminationGracePeriodSeconds {tgp} leaves under 10 s beyond "
                        f"worker.shutdown_grace ({grace:g} s) for committing the checkpoint and releasing the lease")
    r.ok(f"{len(used)} config keys used under deploy/ all exist in {rel(DEFAULT_CONFIG)}")
    r.exit()


# --------------------------------------------------------------------------- docker
def _dockerignore_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            if pattern.startswith("/", i):  # "**/" also matches nothing
                out[-1] = "(?:.*/)?"
                i += 1
            continue
        out.append({"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch)))
        i += 1
    return "".join(out)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Approximation of Docker's .dockerignore matching: a pattern excludes a path when it
    matches the path or one of its parent directories; the last matching rule wins."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        p = (pat[1:] if neg else pat).strip("/")
        rx = _dockerignore_regex(p)
        if any(re.fullmatch(rx, pre) for pre in prefixes):
            excluded = not neg
    return excluded


def stage_names(froms: list[str]) -> set[str]:
    """Names given to build stages (FROM ... AS name): a later FROM may name one unpinned."""
    return {l.split()[-1] for l in froms if len(l.split()) >= 4 and l.split()[-2].upper() == "AS"}


def cmd_docker(_: list[str]) -> None:
    r = Report()
    df = (ROOT / "Dockerfile").read_text()
    lines = [l.strip() for l in df.splitlines()]
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    for l in froms:
        image = l.split()[1]
        r.check(image in stage_names(froms) or re.search(r"@sha256:[0-9a-f]{64}$", image),
                f"base image not pinned by digest: {l}")
    r.check(len(froms) >= 3, "Dockerfile: expected a multi-stage build (chef, planner, builder, runtime)")
    r.check(bool(froms) and "gcr.io/distroless/cc-debian12:nonroot" in froms[-1],
            "Dockerfile: final stage must be gcr.io/distroless/cc-debian12:nonroot")
    r.check(any(re.search(r"rust:\S*\d+\.\d+\S*-bookworm", l) or "RUST_VERSION=" in l for l in lines),
            "Dockerfile: builder image must be a pinned rust:<version>-bookworm")
    r.check("cargo chef prepare" in df and "cargo chef cook" in df, "Dockerfile: dependency layer must use cargo-chef")
    r.check(re.search(r"cargo build --release --locked --no-default-features -p backfilld", df) is not None,
            "Dockerfile: binary must be built with cargo build --release --locked --no-default-features -p backfilld"
            " (no demo, no test kit in the image)")
    r.check(re.search(r"cargo chef cook --release --no-default-features\b", df) is not None,
            "Dockerfile: cargo chef cook must use --no-default-features like the build, or the cached layer"
            " holds the wrong dependency set")
    r.check(re.search(r"^EXPOSE 9187\b", df, re.M) is not None, "Dockerfile: EXPOSE 9187")
    r.check(re.search(r'^ENTRYPOINT \["[^"]*backfilld"\]', df, re.M) is not None, "Dockerfile: ENTRYPOINT backfilld")
    r.check(re.search(r"^USER (65532|nonroot)", df, re.M) is not None, "Dockerfile: final stage must run as 65532")
    for src in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+) \S+$", df, re.M):
        if src == ".":
            continue
        if not (ROOT / src).exists():
            r.warn(f"Dockerfile copies {src}, which does not exist yet: the image build will fail until it does")
    di = ROOT / ".dockerignore"
    if r.check(di.exists(), ".dockerignore is missing"):
        pats = [l.strip() for l in di.read_text().splitlines() if l.strip() and not l.strip().startswith("#")]
        for p in ("target", "target/release/backfilld", ".git", "crates/backfilld/target"):
            r.check(dockerignore_excludes(pats, p), f".dockerignore must exclude {p}")
        for p in ("Cargo.toml", "Cargo.lock", "crates/backfilld/src/main.rs", "crates/backfill-queue/migrations/0001.sql",
                  "config/default.toml", "tests/Cargo.toml", ".sqlx/query-abc.json"):
            r.check(not dockerignore_excludes(pats, p), f".dockerignore must not exclude {p} (needed by the build)")
    r.ok("Dockerfile and .dockerignore invariants")
    r.exit()


def cmd_alerts(_: list[str]) -> None:
    """Routing and identity: every rule keeps namespace, per-job rules name backfill_job, and
    every alert links its RUNBOOK.md section with an absolute runbook_url."""
    r = Report()
    runbook = (DEPLOY / "RUNBOOK.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^## (.+)$", runbook, re.M)}
    rules = [rule for g in yaml.safe_load(ALERTS.read_text())["groups"] for rule in g["rules"]]
    for rule in rules:
        name, expr, ann = rule["alert"], rule["expr"], rule.get("annotations", {})
        url = ann.get("runbook_url", "")
        r.check("runbook" not in ann, f"{name}: the annotation is runbook_url, not runbook")
        r.check(url.startswith("https://") and url.endswith("#" + name.lower()),
                f"{name}: runbook_url must be an absolute https URL ending in #{name.lower()}: {url!r}")
        r.check(name.lower() in anchors, f"{name}: RUNBOOK.md has no '## {name}' section")
        r.check(not re.search(r"\bjob=~|by \([^)]*\bjob\b|on \([^)]*\bjob\b|\$labels\.job\b", expr + json.dumps(ann)),
                f"{name}: the per-job label is backfill_job (job is Prometheus' target label)")
        for agg in re.findall(r"\b(?:sum|max|min|avg|count) by \(([^)]*)\)", expr):
            r.check("namespace" in [a.strip() for a in agg.split(",")],
                    f"{name}: 'by ({agg})' drops namespace: alerts could not be routed")
    r.ok(f"{len(rules)} rules keep namespace and link their runbook")
    r.exit()


COMMANDS = {
    "alerts": cmd_alerts,
    "sync-rules": cmd_sync_rules,
    "metric-names": cmd_metric_names,
    "dashboard": cmd_dashboard,
    "manifests": cmd_manifests,
    "config-keys": cmd_config_keys,
    "docker": cmd_docker,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        sys.exit(2)
    COMMANDS[sys.argv[1]](sys.argv[2:])
