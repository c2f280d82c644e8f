#!/usr/bin/env python3
"""Checks on the rendered walcache manifests (`kubectl kustomize ...` output), run by check.sh.

    check_rendered.py split RENDERED OUT        built-in kinds only, for kubernetes-validate
    check_rendered.py check RENDERED [--production]

`check` validates what kubernetes-validate cannot:
  - PodMonitors against schemas/podmonitor.schema.json (kubernetes-validate has no schema for
    CRDs and only warns);
  - properties that matter for running walcache: security context, probes (the producer's
    readiness with `standby=ok`), resources, rollout strategy, labels, the env;
  - the TOML configuration inside the ConfigMaps: only keys of docs/operations.md (the daemons
    refuse unknown keys), every file it names is mounted, the listen ports are the probed ones,
    the grace period is above the producer's shutdown_timeout, cache.capacity fits the memory
    limit;
  - references: Service, PodDisruptionBudget, NetworkPolicy and PodMonitor select the pods,
    and the consumer's PodMonitor uses the very Secret and key the consumer reads its token from.
Needs Python 3.11+ (tomllib), PyYAML and jsonschema.
"""

import base64
import json
import re
import sys
from pathlib import Path

try:
    import tomllib

    import jsonschema
    import yaml
except ImportError as e:  # pragma: no cover - depends on the interpreter
    sys.exit(f"check_rendered.py needs Python 3.11+ with PyYAML and jsonschema ({e}); set PYTHON to such an interpreter")

HERE = Path(__file__).resolve().parent
CUSTOM_KINDS = {"PodMonitor"}
PART_OF = "walcache"
USER = 65532
PLACEHOLDER = "REPLACE-ME"

# docs/operations.md, "Configuration reference" of each daemon. `None` = a table of free keys.
KAFKA = {"bootstrap_servers": str, "properties": None, "property_files": None, "request_timeout": str}
PRODUCER_KEYS = {
    "postgres": {"url", "password", "password_file", "slot", "publication", "sslmode", "sslrootcert"},
    "kafka": set(KAFKA),
    "topics": {"prefix", "partitions", "replication_factor", "min_insync_replicas", "watermarks", "dead_letter"},
    "tables": {"table", "contract", "contract_version", "topic"},
    "snapshot": {"mode"},
    "pipeline": {
        "max_in_flight", "watermark_interval", "heartbeat_interval", "status_interval", "shutdown_timeout",
        "lag_interval", "publication_check_interval",
    },
    "ops": {"listen"},
}
CONSUMER_KEYS = {
    "kafka": set(KAFKA),
    "tables": {"contract", "topic", "name"},
    "watermarks": {"topic", "producer"},
    "dead_letter": {"topic", "publish"},
    "cache": {"capacity", "pages", "delete_retention"},
    "http": {
        "listen", "auth_token", "auth_token_file", "allow_unauthenticated", "export_token", "export_token_file",
        "max_batch", "max_wait", "request_timeout", "max_concurrent_requests", "max_waiting", "max_body_bytes",
    },
}
# Memory the consumer needs beside its stores, and RSS per byte moka weighs (the weigher counts
# key + row + slot; RSS adds the allocator's share): capacity x tables x 1.2 + 256 MiB <= limit.
CONSUMER_BASE_MEMORY = 256 << 20
RSS_PER_WEIGHED_BYTE = 1.2


class Checker:
    def __init__(self, docs, production):
        self.docs = docs
        self.production = production
        self.errors = []
        self.warnings = []
        self.passed = 0

    def expect(self, condition, where, message):
        if condition:
            self.passed += 1
        else:
            self.errors.append(f"{where}: {message}")
        return bool(condition)

    def find(self, kind, name=None):
        return [d for d in self.docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def where(doc):
    return f"{doc['kind']}/{doc['metadata'].get('name')}"


def selects(selector, labels):
    """A matchLabels selector matches labels (matchExpressions are not used here)."""
    match = (selector or {}).get("matchLabels") or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def quantity(text):
    """Kubernetes memory quantity -> bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text))
    if not m:
        raise ValueError(f"unreadable quantity {text!r}")
    mult = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}[m.group(2)]
    return float(m.group(1)) * mult


def size(text):
    """cache.capacity as the consumer parses it (consumer/src/config.rs parse_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", str(text).strip())
    units = {"": 1, "b": 1, "kb": 10**3, "kib": 1 << 10, "k": 1 << 10, "mb": 10**6, "mib": 1 << 20, "m": 1 << 20,
             "gb": 10**9, "gib": 1 << 30, "g": 1 << 30}
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"unreadable size {text!r}")
    return int(m.group(1)) * units[m.group(2).lower()]


def seconds(text):
    """A humantime duration ("30s", "1m 30s", "500ms") -> seconds."""
    total, rest = 0.0, str(text).replace(" ", "")
    units = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
    for num, unit in re.findall(r"(\d+)([a-z]+)", rest):
        if unit not in units:
            raise ValueError(f"unreadable duration {text!r}")
        total += int(num) * units[unit]
    if not re.fullmatch(r"(\d+[a-z]+)+", rest):
        raise ValueError(f"unreadable duration {text!r}")
    return total


def mounted_files(c, pod_spec, docs):
    """Path in the container -> (kind, name, key) for ConfigMap/Secret keys mounted as files."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    files = {}

    def add(base, kind, ref, explicit_items):
        obj = next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == ref.get("name")), None)
        items = ref.get("items") or explicit_items(obj)
        for item in items:
            files[f"{base.rstrip('/')}/{item['path']}"] = (kind, ref.get("name"), item["key"])

    def all_keys(obj):
        data = {} if obj is None else {**obj.get("data", {}), **obj.get("stringData", {})}
        return [{"key": k, "path": k} for k in data]

    for m in c.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        if "subPath" in m:
            continue
        if "configMap" in v:
            add(m["mountPath"], "ConfigMap", v["configMap"], all_keys)
        if "secret" in v:
            add(m["mountPath"], "Secret", {"name": v["secret"].get("secretName"), **v["secret"]}, all_keys)
        for source in v.get("projected", {}).get("sources", []):
            if "configMap" in source:
                add(m["mountPath"], "ConfigMap", source["configMap"], all_keys)
            if "secret" in source:
                add(m["mountPath"], "Secret", source["secret"], all_keys)
    return files


def data_of(docs, kind, name, key):
    obj = next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)
    if obj is None:
        return None
    if key in obj.get("stringData", {}):
        return obj["stringData"][key]
    if key not in obj.get("data", {}):
        return None
    value = obj["data"][key]
    return base64.b64decode(value).decode() if kind == "Secret" else value


def check_toml_keys(ck, at, config, allowed):
    for section, value in config.items():
        if section not in allowed:
            ck.expect(False, at, f"unknown top-level key {section!r} (the daemon refuses unknown keys)")
            continue
        rows = value if isinstance(value, list) else [value]
        for row in rows:
            if not isinstance(row, dict):
                ck.expect(False, at, f"{section} must be a table")
                continue
            for key in row:
                ck.expect(key in allowed[section], at, f"unknown key {section}.{key} (not in docs/operations.md)")
    ck.expect(bool(config.get("kafka", {}).get("bootstrap_servers")), at, "kafka.bootstrap_servers is required")
    ck.expect(isinstance(config.get("tables"), list) and config["tables"], at, "[[tables]] is required")


def port_number(c, port):
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == port), None)


def check_container(ck, dep, c, pod_spec):
    at = f"{where(dep)} container {c['name']}"
    pod_sc = pod_spec.get("securityContext", {})
    sc = c.get("securityContext", {})

    def effective(key):
        return sc.get(key, pod_sc.get(key))

    ck.expect(sc.get("readOnlyRootFilesystem") is True, at, "securityContext.readOnlyRootFilesystem must be true")
    ck.expect(effective("runAsNonRoot") is True, at, "runAsNonRoot must be true")
    ck.expect(effective("runAsUser") == USER, at, f"runAsUser must be {USER}")
    ck.expect(sc.get("allowPrivilegeEscalation") is False, at, "allowPrivilegeEscalation must be false")
    ck.expect("ALL" in sc.get("capabilities", {}).get("drop", []), at, "capabilities.drop must contain ALL")
    ck.expect((effective("seccompProfile") or {}).get("type") == "RuntimeDefault", at, "seccompProfile RuntimeDefault")
    limits = c.get("resources", {}).get("limits", {})
    requests = c.get("resources", {}).get("requests", {})
    ck.expect("memory" in limits and "cpu" in limits, at, "resources.limits.cpu and .memory are required")
    ck.expect("memory" in requests and "cpu" in requests, at, "resources.requests.cpu and .memory are required")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    ck.expect(env.get("WALCACHE_LOG_FORMAT") == "json", at, "env WALCACHE_LOG_FORMAT=json is required")
    image = c.get("image", "")
    tagged = ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image
    if ck.production:
        ck.expect(tagged and not image.endswith(":latest"), at, f"image {image!r} needs a pinned tag (overlay `images:`)")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        p = c.get(probe)
        if ck.expect(p and p.get("httpGet", {}).get("path"), at, f"{probe} with httpGet.path is required"):
            ck.expect(port_number(c, p["httpGet"].get("port")) is not None, at, f"{probe} port is not a container port")


def config_of(ck, dep, c, files):
    """The daemon's TOML configuration, read from the mounted ConfigMap named by --config."""
    at = f"{where(dep)} container {c['name']}"
    args = c.get("args", [])
    if not ck.expect("--config" in args[:-1], at, "args must pass --config <file>"):
        return None
    path = args[args.index("--config") + 1]
    if not ck.expect(path in files and files[path][0] == "ConfigMap", at, f"--config {path} is not mounted from a ConfigMap"):
        return None
    text = data_of(ck.docs, *files[path])
    if not ck.expect(text is not None, at, f"ConfigMap {files[path][1]} has no key {files[path][2]}"):
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        ck.expect(False, at, f"{path} is not valid TOML: {e}")
        return None


def check_file_ref(ck, at, files, key, path):
    if path is None:
        return
    if ck.expect(path in files, at, f"{key} = {path!r} is not a mounted file"):
        ck.expect(data_of(ck.docs, *files[path]) is not None, at, f"{key}: {files[path][0]} {files[path][1]} lacks key {files[path][2]}")


def check_listen(ck, at, c, listen, probe_names):
    host, _, port = str(listen).rpartition(":")
    ck.expect(host not in ("127.0.0.1", "localhost", "[::1]", "::1"), at, f"listen {listen} is loopback: probes cannot reach it")
    for probe in probe_names:
        if probe not in c:
            continue  # reported by check_container
        p = c[probe].get("httpGet", {})
        ck.expect(port_number(c, p.get("port")) == int(port), at, f"{probe} port must be the listen port {port}")


def check_producer(ck, dep):
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    at = where(dep)
    ck.expect(spec.get("replicas") == 2, at, "2 replicas: one leader, one standby")
    ru = spec.get("strategy", {}).get("rollingUpdate", {})
    ck.expect(spec.get("strategy", {}).get("type") == "RollingUpdate" and ru.get("maxSurge") == 0
              and ru.get("maxUnavailable") == 1, at, "strategy RollingUpdate with maxSurge 0, maxUnavailable 1")
    c = pod["containers"][0]
    ready = c.get("readinessProbe", {}).get("httpGet", {}).get("path", "")
    ck.expect(ready.startswith("/readyz") and "standby=ok" in ready, at, f"readiness path {ready!r} must be /readyz?standby=ok")
    ck.expect(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", at, "liveness on /healthz")
    ck.expect(c.get("startupProbe", {}).get("httpGet", {}).get("path") == "/healthz", at, "startupProbe on /healthz")
    files = mounted_files(c, pod, ck.docs)
    config = config_of(ck, dep, c, files)
    if config is None:
        return
    check_toml_keys(ck, at + " producer.toml", config, PRODUCER_KEYS)
    pg = config.get("postgres", {})
    ck.expect(bool(pg.get("url")), at, "postgres.url is required")
    ck.expect("password" not in pg and ":" not in str(pg.get("url", "")).split("@")[0].split("//")[-1],
              at, "no Postgres password in the ConfigMap: use postgres.password_file")
    check_file_ref(ck, at, files, "postgres.password_file", pg.get("password_file"))
    check_file_ref(ck, at, files, "postgres.sslrootcert", pg.get("sslrootcert"))
    if pg.get("sslmode") in ("verify-ca", "verify-full"):
        ck.expect(pg.get("sslrootcert") or "sslrootcert=" in str(pg.get("url")), at, f"sslmode {pg['sslmode']} needs sslrootcert")
    for name, path in config.get("kafka", {}).get("property_files", {}).items():
        check_file_ref(ck, at, files, f"kafka.property_files.{name}", path)
    check_listen(ck, at, c, config.get("ops", {}).get("listen", "127.0.0.1:9187"),
                 ("livenessProbe", "readinessProbe", "startupProbe"))
    shutdown = seconds(config.get("pipeline", {}).get("shutdown_timeout", "30s"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    ck.expect(grace > shutdown, at, f"terminationGracePeriodSeconds {grace} must exceed pipeline.shutdown_timeout {shutdown:g}s")


def check_consumer(ck, dep):
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    at = where(dep)
    c = pod["containers"][0]
    ck.expect(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", at, "readiness on /readyz")
    ck.expect(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", at, "liveness on /healthz")
    startup = c.get("startupProbe", {})
    budget = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
    ck.expect(budget >= 1800, at, f"startupProbe budget {budget}s must cover a restore (>= 30 minutes)")
    files = mounted_files(c, pod, ck.docs)
    config = config_of(ck, dep, c, files)
    if config is None:
        return None
    check_toml_keys(ck, at + " consumer.toml", config, CONSUMER_KEYS)
    for table in config.get("tables", []):
        ck.expect(table.get("contract") and table.get("topic"), at, "each [[tables]] needs contract and topic")
    http = config.get("http", {})
    listen = http.get("listen", "127.0.0.1:8080")
    check_listen(ck, at, c, listen, ("livenessProbe", "readinessProbe", "startupProbe"))
    ck.expect(http.get("auth_token_file") and not http.get("auth_token"), at,
              "off loopback the token must come from http.auth_token_file (not inline in the ConfigMap)")
    check_file_ref(ck, at, files, "http.auth_token_file", http.get("auth_token_file"))
    check_file_ref(ck, at, files, "http.export_token_file", http.get("export_token_file"))
    for name, path in config.get("kafka", {}).get("property_files", {}).items():
        check_file_ref(ck, at, files, f"kafka.property_files.{name}", path)
    capacity = size(config.get("cache", {}).get("capacity", "1GiB"))
    tables = len(config.get("tables", []))
    need = capacity * tables * RSS_PER_WEIGHED_BYTE + CONSUMER_BASE_MEMORY
    limit = quantity(c.get("resources", {}).get("limits", {}).get("memory", "0"))
    ck.expect(need <= limit, at, f"cache.capacity {capacity >> 20} MiB x {tables} table(s) x {RSS_PER_WEIGHED_BYTE} "
              f"+ {CONSUMER_BASE_MEMORY >> 20} MiB = {need / (1 << 20):.0f} MiB exceeds the memory limit {limit / (1 << 20):.0f} MiB")
    port = int(str(listen).rpartition(":")[2])
    token = files.get(http.get("auth_token_file"))
    return port, token


def check(docs, production):
    ck = Checker(docs, production)
    schema = json.loads((HERE / "schemas" / "podmonitor.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)

    for d in docs:
        labels = d["metadata"].get("labels") or {}
        ck.expect(labels.get("app.kubernetes.io/part-of") == PART_OF, where(d), "label app.kubernetes.io/part-of: walcache")
        # Generated ConfigMaps/Secrets get only part-of (kustomize v2.0.3: no per-generator labels).
        if d["kind"] not in ("Namespace", "ConfigMap", "Secret"):
            for key in ("app.kubernetes.io/name", "app.kubernetes.io/component"):
                ck.expect(labels.get(key), where(d), f"label {key} is required")
        if d["kind"] in CUSTOM_KINDS:
            for e in validator.iter_errors(d):
                path = ".".join(str(p) for p in e.absolute_path) or "(top)"
                ck.expect(False, where(d), f"{path}: {e.message} (schemas/podmonitor.schema.json)")
            ck.passed += 1

    deps = {}
    for dep in ck.find("Deployment"):
        pod = dep["spec"]["template"]
        tl = pod["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of"):
            ck.expect(tl.get(key), where(dep), f"pod template label {key} is required")
        ck.expect(selects(dep["spec"].get("selector"), tl), where(dep), "selector must match the pod template")
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            check_container(ck, dep, c, pod["spec"])
        deps[tl.get("app.kubernetes.io/component")] = dep
    for component in ("producer", "consumer"):
        ck.expect(component in deps, "rendered output", f"a Deployment with component {component} is required")
    if "producer" in deps:
        check_producer(ck, deps["producer"])
    consumer = check_consumer(ck, deps["consumer"]) if "consumer" in deps else None

    if "consumer" in deps:
        c_labels = deps["consumer"]["spec"]["template"]["metadata"]["labels"]
        c_port = consumer[0] if consumer else 8080
        services = [s for s in ck.find("Service") if s["spec"].get("selector")
                    and all(c_labels.get(k) == v for k, v in s["spec"]["selector"].items())]
        if ck.expect(services, "rendered output", "a Service must select the consumer pods"):
            c = deps["consumer"]["spec"]["template"]["spec"]["containers"][0]
            ck.expect(any(p.get("port") == 8080 and port_number(c, p.get("targetPort")) == c_port
                          for p in services[0]["spec"]["ports"]), where(services[0]), "port 8080 -> the consumer's listen port")
        pdbs = [p for p in ck.find("PodDisruptionBudget") if selects(p["spec"].get("selector"), c_labels)]
        if ck.expect(pdbs, "rendered output", "a PodDisruptionBudget must select the consumer pods"):
            ck.expect(pdbs[0]["spec"].get("minAvailable") == 1, where(pdbs[0]), "minAvailable 1")

    for pol in ck.find("NetworkPolicy"):
        targets = [d for d in deps.values() if selects(pol["spec"].get("podSelector"), d["spec"]["template"]["metadata"]["labels"])]
        ck.expect(targets, where(pol), "podSelector matches no Deployment's pods")
        for t in targets:
            c = t["spec"]["template"]["spec"]["containers"][0]
            ports = {p.get("containerPort") for p in c.get("ports", [])}
            allowed = {port_number(c, p.get("port")) for rule in pol["spec"].get("ingress", []) for p in rule.get("ports", [])}
            ck.expect(ports <= allowed, where(pol), f"ingress must allow the container ports {sorted(ports)}")

    for pm in ck.find("PodMonitor"):
        at = where(pm)
        targets = [d for d in deps.values() if selects(pm["spec"].get("selector"), d["spec"]["template"]["metadata"]["labels"])]
        if not ck.expect(len(targets) == 1, at, "selector must match the pods of exactly one Deployment"):
            continue
        c = targets[0]["spec"]["template"]["spec"]["containers"][0]
        for ep in pm["spec"].get("podMetricsEndpoints", []):
            ck.expect(port_number(c, ep.get("port")) is not None, at, f"port {ep.get('port')!r} is not a named container port")
            ck.expect(ep.get("path") == "/metrics", at, "path /metrics")
            if ep.get("interval") and ep.get("scrapeTimeout"):
                ck.expect(seconds(ep["scrapeTimeout"]) <= seconds(ep["interval"]), at, "scrapeTimeout above interval")
            if targets[0] is deps.get("consumer") and consumer and consumer[1]:
                cred = ep.get("authorization", {}).get("credentials", {})
                _, secret, key = consumer[1]
                ck.expect((cred.get("name"), cred.get("key")) == (secret, key), at,
                          f"authorization.credentials must be Secret {secret} key {key}, the consumer's token "
                          f"(got {cred.get('name')}/{cred.get('key')}): kustomize did not rename the reference?")

    if production:
        for d in ck.find("Secret") + ck.find("ConfigMap"):
            for key in {**d.get("data", {}), **d.get("stringData", {})}:
                value = data_of(docs, d["kind"], d["metadata"]["name"], key) or ""
                if PLACEHOLDER in value:
                    ck.warnings.append(f"{where(d)} key {key} is still a placeholder ({PLACEHOLDER}): supply it before deploying")
    return ck


def main(argv):
    if len(argv) == 4 and argv[1] == "split":
        docs = [d for d in yaml.safe_load_all(Path(argv[2]).read_text()) if d]
        builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
        Path(argv[3]).write_text(yaml.safe_dump_all(builtin, sort_keys=False))
        print(f"{len(builtin)} built-in objects for kubernetes-validate, "
              f"{len(docs) - len(builtin)} {'/'.join(sorted(CUSTOM_KINDS))} for the JSON schema")
        return 0
    if len(argv) in (3, 4) and argv[1] == "check" and argv[3:] in ([], ["--production"]):
        docs = [d for d in yaml.safe_load_all(Path(argv[2]).read_text()) if d]
        ck = check(docs, production=argv[3:] == ["--production"])
        for w in ck.warnings:
            print(f"WARNING {w}")
        for e in ck.errors:
            print(f"FAIL {e}")
        print(f"{len(docs)} objects, {ck.passed} assertions passed, {len(ck.errors)} failed, {len(ck.warnings)} warnings")
        return 1 if ck.errors else 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
