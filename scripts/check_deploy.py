#!/usr/bin/env python3
"""Offline checks of deploy/: renders every kustomization, validates each object against the
Kubernetes JSON schemas (kubernetes-validate, strict), and checks that the pieces agree with each
other and with the `tessera` binary. Run through scripts/check_deploy.sh, which installs what
this needs.

usage: check_deploy.py --kubectl PATH --tessera PATH [--kube-version X.Y.Z]
"""

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# Every kustomization a user may apply; base/ and the overlays must all render and pass.
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/cpu-dev", "k8s/overlays/gpu", "k8s/overlays/external-etcd", "k8s/overlays/autoscale"]
ROLES = ("coordinator", "worker")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
CLUSTER_SCOPED = ("Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class Failures:
    def __init__(self):
        self.messages = []

    def add(self, where, message):
        self.messages.append(f"{where}: {message}")


def tessera_help(tessera, role):
    """The flags `tessera ROLE --help` lists, the ones its usage line requires, and defaults."""
    text = subprocess.run([tessera, role, "--help"], check=True, capture_output=True, text=True).stdout
    flags = set(re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", text))
    usage = next(line for line in text.splitlines() if line.startswith("Usage:"))
    required = set(re.findall(r"(?<!\[)(--[a-z0-9-]+) <", usage))
    defaults = {}
    for flag, body in re.findall(r"(?ms)^\s+(--[a-z0-9-]+)[^\n]*\n(.*?)(?=^\s+-|\Z)", text):
        found = re.search(r"\[default: ([^\]]*)\]", body)
        if found:
            defaults[flag] = found.group(1)
    if not flags:
        raise SystemExit(f"check_deploy: no flags found in `{tessera} {role} --help`")
    return {"flags": flags, "required": required, "defaults": defaults}


def parse_flags(args):
    """`--flag=value` and `--flag value` pairs of an argument list (value None for a switch)."""
    parsed = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        if arg.startswith("--"):
            if "=" in arg:
                name, value = arg.split("=", 1)
            elif i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                name, value = arg, str(args[i + 1])
                i += 1
            else:
                name, value = arg, None
            parsed[name] = value
        i += 1
    return parsed


def render(kubectl, kustomization):
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY / kustomization)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"check_deploy: `kubectl kustomize deploy/{kustomization}` failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def name_of(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def pod_templates(objects):
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            yield obj, obj["spec"]["template"]


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def resolve(value, container, configmaps):
    """Expands $(VAR) the way the kubelet does, from env values and envFrom ConfigMaps."""
    env = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            env.update(configmaps.get(ref["name"], {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), str(var["value"]))
        else:
            env[var["name"]] = None  # downward API / secret: known only at run time
    unresolved = [m for m in VAR_REF.findall(value) if m not in env]
    text = VAR_REF.sub(lambda m: env.get(m.group(1)) or m.group(0), value)
    return text, unresolved


def declared_ports(container):
    ports = set()
    for port in container.get("ports", []):
        ports.add(port["containerPort"])
        if "name" in port:
            ports.add(port["name"])
    return ports


def probe_port(probe):
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            return kind, probe[kind]["port"]
    return None, None


def check_objects(where, objects, helps, kube_version, failures):
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(p) for p in error.path)
            failures.add(f"{where} {name_of(obj)}", f"schema (Kubernetes {kube_version}): {error.message} at {path}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as error:
            failures.add(f"{where} {name_of(obj)}", f"schema: {error}")

    namespaces = {obj["metadata"].get("namespace") for obj in objects if obj["kind"] not in CLUSTER_SCOPED}
    if len(namespaces) != 1 or None in namespaces:
        failures.add(where, f"namespaced objects must share one explicit namespace, found {sorted(map(str, namespaces))}")

    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    templates = list(pod_templates(objects))
    roles_seen = set()

    for workload, template in templates:
        at = f"{where} {name_of(workload)}"
        labels = template["metadata"].get("labels", {})
        if not selects(workload["spec"]["selector"].get("matchLabels", {}), labels):
            failures.add(at, "spec.selector does not match the pod template's labels")
        if workload["kind"] == "StatefulSet" and workload["spec"].get("serviceName") not in services:
            failures.add(at, f"serviceName {workload['spec'].get('serviceName')!r} is not a Service here")
        spec = template["spec"]
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim")
            if claim and claim["claimName"] not in claims:
                failures.add(at, f"volume {volume['name']} uses a PersistentVolumeClaim that is not here: {claim['claimName']}")
        for container in spec["containers"]:
            cat = f"{at} container {container['name']}"
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref and ref["name"] not in configmaps:
                    failures.add(cat, f"envFrom names a ConfigMap that is not here: {ref['name']}")
            ports = declared_ports(container)
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(probe_name)
                if probe:
                    kind, port = probe_port(probe)
                    if port is not None and port not in ports:
                        failures.add(cat, f"{probe_name} ({kind}) uses port {port!r}, not a declared container port {sorted(map(str, ports))}")
            image = str(container.get("image", ""))
            if not re.match(r"^([^/]+/)*tessera(:[^/]*)?$", image):
                continue
            args = [str(a) for a in container.get("args", [])]
            if not args or args[0] not in ROLES:
                failures.add(cat, f"a tessera container's first arg must be a role {ROLES}, got {args[:1]}")
                continue
            role = args[0]
            roles_seen.add(role)
            help_ = helps[role]
            flags = parse_flags(args[1:])
            for flag in flags:
                if flag not in help_["flags"]:
                    failures.add(cat, f"`tessera {role}` has no flag {flag} (see `tessera {role} --help`)")
            for flag in help_["required"] - set(flags):
                failures.add(cat, f"`tessera {role}` requires {flag}")
            for arg in args:
                _, unresolved = resolve(arg, container, configmaps)
                if unresolved:
                    failures.add(cat, f"arg {arg!r} refers to undefined variable(s) {unresolved}")
            if role == "worker":
                check_worker(cat, spec, container, flags, help_, configmaps, failures)
            if role == "coordinator":
                for probe_name in ("readinessProbe", "livenessProbe"):
                    if "grpc" not in container.get(probe_name, {}):
                        failures.add(cat, f"{probe_name} must be a gRPC health probe")
                ready = container.get("readinessProbe", {}).get("grpc", {}).get("service")
                if ready != "tessera.v1.Inference":
                    failures.add(cat, f"readinessProbe must check tessera.v1.Inference, not {ready!r}")
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if where.endswith("/gpu") and role == "worker" and not gpus:
                failures.add(cat, "workers of the gpu overlay must request nvidia.com/gpu")
            if not where.endswith("/gpu") and gpus:
                failures.add(cat, "only the gpu overlay may request nvidia.com/gpu")

    for role in ROLES:
        if role not in roles_seen:
            failures.add(where, f"no container runs `tessera {role}`")

    for service in services.values():
        at = f"{where} {name_of(service)}"
        selector = service["spec"].get("selector", {})
        matched = [t for _, t in templates if selects(selector, t["metadata"].get("labels", {}))]
        if not matched:
            failures.add(at, f"selector {selector} matches no pod template")
            continue
        ports = set().union(*(declared_ports(c) for t in matched for c in t["spec"]["containers"]))
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if target not in ports:
                failures.add(at, f"port {port.get('name', port['port'])} targets {target!r}, which the selected pods do not declare")

    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"].get("matchLabels", {})
        if not any(selects(selector, t["metadata"].get("labels", {})) for _, t in templates):
            failures.add(f"{where} {name_of(pdb)}", f"selector {selector} matches no pod template")


def check_worker(at, spec, container, flags, help_, configmaps, failures):
    """Kubernetes must wait longer than the worker drains, or it kills running sequences."""
    drain = flags.get("--drain-timeout-secs", help_["defaults"].get("--drain-timeout-secs"))
    drain, _ = resolve(str(drain), container, configmaps)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not drain.isdigit():
        failures.add(at, f"--drain-timeout-secs does not resolve to a number: {drain!r}")
    elif grace <= int(drain):
        failures.add(at, f"terminationGracePeriodSeconds ({grace}) must exceed --drain-timeout-secs ({drain})")
    for flag in ("--etcd", "--advertise-host", "--id"):
        if flag not in flags:
            failures.add(at, f"a worker in a pod needs {flag} (registration, the pod IP, a unique id)")


def check_compose(helps, failures):
    where = "deploy/docker-compose.yml"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    roles = set()
    for name, service in compose["services"].items():
        command = service.get("command")
        if not isinstance(command, list) or not command or command[0] not in ROLES:
            continue
        role = command[0]
        roles.add(role)
        flags = parse_flags([str(c) for c in command[1:]])
        for flag in flags:
            if flag not in helps[role]["flags"]:
                failures.add(f"{where} {name}", f"`tessera {role}` has no flag {flag}")
        for flag in helps[role]["required"] - set(flags):
            failures.add(f"{where} {name}", f"`tessera {role}` requires {flag}")
    workers = [s for s in compose["services"].values() if (s.get("command") or [None])[0] == "worker"]
    if "coordinator" not in roles or len(workers) < 2 or "etcd" not in compose["services"]:
        failures.add(where, "expected etcd, a coordinator and at least 2 workers")


def check_dockerfiles(failures):
    features = tomllib.loads((ROOT / "worker/collective/Cargo.toml").read_text()).get("features", {})
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / "docker" / name).read_text()
        where = f"deploy/docker/{name}"
        if 'ENTRYPOINT ["tessera"]' not in text:
            failures.add(where, 'expected ENTRYPOINT ["tessera"]')
        if not re.search(r"(?m)^USER\s+(?!0\b|root\b)", text):
            failures.add(where, "expected a non-root USER")
        for package, feature in re.findall(r"--features\s+([\w-]+)/([\w-]+)", text):
            if package == "tessera-collective" and feature not in features:
                failures.add(where, f"tessera-collective has no feature {feature!r}")
    if "nccl" not in (DEPLOY / "docker" / "Dockerfile.cuda").read_text():
        failures.add("deploy/docker/Dockerfile.cuda", "expected a build with the nccl feature")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--tessera", required=True)
    parser.add_argument("--kube-version", default=kubernetes_validate.latest_version())
    args = parser.parse_args()

    helps = {role: tessera_help(args.tessera, role) for role in ROLES}
    failures = Failures()
    counts = []
    for kustomization in KUSTOMIZATIONS:
        objects = render(args.kubectl, kustomization)
        check_objects(f"deploy/{kustomization}", objects, helps, args.kube_version, failures)
        counts.append(f"{kustomization}: {len(objects)} objects")
    check_compose(helps, failures)
    check_dockerfiles(failures)

    if failures.messages:
        print(f"check_deploy: {len(failures.messages)} problem(s):", file=sys.stderr)
        for message in failures.messages:
            print(f"  - {message}", file=sys.stderr)
        return 1
    print(f"check_deploy: ok (Kubernetes {args.kube_version} schemas, strict): " + "; ".join(counts)
          + "; docker-compose.yml and Dockerfiles consistent with `tessera --help`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
