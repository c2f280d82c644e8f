#!/usr/bin/env bash
# Checks deploy/observability: the Prometheus rules (promtool check + unit tests), the Grafana
# dashboard (JSON, data sources, panel ids, every PromQL expression parsed by promtool), the
# metric names both use (each one a metric the daemons export), and that every runbook_url
# points at a heading of docs/operations.md. Needs promtool (Debian: apt-get install
# prometheus) and python3 (standard library only).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
rules="$here/prometheus/walcache-alerts.yml"
tests="$here/prometheus/walcache-alerts.test.yml"
dashboard="$here/grafana/walcache.json"
ops_doc="$root/docs/operations.md"

command -v promtool >/dev/null || { echo "promtool not found on PATH (Debian: apt-get install prometheus)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 not found on PATH" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "== promtool check rules ${rules#"$root"/}"
promtool check rules "$rules"

echo
echo "== promtool test rules ${tests#"$root"/}"
(cd "$(dirname "$tests")" && promtool test rules "$(basename "$tests")")

echo
echo "== dashboard ${dashboard#"$root"/}"
python3 - "$dashboard" "$tmp/dashboard-expressions.yml" <<'PY'
import json
import re
import sys

path, out = sys.argv[1], sys.argv[2]
errors = []
try:
    with open(path) as f:
        d = json.load(f)
except ValueError as e:
    sys.exit(f"{path}: not valid JSON: {e}")
print("JSON parses")

if d.get("schemaVersion") != 39:
    errors.append(f"schemaVersion is {d.get('schemaVersion')!r}, expected 39")

DS = {"type": "prometheus", "uid": "${datasource}"}
variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
ds_var = variables.get("datasource")
if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
    errors.append("no template variable 'datasource' of type datasource querying prometheus")

# No hard-coded data source anywhere: every "datasource" in the file is the variable.
def walk(node, where):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource" and v != DS:
                errors.append(f"{where}: datasource {v!r}, expected {DS!r}")
            walk(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            walk(v, f"{where}[{i}]")
walk(d, "$")

# Grafana variables -> values that make the expressions plain PromQL.
BUILTINS = {"__rate_interval": "5m", "__interval": "5m", "__range": "5m",
            "__interval_ms": "300000", "__range_s": "300", "__range_ms": "300000"}
PLAUSIBLE = {"producer_job": "walcache-producer", "consumer_job": "walcache-consumer",
             "client_job": "payments", "experiment": "courier-performance"}
VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\]")

def substitute(expr, where):
    def value(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in variables:
            return PLAUSIBLE.get(name, "example")
        errors.append(f"{where}: uses ${name}, which the dashboard does not define")
        return "example"
    return VAR.sub(value, expr)

records = []
def record(name, expr):
    records.append({"record": name, "expr": expr})

ids = {}
panel_count = query_count = 0
def panels_of(ps):
    for p in ps:
        yield p
        yield from panels_of(p.get("panels", []))

for p in panels_of(d.get("panels", [])):
    title = p.get("title", "?")
    pid = p.get("id")
    where = f"panel {pid} {title!r}"
    if not isinstance(pid, int):
        errors.append(f"{where}: no integer id")
    elif pid in ids:
        errors.append(f"{where}: id {pid} also used by {ids[pid]!r}")
    else:
        ids[pid] = title
    if p.get("datasource") != DS:
        errors.append(f"{where}: datasource {p.get('datasource')!r}, expected {DS!r}")
    if p.get("type") == "row":
        continue
    panel_count += 1
    if not str(p.get("description", "")).strip():
        errors.append(f"{where}: no description")
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"{where}: no query")
    refs = set()
    for t in targets:
        ref = t.get("refId", "?")
        if ref in refs:
            errors.append(f"{where}: refId {ref} twice")
        refs.add(ref)
        if t.get("datasource") != DS:
            errors.append(f"{where} {ref}: datasource {t.get('datasource')!r}, expected {DS!r}")
        expr = str(t.get("expr", "")).strip()
        if not expr:
            errors.append(f"{where} {ref}: empty expr")
            continue
        query_count += 1
        record(f"dashboard:panel{pid}_{ref}:expr", substitute(expr, f"{where} {ref}"))

# Query variables: label_values(<selector>, label) and query_result(<expr>) hold PromQL.
var_count = 0
for name, v in variables.items():
    if v.get("type") != "query":
        continue
    if v.get("datasource") != DS:
        errors.append(f"variable {name}: datasource {v.get('datasource')!r}, expected {DS!r}")
    q = v.get("query")
    q = q.get("query", "") if isinstance(q, dict) else str(q or "")
    m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\s*\)\s*", q) or re.fullmatch(r"\s*query_result\((.+)\)\s*", q)
    if m:
        var_count += 1
        record(f"dashboard:variable_{name}:expr", substitute(m.group(1), f"variable {name}"))

with open(out, "w") as f:
    json.dump({"groups": [{"name": "dashboard-expressions", "rules": records}]}, f, indent=1)

if errors:
    print("\n".join(f"ERROR: {e}" for e in errors), file=sys.stderr)
    sys.exit(1)
print(f"{panel_count} panels (+ {len(ids) - panel_count} rows): ids unique, each with a description;"
      " every data source is ${datasource}")
print(f"{query_count} panel queries and {var_count} variable queries, variables replaced"
      " ($__rate_interval etc. by 5m), go to promtool as recording rules:")
PY
promtool check rules "$tmp/dashboard-expressions.yml" | sed 's|'"$tmp"'/||'

echo
echo "== metric names (every walcache_* token is a metric the daemons export)"
python3 - "$root" "$rules" "$tests" "$dashboard" <<'PY'
import os
import re
import sys

root, files = sys.argv[1], sys.argv[2:]
sources = ["producer/src/metrics.rs", "consumer/src/metrics.rs",
           "client/src/metrics.rs", "client/src/experiment/publish.rs"]
names, histograms = set(), set()
for rel in sources:
    text = open(os.path.join(root, rel)).read()
    consts = dict(re.findall(r'pub const (\w+): &str = "(walcache_[a-z0-9_]+)";', text))
    if not consts:
        sys.exit(f"{rel}: no metric name constants found")
    names.update(consts.values())
    for c in re.findall(r"HistogramOpts::new\(\s*(\w+)", text):
        histograms.add(consts[c])
allowed = (names - histograms) | {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}
print(f"{len(names)} metrics exported ({len(histograms)} histograms) in {', '.join(sources)}")

bad = False
for path in files:
    used = set(re.findall(r"walcache_[a-z0-9_]+", open(path).read()))
    unknown = sorted(used - allowed)
    print(f"{os.path.relpath(path, root)}: {len(used)} names, all exported" if not unknown
          else f"{os.path.relpath(path, root)}: NOT exported: {', '.join(unknown)}")
    bad |= bool(unknown)
if bad:
    sys.exit(1)
PY

echo
echo "== runbook_url anchors, alert labels and annotations, test coverage"
python3 - "$root" "$rules" "$tests" "$ops_doc" <<'PY'
import os
import re
import sys

root, rules, tests, ops_doc = sys.argv[1:]
errors = []

def anchors(path):
    """GitHub-style anchors of a markdown file's headings (duplicates get -1, -2, ...)."""
    seen, out, fenced = {}, set(), False
    for line in open(path):
        if re.match(r"\s*(```|~~~)", line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # links -> their text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out

doc_anchors = anchors(ops_doc)
headings = {l.strip()[4:] for l in open(ops_doc) if l.startswith("### ")}

# The rules file is block-style YAML: one "- alert:" per rule, its keys below it.
text = open(rules).read()
blocks = re.split(r"\n\s*- (?=alert:|record:)", text)[1:]
alerts = []
for b in blocks:
    m = re.match(r"alert:\s*(\S+)", b)
    if not m:
        continue
    name = m.group(1)
    alerts.append(name)
    for key in ("severity", "summary", "description", "runbook_url"):
        if not re.search(rf"^\s+{key}:", b, re.M):
            errors.append(f"{name}: no {key}")
    sev = re.search(r"^\s+severity:\s*(\S+)", b, re.M)
    if sev and sev.group(1) not in ("critical", "warning", "info"):
        errors.append(f"{name}: severity {sev.group(1)}")
    url = re.search(r"^\s+runbook_url:\s*['\"]?([^'\"\s]+)", b, re.M)
    if url:
        m = re.fullmatch(r"docs/operations\.md#([a-z0-9_-]+)", url.group(1))
        if not m:
            errors.append(f"{name}: runbook_url {url.group(1)} is not docs/operations.md#<anchor>")
        elif m.group(1) not in doc_anchors:
            errors.append(f"{name}: runbook_url anchor #{m.group(1)} is no heading of docs/operations.md")
    if name not in headings:
        errors.append(f"{name}: no '### {name}' section in docs/operations.md")
print(f"{len(alerts)} alerts, each with severity, summary, description and a runbook_url "
      f"whose anchor is among the {len(doc_anchors)} headings of docs/operations.md")

# Links inside docs/operations.md: #anchor, other.md#anchor, other.md.
links = 0
for target in re.findall(r"\]\(([^)\s]+)\)", open(ops_doc).read()):
    if re.match(r"[a-z]+://", target):
        continue
    file, _, anchor = target.partition("#")
    path = os.path.normpath(os.path.join(os.path.dirname(ops_doc), file)) if file else ops_doc
    links += 1
    if not os.path.exists(path):
        errors.append(f"docs/operations.md links to {target}: no such file")
    elif anchor and path.endswith(".md") and anchor not in anchors(path):
        errors.append(f"docs/operations.md links to {target}: no such heading")
print(f"{links} relative links in docs/operations.md resolve")

# Test coverage: every alert fires in one case and stays silent in another.
fires, silent = set(), set()
current = None
lines = open(tests).read().splitlines()
for i, line in enumerate(lines):
    m = re.match(r"\s*alertname:\s*(\S+)", line)
    if m:
        current = m.group(1)
        continue
    m = re.match(r"\s*exp_alerts:\s*(\S*)", line)
    if m and current:
        (silent if m.group(1) == "[]" else fires).add(current)
        current = None
for a in alerts:
    if a not in fires:
        errors.append(f"{a}: no test case where it fires")
    if a not in silent:
        errors.append(f"{a}: no test case where it must not fire")
unknown = (fires | silent) - set(alerts)
if unknown:
    errors.append(f"tests name alerts the rules do not have: {', '.join(sorted(unknown))}")
print(f"every alert has a firing and a silent test case ({len(fires)} firing, {len(silent)} silent)")

if errors:
    print("\n".join(f"ERROR: {e}" for e in errors), file=sys.stderr)
    sys.exit(1)
PY

echo
echo "all observability checks passed"
