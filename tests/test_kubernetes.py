"""deploy/kubernetes/ and the Dockerfile, checked against what the collector really accepts.

No cluster and no Docker engine here: the manifests are validated against the Kubernetes API
schemas bundled with kubernetes-validate (offline, strict: unknown fields fail) for a fixed
Kubernetes version, and everything they say to the collector is run through the collector's own
code: the container args through bin/collector's argparse (app.cli.build_parser) and then
app.settings.load with the ConfigMap's settings.ini and the container's environment, the probe
paths against a real StatusServer, the CronJob's args through bin/check_raw_sanity's option
parsing. `kubectl kustomize` (when kubectl is installed) proves that N is written once.
"""
from __future__ import annotations

import configparser
import copy
import glob
import json
import os
import re
import shlex
import shutil
import subprocess

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import requests
import yaml

from app import cli, sanity, settings as settings_mod, sharding, status_api
from app.state import DEGRADED, ERROR, OFFLINE, READY, State

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "kubernetes")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
DOCKERIGNORE = os.path.join(ROOT, ".dockerignore")

# The oldest Kubernetes whose defaults run these manifests as written: the pod-index label is
# there from 1.28, matchLabelKeys in pod anti-affinity is on by default from 1.31.
K8S_VERSION = "1.31.0"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
SECRET_NAME = "quantlab-s3"
CONFIGMAP_NAME = "quantlab-collector-settings"
STATEFULSETS = {"a": "quantlab-collector-a", "b": "quantlab-collector-b"}
# docs/performance.md: peak RSS of the single-exchange held run at 237 k frames/s (285 MB) and
# the worst RSS measured anywhere (three exchanges in one process, queue full: 782 MB).
PEAK_RSS_MB, WORST_RSS_MB = 285, 782
DRAIN_MARGIN_S = 60          # the writer's drain (last rotation) on top of upload_stop_timeout


# ---- loading ---------------------------------------------------------------------------------

def manifest_files() -> list[str]:
    return sorted(glob.glob(os.path.join(K8S, "*.yaml")) + glob.glob(os.path.join(K8S, "*.yml")))


def load_docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def kustomization() -> dict:
    (doc,) = load_docs(os.path.join(K8S, "kustomization.yaml"))
    assert doc["kind"] == "Kustomization"
    return doc


def objects() -> list[dict]:
    """Every Kubernetes object of deploy/kubernetes/ (the Kustomization is kustomize's, not the API's)."""
    out = []
    for path in manifest_files():
        if os.path.basename(path) != "kustomization.yaml":
            out.extend(load_docs(path))
    return out


def find(kind: str, name: str) -> dict:
    found = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def statefulset(replica: str) -> dict:
    return find("StatefulSet", STATEFULSETS[replica])


def cronjob() -> dict:
    (cj,) = [o for o in objects() if o["kind"] == "CronJob"]
    return cj


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def workloads() -> list[dict]:
    return [o for o in objects() if o["kind"] in ("StatefulSet", "CronJob", "Deployment", "DaemonSet", "Job")]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def collector_container(sts: dict) -> dict:
    (c,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "collector"]
    return c


def settings_ini() -> str:
    return find("ConfigMap", CONFIGMAP_NAME)["data"]["settings.ini"]


@pytest.fixture
def ini(tmp_path) -> str:
    path = tmp_path / "settings.ini"
    path.write_text(settings_ini())
    return str(path)


def load_settings(ini_path: str, tmp_path, flags=None, environ=None):
    return settings_mod.load(ini_path, flags or {}, environ=dict(environ or {}),
                             dotenv_path=str(tmp_path / "no.env"))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    with open(DOCKERFILE) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if pending and line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = pending + line
            pending = ""
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instructions(word: str) -> list[str]:
    return [rest for w, rest in dockerfile() if w == word]


def entrypoint() -> list[str]:
    (ep,) = instructions("ENTRYPOINT")
    return json.loads(ep)


# ---- what Kubernetes does with a container ---------------------------------------------------

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, `$$` is a literal `$`, an
    undefined reference is left as written."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, text)


def references(container: dict) -> set[str]:
    texts = list(container.get("command", [])) + list(container.get("args", []))
    texts += [e["value"] for e in container.get("env", []) if "value" in e]
    return {m.group(1) for t in texts for m in _VAR.finditer(t) if m.group(1)}


def pod_labels(obj: dict, ordinal: int) -> dict[str, str]:
    """A StatefulSet pod's labels: the template's plus what the controller adds (>= 1.28)."""
    labels = dict(obj["spec"]["template"]["metadata"]["labels"])
    if obj["kind"] == "StatefulSet":
        labels[POD_INDEX_LABEL] = str(ordinal)
        labels["statefulset.kubernetes.io/pod-name"] = f"{obj['metadata']['name']}-{ordinal}"
    return labels


def container_env(obj: dict, container: dict, ordinal: int = 0) -> dict[str, str]:
    """The container's environment as the kubelet builds it (secrets as placeholders)."""
    name = f"{obj['metadata']['name']}-{ordinal}"
    labels = pod_labels(obj, ordinal) if obj["kind"] == "StatefulSet" else {}
    fields = {"metadata.name": name, "metadata.namespace": "quantlab", "spec.nodeName": "node-1",
              "status.podIP": "10.0.0.1"}
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            if m:
                assert m.group(1) in labels, f"{e['name']}: the pod has no label {m.group(1)}"
                env[e["name"]] = labels[m.group(1)]
            else:
                assert path in fields, f"{e['name']}: fieldRef {path} not simulated"
                env[e["name"]] = fields[path]
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            env[e["name"]] = f"<secret {ref['name']}/{ref['key']}>"
        elif "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            env[e["name"]] = find("ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            pytest.fail(f"{e['name']}: unsupported valueFrom {src}")
    return env


def argv(obj: dict, container: dict, ordinal: int = 0) -> list[str]:
    """What the container runs: command (else the image's ENTRYPOINT) + args, $(VAR) expanded."""
    env = container_env(obj, container, ordinal)
    cmd = container.get("command") or entrypoint()
    out = [expand(a, env) for a in list(cmd) + list(container.get("args", []))]
    unresolved = [a for a in out if _VAR.search(a.replace("$$", ""))]
    assert not unresolved, f"{container['name']}: $(VAR) not defined in the container env: {unresolved}"
    return out


def parse_collector_args(args: list[str]):
    try:
        return cli.build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"bin/collector rejects the manifest's args {args} (exit {e.code}); if it names "
                    f"--shard or --replica, the scale-out flags have not landed in app/cli.py yet")


def assert_config_mounted(obj: dict, container: dict, config_path: str) -> None:
    """The settings ConfigMap is mounted (read-only) where --config points."""
    mount_dir = os.path.dirname(config_path)
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    assert mount_dir in mounts, f"--config {config_path}: nothing mounted at {mount_dir}"
    assert mounts[mount_dir].get("readOnly") is True
    vol = volume_of(obj, mounts[mount_dir]["name"])
    assert vol.get("configMap", {}).get("name") == CONFIGMAP_NAME
    assert os.path.basename(config_path) in find("ConfigMap", CONFIGMAP_NAME)["data"]


def volume_of(obj: dict, mount_name: str) -> dict:
    for v in pod_spec(obj).get("volumes", []):
        if v["name"] == mount_name:
            return v
    if obj["kind"] == "StatefulSet":
        for t in obj["spec"].get("volumeClaimTemplates", []):
            if t["metadata"]["name"] == mount_name:
                return {"name": mount_name, "volumeClaimTemplate": t}
    pytest.fail(f"{obj['metadata']['name']}: no volume {mount_name}")


def quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    assert m and (m.group(2) in units or not m.group(2)), f"quantity {q}"
    return int(float(m.group(1)) * units.get(m.group(2), 1))


def cpu_millis(q) -> int:
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def resolve_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p for p in container.get("ports", []) if p.get("name") == port]
    return p["containerPort"]


# ---- schema validation -----------------------------------------------------------------------

def test_every_manifest_validates_against_the_kubernetes_schema():
    """kubernetes-validate, strict (unknown fields fail), bundled schemas, a fixed version."""
    # the schemas are bundled with the package (offline), one directory per version
    assert K8S_VERSION in kubernetes_validate.utils.all_versions()
    kinds = []
    for obj in objects():
        try:
            assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == "1.31"
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(e.message)
        kinds.append(obj["kind"])
    assert sorted(set(kinds)) == ["ConfigMap", "CronJob", "PodDisruptionBudget", "Service", "StatefulSet"]
    assert "Secret" not in kinds


def test_the_validator_is_not_vacuous():
    """The same call refuses a misspelt field and a wrong type: strict mode is on."""
    sts = copy.deepcopy(statefulset("a"))
    collector_container(sts)["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)
    sts = copy.deepcopy(statefulset("a"))
    sts["spec"]["replicas"] = "3"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_no_secret():
    k = kustomization()
    files = {os.path.basename(p) for p in manifest_files()} - {"kustomization.yaml"}
    assert sorted(k["resources"]) == sorted(files)
    assert k.get("namespace")
    assert "secretGenerator" not in k
    images = {i["name"] for i in k.get("images", [])}
    for obj in workloads():
        for c in containers(obj):
            assert c["image"].split(":")[0] in images, f"{c['image']} not under kustomization images"


# ---- the collector's command line, settings and environment ----------------------------------

def test_configmap_settings_are_known_keys_in_their_sections(ini, tmp_path):
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(settings_ini())
    for section in cp.sections():
        for key, value in cp.items(section):
            assert key in settings_mod.KEYS_BY_NAME, f"[{section}] {key}: not a setting"
            assert settings_mod.KEYS_BY_NAME[key].section == section, f"{key} belongs in another section"
            assert not re.search(r"[;#]", value), f"{key}: an inline comment would become part of the value"
    s = load_settings(ini, tmp_path)               # the collector's own validation
    assert s.storage_backend == "s3" and s.s3_bucket
    assert s.status_host == "0.0.0.0"
    assert s.status_port == 8000
    assert os.path.isabs(s.data_dir)
    assert not any(k.secret for k in settings_mod.KEYS if cp.has_option(k.section, k.name))


def test_collector_args_parse_and_load_with_the_collectors_own_code(ini, tmp_path):
    """Every pod of both StatefulSets: its argv through bin/collector's argparse, then the same
    merge as collector_main (settings.ini + the container env + the flags) validates."""
    for replica in STATEFULSETS:
        sts = statefulset(replica)
        n = sts["spec"]["replicas"]
        for ordinal in range(n):
            for c in containers(sts):
                run = argv(sts, c, ordinal)
                assert run[:2] == ["python", "bin/collector"], run
                args = parse_collector_args(run[2:])
                assert not args.probe
                flags = {k: v for k, v in vars(args).items()
                         if k not in ("config", "probe", "seconds") and v is not None}
                unknown = sorted(set(flags) - set(settings_mod.KEYS_BY_NAME))
                assert not unknown, f"flags {unknown} are not settings (app/settings.py KEYS)"
                assert {"shard", "replica", "instance_id"} <= set(flags)
                assert_config_mounted(sts, c, args.config)
                s = load_settings(ini, tmp_path, flags, container_env(sts, c, ordinal))
                assert s.instance_id == f"{STATEFULSETS[replica]}-{ordinal}"
                assert sharding.parse(str(s.shard)) == sharding.Shard(ordinal, n)
                assert s.replica == replica


def test_env_names_are_settings_aws_or_substitution_helpers():
    env_names = settings_mod.KEYS_BY_NAME
    for obj in workloads():
        for c in containers(obj):
            refs = references(c)
            defined = [e["name"] for e in c.get("env", [])]
            assert len(defined) == len(set(defined)), f"{c['name']}: an env name twice"
            assert refs <= set(defined), f"{c['name']}: $(VAR) of no env entry: {refs - set(defined)}"
            assert not c.get("envFrom"), "envFrom would bring names nobody checked"
            for name in defined:
                setting = settings_mod._setting_of(name)
                if setting is not None or name.startswith("AWS_"):
                    continue
                assert not name.startswith(settings_mod.ENV_PREFIX), f"{name}: an unknown QL_ name stops the collector"
                assert name.lower() not in env_names
                assert name in refs, f"{name}: neither a setting, nor AWS_*, nor used as $({name})"


def test_every_dollar_reference_resolves():
    for obj in workloads():
        n = obj["spec"].get("replicas", 1)
        for ordinal in range(n):
            for c in containers(obj):
                argv(obj, c, ordinal)                   # fails on an unresolved $(VAR)


# ---- shards and replicas ---------------------------------------------------------------------

def shard_arg(sts: dict) -> str:
    args = collector_container(sts)["args"]
    return args[args.index("--shard") + 1]


def test_shard_index_is_the_pod_ordinal_and_n_is_spec_replicas():
    for replica in STATEFULSETS:
        sts = statefulset(replica)
        c = collector_container(sts)
        m = re.fullmatch(r"\$\((\w+)\)/(\$\((\w+)\)|\d+)", shard_arg(sts))
        assert m, f"--shard {shard_arg(sts)}: expected $(POD_INDEX)/N"
        index_var = m.group(1)
        (index_env,) = [e for e in c["env"] if e["name"] == index_var]
        assert index_env["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{POD_INDEX_LABEL}']"
        if m.group(3):
            (count_env,) = [e for e in c["env"] if e["name"] == m.group(3)]
            n = int(count_env["value"])
        else:
            n = int(m.group(2))
        assert n == sts["spec"]["replicas"], f"{sts['metadata']['name']}: N={n}, spec.replicas={sts['spec']['replicas']}"
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        shards = []
        for ordinal in range(n):
            run = argv(sts, c, ordinal)
            shards.append(sharding.parse(run[run.index("--shard") + 1]))
        assert shards == [sharding.Shard(i, n) for i in range(n)]


def _get_path(obj, path: str):
    """kustomize's fieldPath (a.b.[name=x].c) read from a plain object."""
    node = obj
    for part in path.split("."):
        m = re.fullmatch(r"\[(\w+)=([^\]]+)\]", part)
        if m:
            (node,) = [item for item in node if str(item.get(m.group(1))) == m.group(2)]
        else:
            node = node[part]
    return node


def test_n_is_written_once_through_kustomize_replacements():
    """The kustomization copies replica a's spec.replicas into everything else that is N."""
    src_obj = statefulset("a")
    (rep,) = [r for r in kustomization()["replacements"] if r["source"]["fieldPath"] == "spec.replicas"]
    assert (rep["source"]["kind"], rep["source"]["name"]) == ("StatefulSet", STATEFULSETS["a"])
    n = _get_path(src_obj, rep["source"]["fieldPath"])
    targets = set()
    for t in rep["targets"]:
        obj = find(t["select"]["kind"], t["select"]["name"])
        for path in t["fieldPaths"]:
            assert str(_get_path(obj, path)) == str(n), f"{obj['metadata']['name']} {path}"
            targets.add((obj["metadata"]["name"], path))
    needed = {(STATEFULSETS["b"], "spec.replicas")}
    for replica in STATEFULSETS:
        m = re.fullmatch(r"\$\(\w+\)/\$\((\w+)\)", shard_arg(statefulset(replica)))
        assert m, "N must come from an env var for the replacement to reach it"
        needed.add((STATEFULSETS[replica],
                    f"spec.template.spec.containers.[name=collector].env.[name={m.group(1)}].value"))
    assert needed <= targets, f"not copied from spec.replicas: {needed - targets}"


@pytest.mark.skipif(not shutil.which("kubectl") and not shutil.which("kustomize"),
                    reason="neither kubectl nor kustomize installed")
def test_kustomize_build_carries_a_new_n_everywhere(tmp_path):
    """Change replica a's spec.replicas alone; the built output has that N everywhere."""
    work = tmp_path / "k"
    shutil.copytree(K8S, work)
    path = work / "statefulset-collector-a.yaml"
    text = path.read_text()
    assert len(re.findall(r"(?m)^  replicas: \d+$", text)) == 1
    path.write_text(re.sub(r"(?m)^  replicas: \d+$", "  replicas: 5", text))
    cmd = ["kubectl", "kustomize", str(work)] if shutil.which("kubectl") else ["kustomize", "build", str(work)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    for obj in built:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"].get("namespace") == kustomization()["namespace"]
    stss = {o["metadata"]["name"]: o for o in built if o["kind"] == "StatefulSet"}
    assert set(stss) == set(STATEFULSETS.values())
    for sts in stss.values():
        assert sts["spec"]["replicas"] == 5
        c = collector_container(sts)
        run = argv(sts, c, 4)
        assert sharding.parse(run[run.index("--shard") + 1]) == sharding.Shard(4, 5)


def test_both_replicas_record_the_same_shards_with_different_labels():
    a, b = statefulset("a"), statefulset("b")
    assert a["spec"]["replicas"] == b["spec"]["replicas"]
    n = a["spec"]["replicas"]
    ids = set()
    for replica, sts in (("a", a), ("b", b)):
        args = collector_container(sts)["args"]
        assert args[args.index("--replica") + 1] == replica
        assert sts["spec"]["template"]["metadata"]["labels"]["quantlab/replica"] == replica
        assert sts["spec"]["selector"]["matchLabels"]["quantlab/replica"] == replica
        for i in range(n):
            run = argv(sts, collector_container(sts), i)
            ids.add(run[run.index("--instance-id") + 1])
    assert len(ids) == 2 * n, "every pod needs its own instance id"
    # apart from the replica label, the --replica flag and b's anti-affinity, b is a's copy
    def normal(sts, replica):
        o = copy.deepcopy(sts)
        o["spec"]["template"]["spec"].pop("affinity", None)
        text = json.dumps({"spec": o["spec"]}, sort_keys=True)
        text = text.replace(f'"quantlab/replica": "{replica}"', '"quantlab/replica": "X"')
        return text.replace(f'"--replica", "{replica}"', '"--replica", "X"')
    assert normal(a, "a") == normal(b, "b")


def test_replica_b_avoids_the_node_of_its_replica_a_twin():
    a, b = statefulset("a"), statefulset("b")
    terms = (pod_spec(b).get("affinity", {}).get("podAntiAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", []))
    assert terms, "replica b needs a required podAntiAffinity against replica a"
    n = a["spec"]["replicas"]

    def forbids(term, incoming: dict, existing: dict) -> bool:
        sel = term["labelSelector"]
        assert not sel.get("matchExpressions")
        wanted = dict(sel.get("matchLabels", {}))
        for key in term.get("matchLabelKeys", []):   # merged from the incoming pod's labels
            if key in incoming:
                wanted[key] = incoming[key]
        return all(existing.get(k) == v for k, v in wanted.items())

    for term in terms:
        assert term["topologyKey"] == "kubernetes.io/hostname"
    for i in range(n):
        b_pod = pod_labels(b, i)
        for j in range(n):
            a_pod = pod_labels(a, j)
            hit = any(forbids(t, b_pod, a_pod) for t in terms)
            assert hit == (i == j), f"b-{i} vs a-{j}: forbidden={hit}"
        assert not any(forbids(t, b_pod, pod_labels(b, k)) for t in terms for k in range(n))


# ---- ports, probes, the status API ------------------------------------------------------------

def test_probe_and_service_ports_are_the_status_port(ini, tmp_path):
    port = load_settings(ini, tmp_path).status_port
    for replica in STATEFULSETS:
        sts = statefulset(replica)
        c = collector_container(sts)
        (metrics,) = [p for p in c["ports"] if p["name"] == "metrics"]
        assert metrics["containerPort"] == port
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert resolve_port(c, c[probe]["httpGet"]["port"]) == port, probe
    svc = find("Service", "quantlab-collector")
    (sp,) = svc["spec"]["ports"]
    assert sp["name"] == "metrics" and sp["port"] == port
    assert resolve_port(collector_container(statefulset("a")), sp["targetPort"]) == port
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(port)
    assert ann["prometheus.io/path"] == "/metrics"
    assert svc["spec"].get("publishNotReadyAddresses") is True   # an OFFLINE pod is still scraped
    for replica in STATEFULSETS:                                  # the Service covers both replicas
        sts = statefulset(replica)
        assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    cj_labels = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert not all(cj_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert str(port) in instructions("EXPOSE")[0].split()


def test_probe_paths_answer_as_intended():
    """A real StatusServer: readiness (/healthz) is 200 exactly for READY and DEGRADED, 503 for
    OFFLINE and ERROR; liveness and startup (/status) answer 200 in every state."""
    paths = {}
    for replica in STATEFULSETS:
        c = collector_container(statefulset(replica))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"].get("scheme", "HTTP") == "HTTP"
            paths.setdefault(probe, set()).add(c[probe]["httpGet"]["path"])
    assert paths == {"startupProbe": {"/status"}, "livenessProbe": {"/status"}, "readinessProbe": {"/healthz"}}
    st = State(version="test", instance_id="quantlab-collector-a-0", run_id="r", exchanges=("binance",))
    server = status_api.StatusServer(st, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        for state, ready in ((READY, True), (DEGRADED, True), (OFFLINE, False), (ERROR, False)):
            st.state = state
            r = requests.get(url + "/healthz", timeout=5)
            assert r.status_code == (200 if ready else 503), state
            r = requests.get(url + "/status", timeout=5)
            assert r.status_code == 200 and r.json()["state"] == state
            assert requests.get(url + "/metrics", timeout=5).status_code == 200
    finally:
        server.stop()


def test_probe_timing_fits_start_and_drain(ini, tmp_path):
    s = load_settings(ini, tmp_path)
    for replica in STATEFULSETS:
        sts = statefulset(replica)
        c = collector_container(sts)
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300    # discovery's longest back-off
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 60
        assert pod_spec(sts)["terminationGracePeriodSeconds"] >= s.upload_stop_timeout + DRAIN_MARGIN_S


# ---- volumes, resources, security -------------------------------------------------------------

def test_data_dir_is_on_a_persistent_volume_sized_for_the_spool(ini, tmp_path):
    s = load_settings(ini, tmp_path)
    for replica in STATEFULSETS:
        sts = statefulset(replica)
        c = collector_container(sts)
        mounts = [m for m in c["volumeMounts"]
                  if os.path.commonpath([s.data_dir, m["mountPath"]]) == m["mountPath"]]
        assert mounts, f"data_dir {s.data_dir} is on no volume (the root filesystem is read-only)"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        assert not mount.get("readOnly")
        vol = volume_of(sts, mount["name"])
        assert "volumeClaimTemplate" in vol, "the spool must outlive the pod: a volumeClaimTemplate"
        size = quantity_bytes(vol["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"])
        assert s.spool_max_bytes <= 0.85 * size, "spool_max_bytes must leave room on the volume"
        assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"


def test_resources_follow_the_benchmark():
    for replica in STATEFULSETS:
        r = collector_container(statefulset(replica))["resources"]
        assert quantity_bytes(r["requests"]["memory"]) >= PEAK_RSS_MB * 10**6
        assert quantity_bytes(r["limits"]["memory"]) >= WORST_RSS_MB * 10**6
    for obj in workloads():
        for c in containers(obj):
            r = c["resources"]
            assert quantity_bytes(r["requests"]["memory"]) <= quantity_bytes(r["limits"]["memory"])
            assert cpu_millis(r["requests"]["cpu"]) <= cpu_millis(r["limits"]["cpu"])


def dockerfile_uid() -> int:
    (user,) = instructions("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), "USER must be numeric for runAsNonRoot to verify it"
    return int(uid)


def test_pods_run_unprivileged_on_a_read_only_root():
    uid = dockerfile_uid()
    for obj in workloads():
        spec = pod_spec(obj)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == uid != 0
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        assert spec.get("enableServiceLinks") is False    # no STATUS_PORT=tcp://... from a Service
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key)
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
            assert not sc.get("privileged")
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volume_of(obj, tmp[0]["name"])
        if obj["kind"] == "StatefulSet":
            assert psc["fsGroup"] == uid


def test_no_secret_values_anywhere():
    files = manifest_files() + [DOCKERFILE, DOCKERIGNORE]
    patterns = [re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
                re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{30,}"),
                re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")]
    for path in files:
        text = open(path).read()
        for p in patterns:
            assert not p.search(text), f"{os.path.relpath(path, ROOT)}: looks like a credential ({p.pattern})"
    for obj in objects():
        assert obj["kind"] != "Secret"
    for obj in workloads():
        for c in containers(obj):
            for e in c.get("env", []):
                if e["name"].startswith("AWS_") or re.search(r"SECRET|PASSWORD|TOKEN|KEY", e["name"]):
                    assert "value" not in e, f"{e['name']}: a literal value"
                    assert e["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME
                    assert e["valueFrom"]["secretKeyRef"]["key"] == e["name"]
            names = {e["name"] for e in c.get("env", [])}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names


# ---- the sanity CronJob -------------------------------------------------------------------------

def test_cronjob_runs_check_raw_sanity_daily_on_the_bucket(ini, tmp_path, monkeypatch):
    cj = cronjob()
    spec = cj["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    minute, hour, dom, month, dow = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and (dom, month, dow) == ("*", "*", "*")
    assert spec["timeZone"] == "Etc/UTC"
    assert spec["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    (c,) = containers(cj)
    run = argv(cj, c)
    assert run[:2] == ["python", "bin/check_raw_sanity"]
    args = run[2:]
    parsed = sanity.build_parser().parse_args(args)
    assert parsed.json and parsed.root and parsed.config and not parsed.migrate_layout
    assert_config_mounted(cj, c, parsed.config)
    (vol,) = [v for v in pod_spec(cj)["volumes"] if "configMap" in v]
    assert vol["configMap"]["name"] == CONFIGMAP_NAME
    # the checker's own option handling, with the ConfigMap's settings.ini where --config points
    for name in list(os.environ):
        if name.startswith(settings_mod.ENV_PREFIX) or settings_mod._setting_of(name):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    local = [ini if a == parsed.config else a for a in args]
    opts, _ = sanity.options_from_args(local)
    s = load_settings(ini, tmp_path)
    assert opts.root == f"s3://{s.s3_bucket}/{s.s3_prefix}".rstrip("/"), "--root must be the collectors' bucket/prefix"
    assert opts.s3_region == s.s3_region and len(opts.dates) == 1
    sts_env = {e["name"]: e for e in collector_container(statefulset("a"))["env"] if e["name"].startswith("AWS_")}
    cj_env = {e["name"]: e for e in c["env"] if e["name"].startswith("AWS_")}
    assert cj_env == sts_env


# ---- the image -----------------------------------------------------------------------------------

def test_dockerfile_base_user_entrypoint_and_files():
    (base,) = instructions("FROM")
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim(?:-[a-z]+)?(@sha256:[0-9a-f]{64})?(?: AS \w+)?", base)
    assert m, f"FROM {base}: a slim Python image pinned to an exact version"
    assert (int(m.group(1)), int(m.group(2))) >= (3, 10)         # README: Python >= 3.10
    assert dockerfile_uid() != 0
    assert entrypoint() == ["python", "bin/collector"]
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    (workdir,) = instructions("WORKDIR")
    copied = []
    for rest in instructions("COPY"):
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        srcs = parts[:-1]
        for src in srcs:
            assert os.path.exists(os.path.join(ROOT, src)), f"COPY {src}: not in the repository"
            copied.append(src.rstrip("/"))
    assert {"requirements.txt", "app", "bin"} <= set(copied)
    assert os.path.isfile(os.path.join(ROOT, "bin", "collector"))
    assert os.path.isabs(workdir)
    ignored = [l.strip() for l in open(DOCKERIGNORE) if l.strip() and not l.startswith("#")]
    for src in copied:
        assert src not in ignored and src.split("/")[0] not in ignored, f"{src} is excluded by .dockerignore"
    for needed in (".git", ".env", ".venv", "data"):
        assert needed in ignored, f".dockerignore should exclude {needed}"


def test_image_installs_runtime_requirements_only():
    assert not any("requirements-dev" in rest for _w, rest in dockerfile())
    installs = [r for r in instructions("RUN") if "pip install" in r]
    assert installs
    for run in installs:
        cmd = run.split("pip install", 1)[1]
        words = [w for w in shlex.split(cmd.split("&&")[0]) if not w.startswith("--")]
        assert words == ["-r", "requirements.txt"], f"RUN {run}: installs more than requirements.txt"
    runtime = {re.split(r"[<>=!~\[ ;]", l.strip(), maxsplit=1)[0].lower()
               for l in open(os.path.join(ROOT, "requirements.txt")) if l.strip() and not l.startswith("#")}
    for tool in ("pytest", "pytest-timeout", "hypothesis", "moto", "freezegun", "kubernetes-validate", "supervisor"):
        assert tool not in runtime, f"{tool} is a test tool, not a runtime dependency"
