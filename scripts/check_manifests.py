"""Checks the manifests `helm template` rendered from one of helm/ember/ci/*-values.yaml, offline.

1. Every document validates, strictly (unknown fields are errors), against the Kubernetes API
   schemas of each pinned version given (the kubernetes-validate package). The one kind outside those
   schemas, the Prometheus Operator's ServiceMonitor, is checked against SERVICE_MONITOR below:
   the CRD's fields this chart writes, with their types, and nothing else allowed.
2. What the chart promises of every pod: non-root, read-only root filesystem, no capabilities,
   probes on /health/live and /health/ready, a termination grace that covers the preStop sleep
   and ember's drain, no secret written into the pod spec.
3. What each value set is for (EXPECT below): the workload kind, the subcommand, the image
   flavour, GPUs or none, the HPA's metrics.

  python scripts/check_manifests.py --kube-version 1.25.0 --kube-version 1.34.0 --values-set gpu rendered.yaml
Run by scripts/check_packaging.sh with the venv of scripts/setup_packaging_tools.sh.
"""

import argparse
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv

SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "tlsConfig": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}

# Per value set: (workload kind, subcommand, image tag suffix, GPUs per pod, HPA metric types).
EXPECT = {
    "default": ("Deployment", "serve", "-cuda", 1, None),
    "gpu": ("Deployment", "serve", "-cuda", 1, ["Resource", "Pods"]),
    "cpu": ("Deployment", "serve", "-cpu", 0, ["Resource"]),
    "edge": ("DaemonSet", "edge", "-edge", 0, None),
    "edge-deployment": ("Deployment", "edge", "-edge", 0, ["Pods"]),
}

SECRET_WORDS = ("KEY", "TOKEN", "PASSWORD", "SECRET")


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def check_pod(name, pod, problems):
    spec = pod["spec"]
    say = lambda msg: problems.append(f"{name}: {msg}")  # noqa: E731
    psc = spec.get("securityContext", {})
    if not psc.get("runAsNonRoot") or psc.get("runAsUser") != 10001:
        say("the pod must run as non-root user 10001")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        say("the pod's seccompProfile must be RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        say("the service account token must not be mounted")
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            say(f"container {c['name']}: root filesystem must be read-only")
        if sc.get("allowPrivilegeEscalation") is not False:
            say(f"container {c['name']}: allowPrivilegeEscalation must be false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            say(f"container {c['name']}: capabilities must drop ALL")
        if not any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])):
            say(f"container {c['name']}: /tmp must be a writable mount")
        for var, e in env_of(c).items():
            # A path to a mounted Secret is fine (EMBER_TLS_KEY=/etc/ember/tls/tls.key).
            literal = e.get("value")
            if any(w in var for w in SECRET_WORDS) and literal and not literal.startswith("/etc/ember/"):
                say(f"container {c['name']}: {var} is written into the pod spec; use a Secret")
    ember = next((c for c in spec["containers"] if c["name"] == "ember"), None)
    if ember is None:
        say("no container named ember")
        return None
    env = env_of(ember)
    for probe, path in (("startupProbe", "/health/ready"), ("livenessProbe", "/health/live"),
                        ("readinessProbe", "/health/ready")):
        if ember.get(probe, {}).get("httpGet", {}).get("path") != path:
            say(f"{probe} must GET {path}")
    port = ember["ports"][0]["containerPort"]
    if env.get("EMBER_ADDR", {}).get("value") != f"0.0.0.0:{port}":
        say(f"EMBER_ADDR must listen on 0.0.0.0:{port}, the container port")
    if env.get("EMBER_MODELS", {}).get("value") != "/models":
        say("EMBER_MODELS must be /models")
    grace = int(env["EMBER_SHUTDOWN_GRACE_SECS"]["value"])
    pre_stop = ember.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    if spec.get("terminationGracePeriodSeconds", 30) <= sleep + grace:
        say(f"terminationGracePeriodSeconds must exceed preStop sleep {sleep} s + drain {grace} s")
    if "EMBER_TLS_CERT" in env and ember["readinessProbe"]["httpGet"].get("scheme") != "HTTPS":
        say("ember serves HTTPS (EMBER_TLS_CERT) but the probes use HTTP")
    return ember


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kube-version", action="append", required=True)
    ap.add_argument("--values-set", required=True, choices=sorted(EXPECT))
    ap.add_argument("manifests")
    args = ap.parse_args()

    with open(args.manifests) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    problems = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") == "ServiceMonitor":
            for e in jsonschema.Draft7Validator(SERVICE_MONITOR).iter_errors(doc):
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{what}: ServiceMonitor: {path}: {e.message}")
            continue
        for version in args.kube_version:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{what}: Kubernetes {version} schema: {path}: {e.message}")
            except kv.SchemaNotFoundError:
                problems.append(f"{what}: no schema for {doc.get('apiVersion')} in Kubernetes {version}")

    kind, command, flavour, gpus, hpa_metrics = EXPECT[args.values_set]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    if [w["kind"] for w in workloads] != [kind]:
        problems.append(f"expected one {kind}, rendered {[w['kind'] for w in workloads]}")
    for w in workloads:
        ember = check_pod(f"{w['kind']}/{w['metadata']['name']}", w["spec"]["template"], problems)
        if ember is None:
            continue
        if ember.get("args") != [command]:
            problems.append(f"expected `ember {command}`, rendered args {ember.get('args')}")
        if not ember["image"].endswith(flavour):
            problems.append(f"expected the {flavour[1:]} image, rendered {ember['image']}")
        limits = ember.get("resources", {}).get("limits", {})
        if int(limits.get("nvidia.com/gpu", 0)) != gpus:
            problems.append(f"expected {gpus} nvidia.com/gpu, rendered {limits.get('nvidia.com/gpu')}")
        device = env_of(ember)["EMBER_DEVICE"]["value"]
        if (device.startswith("cuda")) != (gpus > 0):
            problems.append(f"EMBER_DEVICE={device} with {gpus} GPUs")
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    rendered_metrics = [m["type"] for m in hpas[0]["spec"]["metrics"]] if hpas else None
    if rendered_metrics != hpa_metrics:
        problems.append(f"expected HPA metrics {hpa_metrics}, rendered {rendered_metrics}")

    kinds = ", ".join(sorted({d["kind"] for d in docs}))
    if problems:
        print(f"check_manifests: {args.values_set}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"  {args.values_set}: {len(docs)} manifests valid for Kubernetes "
          f"{' and '.join(args.kube_version)} ({kinds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
