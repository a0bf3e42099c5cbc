#!/usr/bin/env python3
"""Offline checks of deploy/: renders every kustomization, validates each object against the
Kubernetes JSON schemas (kubernetes-validate, strict), and checks that the pieces agree with each
other and with the `tessera` binary. Run through scripts/check_deploy.sh, which installs what
this needs.

usage: check_deploy.py --kubectl PATH --tessera PATH [--kube-version X.Y.Z]

After the real manifests pass, a self-test breaks them on purpose, one defect at a time (a
ReadWriteOnce volume under an autoscaler, `replicas` in the scaled target, a drain shorter than
the longest request, ...), and fails unless each broken copy is caught with the expected message.
"""

import argparse
import copy
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
KUSTOMIZATIONS = [
    "k8s/base",
    "k8s/overlays/cpu-dev",
    "k8s/overlays/gpu",
    "k8s/overlays/external-etcd",
    "k8s/overlays/monitoring",
    "k8s/overlays/autoscale",
    "k8s/overlays/autoscale-keda",
]
ROLES = ("coordinator", "worker", "group")
# Custom resources: no Kubernetes schema to validate against; the checks below read them.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
# What an autoscaler may scale on: the coordinator's gauges of present demand (a counter or a
# rate of refusals asks for the maximum after a single refusal).
SCALING_GAUGES = {"tessera_queued_requests_per_group", "tessera_kv_utilisation", "tessera_ring_waiting_tokens"}
# Ports a group pod's ranks use: rank r on --port + r, up to `tessera group`'s largest --tp.
MAX_TP = 64
SINGLE_WRITER_MODES = {"ReadWriteOnce", "ReadWriteOncePod"}
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


def split_group_args(args):
    """`tessera group` args: its own flags, and the worker flags after `--`."""
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1:]
    return args, []


def quantity(text):
    """A Kubernetes quantity (cpu or memory) as a number: "4" -> 4, "500m" -> 0.5, "3Gi" -> 3*2**30."""
    text = str(text)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def replicas_of(workload, scalers):
    """Most pods a workload may run: its autoscaler's maximum, else its replicas (default 1)."""
    name = workload["metadata"]["name"]
    for scaler in scalers:
        if scaler_target(scaler) == (workload["kind"], name):
            return scaler_max(scaler)
    if workload["kind"] == "Job":
        return workload["spec"].get("parallelism", 1)
    return workload["spec"].get("replicas", 1)


def scaler_target(scaler):
    ref = scaler["spec"]["scaleTargetRef"]
    return ref.get("kind", "Deployment"), ref["name"]


def scaler_max(scaler):
    return scaler["spec"].get("maxReplicas", scaler["spec"].get("maxReplicaCount", 100))


def scaler_metrics(scaler):
    """(metric name, target type, target) of an HPA's or ScaledObject's triggers."""
    if scaler["kind"] == "HorizontalPodAutoscaler":
        for metric in scaler["spec"].get("metrics", []):
            source = metric.get(metric["type"][0].lower() + metric["type"][1:], {})
            name = source.get("metric", {}).get("name") or source.get("name") or metric["type"]
            target = source.get("target", {})
            yield name, target.get("type"), target.get("value") or target.get("averageValue") or target.get("averageUtilization")
    else:
        for trigger in scaler["spec"].get("triggers", []):
            query = trigger.get("metadata", {}).get("query", "")
            names = re.findall(r"tessera_[a-z_]+", query) or [trigger.get("type")]
            yield names[0], trigger.get("metricType", "AverageValue"), trigger.get("metadata", {}).get("threshold")


def behavior_of(scaler):
    if scaler["kind"] == "HorizontalPodAutoscaler":
        return scaler["spec"].get("behavior", {})
    return scaler["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})


def policy_allows(policy, pod_labels, port, source_labels=None):
    """Whether a NetworkPolicy lets traffic to `port` of a pod with `pod_labels` in: from
    anyone (source_labels None asks "from anywhere at all"), or from a pod with source_labels."""
    if not selects_all(policy["spec"].get("podSelector", {}).get("matchLabels", {}), pod_labels):
        return False
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port or (isinstance(port, int) and isinstance(p.get("port"), int)
                                                        and p["port"] <= port <= p.get("endPort", p["port"])) for p in ports):
            continue
        sources = rule.get("from")
        if not sources:
            return True
        if source_labels is None:
            # Any listed source will do when asking whether the port is reachable at all.
            return True
        for source in sources:
            if "podSelector" in source and "namespaceSelector" not in source:
                if selects_all(source["podSelector"].get("matchLabels", {}), source_labels):
                    return True
    return False


def selects_all(selector, labels):
    """A matchLabels selector; the empty one selects every pod."""
    return all(labels.get(k) == v for k, v in selector.items())


def check_objects(where, objects, helps, kube_version, failures, schemas=True):
    for obj in objects:
        if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_KINDS:
            if not obj.get("spec"):
                failures.add(f"{where} {name_of(obj)}", "a custom resource without a spec")
            continue
        if not schemas:
            continue
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
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    scalers = [o for o in objects if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    templates = list(pod_templates(objects))
    roles_seen = set()
    # What the tessera containers say, for the checks across objects below.
    found = {"coordinator": [], "group": []}

    for workload, template in templates:
        at = f"{where} {name_of(workload)}"
        labels = template["metadata"].get("labels", {})
        if workload["kind"] != "Job" and not selects(workload["spec"]["selector"].get("matchLabels", {}), labels):
            failures.add(at, "spec.selector does not match the pod template's labels")
        if workload["kind"] == "StatefulSet" and workload["spec"].get("serviceName") not in services:
            failures.add(at, f"serviceName {workload['spec'].get('serviceName')!r} is not a Service here")
        spec = template["spec"]
        check_pod_hardening(at, spec, failures)
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
                if "@sha256:" not in image:
                    failures.add(cat, f"image {image!r} is not pinned by digest (name:tag@sha256:...)")
                continue
            args = [str(a) for a in container.get("args", [])]
            if not args or args[0] not in ROLES:
                failures.add(cat, f"a tessera container's first arg must be a role {ROLES}, got {args[:1]}")
                continue
            role = args[0]
            roles_seen.add(role)
            own, worker_args = split_group_args(args[1:]) if role == "group" else (args[1:], [])
            flags = check_flags(cat, role, own, helps, failures)
            worker_flags = check_flags(cat, "worker", worker_args, helps, failures, required=False) if role == "group" else {}
            for arg in args:
                _, unresolved = resolve(arg, container, configmaps)
                if unresolved:
                    failures.add(cat, f"arg {arg!r} refers to undefined variable(s) {unresolved}")
            if role == "worker":
                check_worker(cat, spec, container, flags, helps["worker"], configmaps, failures)
                tp, _ = resolve("$(TESSERA_TP)", container, configmaps)
                if tp.isdigit() and int(tp) > 1:
                    failures.add(cat, "single-rank worker pods with TP > 1: nothing keeps a group's ranks together; run `tessera group`")
            if role == "group":
                check_worker(cat, spec, container, worker_flags, helps["worker"], configmaps, failures, unit=True)
                found["group"].append((workload, spec, container, flags, worker_flags))
            if role == "coordinator":
                found["coordinator"].append((workload, spec, container, flags))
                for probe_name in ("readinessProbe", "livenessProbe"):
                    if "grpc" not in container.get(probe_name, {}):
                        failures.add(cat, f"{probe_name} must be a gRPC health probe")
                ready = container.get("readinessProbe", {}).get("grpc", {}).get("service")
                if ready != "tessera.v1.Inference":
                    failures.add(cat, f"readinessProbe must check tessera.v1.Inference, not {ready!r}")
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if where.endswith("/gpu") and role == "group":
                tp, _ = resolve(str(flags.get("--tp")), container, configmaps)
                if str(gpus) != tp:
                    failures.add(cat, f"a group pod of the gpu overlay must request one nvidia.com/gpu per rank ({tp}), not {gpus}")
                if not spec.get("runtimeClassName"):
                    failures.add(cat, "GPU pods need a runtimeClassName (the NVIDIA container runtime)")
            if role == "coordinator" and (gpus or image.endswith(":cuda")):
                failures.add(cat, "the coordinator does no math: it runs on the CPU image and requests no GPU")
            if not where.endswith("/gpu") and gpus:
                failures.add(cat, "only the gpu overlay may request nvidia.com/gpu")

    for role in ("coordinator", "group"):
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

    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for pdb in pdbs:
        selector = pdb["spec"]["selector"].get("matchLabels", {})
        if not any(selects(selector, t["metadata"].get("labels", {})) for _, t in templates):
            failures.add(f"{where} {name_of(pdb)}", f"selector {selector} matches no pod template")
    for role in ("coordinator", "group"):
        for workload, *_ in found[role]:
            labels = workload["spec"]["template"]["metadata"].get("labels", {})
            if not any(selects(p["spec"]["selector"].get("matchLabels", {}), labels) for p in pdbs):
                failures.add(f"{where} {name_of(workload)}", "no PodDisruptionBudget covers it")

    check_volumes(where, templates, claims, scalers, failures)
    check_scalers(where, objects, templates, scalers, found, failures)
    check_resources(where, found, configmaps, failures)
    check_settings(where, found, templates, configmaps, failures)
    check_network(where, objects, templates, policies, found, configmaps, failures)
    check_monitors(where, objects, services, failures)


def check_flags(at, role, args, helps, failures, required=True):
    help_ = helps[role]
    flags = parse_flags(args)
    for flag in flags:
        if flag not in help_["flags"]:
            failures.add(at, f"`tessera {role}` has no flag {flag} (see `tessera {role} --help`)")
    if required:
        for flag in help_["required"] - set(flags):
            failures.add(at, f"`tessera {role}` requires {flag}")
    return flags


def check_pod_hardening(at, spec, failures):
    """The "restricted" Pod Security Standard's essentials, and no API token in pods that
    never call the Kubernetes API."""
    if spec.get("automountServiceAccountToken") is not False:
        failures.add(at, "automountServiceAccountToken must be false (no pod here talks to the Kubernetes API)")
    pod = spec.get("securityContext", {})
    if pod.get("runAsNonRoot") is not True or pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        failures.add(at, "the pod must set runAsNonRoot: true and seccompProfile RuntimeDefault (Pod Security restricted)")
    for container in spec.get("initContainers", []) + spec["containers"]:
        sc = container.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]:
            failures.add(f"{at} container {container['name']}",
                         "needs allowPrivilegeEscalation: false and capabilities drop [ALL] (Pod Security restricted)")


def check_volumes(where, templates, claims, scalers, failures):
    """A volume many pods use, or one that is written while others read it, needs an access
    mode that allows it; a single-node mode only on a cluster declared to be one node, and
    never under an autoscaler."""
    for name, claim in claims.items():
        at = f"{where} {name_of(claim)}"
        modes = set(claim["spec"].get("accessModes", []))
        users = [(w, v) for w, t in templates for v in t["spec"].get("volumes", [])
                 if v.get("persistentVolumeClaim", {}).get("claimName") == name]
        pods = sum(replicas_of(w, scalers) for w, _ in users)
        writers = [w for w, v in users if not v["persistentVolumeClaim"].get("readOnly")]
        scaled = [w for w, _ in users if any(scaler_target(s) == (w["kind"], w["metadata"]["name"]) for s in scalers)]
        one_node = claim["metadata"].get("annotations", {}).get("tessera.dev/one-node") == "true"
        if modes <= SINGLE_WRITER_MODES:
            if scaled:
                failures.add(at, f"ReadWriteOnce under an autoscaler ({name_of(scaled[0])}): new pods on other nodes cannot mount it")
            elif pods > 1 and not one_node:
                failures.add(at, f"ReadWriteOnce but mounted by up to {pods} pods on any node; use ReadWriteMany (or annotate a one-node cluster)")
        elif writers and "ReadWriteMany" not in modes:
            failures.add(at, f"{name_of(writers[0])} writes it, but its access modes {sorted(modes)} allow no writer beside readers")


def check_scalers(where, objects, templates, scalers, found, failures):
    """Autoscalers scale whole groups, on gauges of present demand, gently; and only where the
    rest of the deployment can follow (shared volumes, a replicated registry)."""
    groups = {(w["kind"], w["metadata"]["name"]) for w, *_ in found["group"]}
    workloads = {(w["kind"], w["metadata"]["name"]): w for w, _ in templates}
    for scaler in scalers:
        at = f"{where} {name_of(scaler)}"
        target = scaler_target(scaler)
        if target not in workloads:
            failures.add(at, f"scales {target}, which is not here")
            continue
        if target not in groups:
            failures.add(at, f"scales {target[0]}/{target[1]}, which is not a group workload (`tessera group`): scaling single ranks splits groups")
        if "replicas" in workloads[target]["spec"]:
            failures.add(at, f"the scaled {target[0]}/{target[1]} sets replicas: every apply would reset the scale")
        for name, kind, value in scaler_metrics(scaler):
            if name not in SCALING_GAUGES:
                failures.add(at, f"scales on {name}, which is not a gauge of present demand {sorted(SCALING_GAUGES)}")
        behavior = behavior_of(scaler)
        down = behavior.get("scaleDown", {}).get("stabilizationWindowSeconds")
        if down is None or down < 300:
            failures.add(at, f"scaleDown stabilizationWindowSeconds must be at least 300 (got {down}): groups load for minutes")
        if behavior.get("scaleUp", {}).get("stabilizationWindowSeconds") is None:
            failures.add(at, "scaleUp needs a stabilizationWindowSeconds")
    etcd = [o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "etcd"]
    if scalers and etcd and etcd[0]["spec"].get("replicas", 1) < 3:
        failures.add(where, "an autoscaled deployment with fewer than 3 etcd members: one member's loss stops registration")


def check_resources(where, found, configmaps, failures):
    """Group pods: Guaranteed QoS, math threads from the CPU limit, and a memory limit that holds
    the weights, the KV cache and each rank's overhead (the StatefulSet's annotations)."""
    for workload, spec, container, flags, worker_flags in found["group"]:
        at = f"{where} {name_of(workload)}"
        resources = container.get("resources", {})
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        for kind in ("cpu", "memory"):
            if kind not in limits or kind not in requests or quantity(requests[kind]) != quantity(limits[kind]):
                failures.add(at, f"{kind}: requests = limits, both set (got {requests.get(kind)} / {limits.get(kind)})")
        env = container.get("env", [])
        threads = flags.get("--threads", "")
        var = VAR_REF.fullmatch(str(threads))
        source = next((e for e in env if var and e["name"] == var.group(1)), None)
        field = (source or {}).get("valueFrom", {}).get("resourceFieldRef", {})
        if field.get("resource") != "limits.cpu" or field.get("containerName", container["name"]) != container["name"]:
            failures.add(at, f"--threads must come from the container's CPU limit (resourceFieldRef limits.cpu), got {threads!r}")
        notes = workload["metadata"].get("annotations", {})
        keys = ("tessera.dev/weights-bytes", "tessera.dev/kv-bytes-per-token", "tessera.dev/rank-overhead-bytes")
        if not all(k in notes for k in keys):
            failures.add(at, f"annotate {keys} so the memory limit can be derived")
            continue
        tp, _ = resolve(str(flags.get("--tp")), container, configmaps)
        kv, _ = resolve(str(worker_flags.get("--kv-capacity-tokens")), container, configmaps)
        if not tp.isdigit() or not kv.isdigit():
            failures.add(at, f"--tp ({tp}) and --kv-capacity-tokens ({kv}) must resolve to numbers")
            continue
        need = int(notes[keys[0]]) + int(kv) * int(notes[keys[1]]) + int(tp) * int(notes[keys[2]])
        if "memory" in limits and quantity(limits["memory"]) < need:
            failures.add(at, f"memory limit {limits['memory']} is below what the group holds: {need} bytes "
                             f"(weights + {kv} KV tokens * {notes[keys[1]]} B + {tp} ranks * overhead)")
    for workload, spec, container, flags, worker_flags in found["group"]:
        at = f"{where} {name_of(workload)}"
        if workload["spec"].get("minReadySeconds", 0) <= 0:
            failures.add(at, "minReadySeconds must be set: a group counts as available only after serving a while")
        ready = container.get("readinessProbe", {}).get("grpc", {})
        if ready.get("service") != "tessera.worker.v1.Worker" or ready.get("port") != int(flags.get("--port", 7000)):
            failures.add(at, "readiness must be rank 0's tessera.worker.v1.Worker health (serving in a group), "
                             f"got {ready}")


def check_settings(where, found, templates, configmaps, failures):
    """Drains outlast the longest request; the coordinator waits for its model as long as its
    probes allow; coordinator-only settings live in a ConfigMap only it reads."""
    readers = {}
    for w, t in templates:
        for c in t["spec"]["containers"]:
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    readers.setdefault(source["configMapRef"]["name"], set()).add(name_of(w))
    for workload, spec, container, flags in found["coordinator"]:
        at = f"{where} {name_of(workload)}"
        own = [n for n, r in readers.items() if r == {name_of(workload)}]
        if not own:
            failures.add(at, "coordinator-only settings need a ConfigMap only the coordinator reads (a change there rolls it alone)")
        for flag in ("--load-timeout-secs", "--max-new-tokens-limit"):
            if flag not in flags:
                failures.add(at, f"set {flag} (from its ConfigMap): the formation timeout and the longest request are deployment facts")
        wait, _ = resolve(str(flags.get("--model-wait-secs", "0")), container, configmaps)
        probe = container.get("startupProbe")
        window = (probe or {}).get("periodSeconds", 10) * (probe or {}).get("failureThreshold", 3)
        if not wait.isdigit() or int(wait) == 0:
            failures.add(at, "--model-wait-secs must be set: a coordinator started before the weights would crash-loop")
        elif probe is None or window < int(wait):
            failures.add(at, f"startupProbe allows {window} s, less than --model-wait-secs {wait}: the model wait would be killed")
        max_new, _ = resolve(str(flags.get("--max-new-tokens-limit", "")), container, configmaps)
        for group, gspec, gcontainer, gflags, wflags in found["group"]:
            gat = f"{where} {name_of(group)}"
            per_token = group["metadata"].get("annotations", {}).get("tessera.dev/worst-seconds-per-token")
            drain, _ = resolve(str(wflags.get("--drain-timeout-secs", "")), gcontainer, configmaps)
            if per_token is None or not max_new.isdigit() or not drain.isdigit():
                failures.add(gat, "the drain cannot be checked against the longest request: annotate "
                                  "tessera.dev/worst-seconds-per-token and set --max-new-tokens-limit and --drain-timeout-secs")
            elif int(drain) < int(max_new) * float(per_token):
                failures.add(gat, f"--drain-timeout-secs {drain} is shorter than the longest request allowed "
                                  f"({max_new} tokens * {per_token} s = {int(max_new) * float(per_token):.0f} s)")


def check_network(where, objects, templates, policies, found, configmaps, failures):
    """A default deny, and every declared port (and every rank's port) open to exactly who needs it."""
    if not any(p["spec"].get("podSelector") == {} and not p["spec"].get("ingress") for p in policies):
        failures.add(where, "no default-deny NetworkPolicy (podSelector {} without ingress rules)")
    namespace = next((o for o in objects if o["kind"] == "Namespace"), None)
    if namespace and namespace["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") != "restricted":
        failures.add(where, "the namespace must enforce the restricted Pod Security Standard")
    for workload, template in templates:
        labels = template["metadata"].get("labels", {})
        for container in template["spec"]["containers"]:
            for port in container.get("ports", []):
                if not any(policy_allows(p, labels, port["containerPort"]) for p in policies):
                    failures.add(f"{where} {name_of(workload)}",
                                 f"port {port['containerPort']} ({port.get('name')}) is covered by no NetworkPolicy")
    coordinator_labels = [w["spec"]["template"]["metadata"]["labels"] for w, *_ in found["coordinator"]]
    for workload, spec, container, flags, _ in found["group"]:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        first = int(flags.get("--port", 7000))
        for port in range(first, first + MAX_TP):
            for source in coordinator_labels:
                if not any(policy_allows(p, labels, port, source) for p in policies):
                    failures.add(f"{where} {name_of(workload)}", f"rank port {port} is not open to the coordinator")
                    break
            else:
                continue
            break
        if not any(policy_allows(p, labels, 40000, labels) for p in policies):
            failures.add(f"{where} {name_of(workload)}", "groups must reach each other on any port (collective and ring links)")
    for workload, template in templates:
        if workload["metadata"]["name"] != "etcd":
            continue
        labels = template["metadata"].get("labels", {})
        for p in policies:
            if not selects_all(p["spec"].get("podSelector", {}).get("matchLabels", {}), labels):
                continue
            for rule in p["spec"].get("ingress", []):
                if not rule.get("from") and any(x.get("port") in (2379, None) for x in rule.get("ports", [{}])):
                    failures.add(f"{where} {name_of(p)}", "etcd's client port is open to everyone: whoever writes there can register workers")


def check_monitors(where, objects, services, failures):
    """Where ServiceMonitors are deployed, every Service with a metrics port has one."""
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    if not monitors:
        return
    for service in services.values():
        ports = {p.get("name") for p in service["spec"].get("ports", [])}
        if "metrics" not in ports:
            continue
        labels = service["metadata"].get("labels", {})
        if not any(selects(m["spec"]["selector"].get("matchLabels", {}), labels)
                   and any(e.get("port") == "metrics" for e in m["spec"].get("endpoints", [])) for m in monitors):
            failures.add(f"{where} {name_of(service)}", "serves metrics but no ServiceMonitor scrapes it")


def check_worker(at, spec, container, flags, help_, configmaps, failures, unit=False):
    """Kubernetes must wait longer than the worker drains, or it kills running sequences."""
    drain = flags.get("--drain-timeout-secs", help_["defaults"].get("--drain-timeout-secs"))
    drain, _ = resolve(str(drain), container, configmaps)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not drain.isdigit():
        failures.add(at, f"--drain-timeout-secs does not resolve to a number: {drain!r}")
    elif grace <= int(drain):
        failures.add(at, f"terminationGracePeriodSeconds ({grace}) must exceed --drain-timeout-secs ({drain})")
    # In a group unit `tessera group` sets each rank's --id.
    for flag in ("--etcd", "--advertise-host") + (() if unit else ("--id",)):
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
        for base in re.findall(r"(?m)^FROM\s+(\S+)", text):
            if not re.search(r"@sha256:[0-9a-f]{64}$", base):
                failures.add(where, f"FROM {base} is not pinned by digest")
        if "--mount=type=cache" not in text:
            failures.add(where, "expected a BuildKit cache mount for cargo (RUN --mount=type=cache,...)")
        ignore = (DEPLOY / "docker" / f"{name}.dockerignore").read_text().split()
        for path in ("target", ".git", "deploy/models"):
            if path not in ignore:
                failures.add(f"{where}.dockerignore", f"{path} must stay out of the build context")
    if "nccl" not in (DEPLOY / "docker" / "Dockerfile.cuda").read_text():
        failures.add("deploy/docker/Dockerfile.cuda", "expected a build with the nccl feature")


def find(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name))


def container_of(objects, kind, name):
    return find(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]


def set_arg(container, flag, value):
    container["args"] = [f"{flag}={value}" if str(a).startswith(f"{flag}=") else a for a in container["args"]]


# Deliberately broken copies of the rendered manifests: (kustomization, what is broken, the
# breakage, a phrase the failure must contain). Each is one of the defects the checks exist for.
BREAKAGES = [
    ("k8s/overlays/autoscale", "ReadWriteOnce weights under an autoscaler",
     lambda o: find(o, "PersistentVolumeClaim", "tessera-weights")["spec"].update(accessModes=["ReadWriteOnce"]), "ReadWriteOnce under an autoscaler"),
    ("k8s/base", "ReadOnlyMany weights the Job writes",
     lambda o: find(o, "PersistentVolumeClaim", "tessera-weights")["spec"].update(accessModes=["ReadOnlyMany"]), "allow no writer"),
    ("k8s/overlays/autoscale", "replicas in the scaled target",
     lambda o: find(o, "StatefulSet", "tessera-group")["spec"].update(replicas=2), "would reset the scale"),
    ("k8s/overlays/autoscale", "an HPA on a refused-tokens rate",
     lambda o: find(o, "HorizontalPodAutoscaler", "tessera-group")["spec"]["metrics"][0]["external"]["metric"].update(
         name="tessera_capacity_refused_tokens"), "not a gauge of present demand"),
    ("k8s/overlays/autoscale-keda", "a ScaledObject on a refused-tokens rate",
     lambda o: find(o, "ScaledObject", "tessera-group")["spec"]["triggers"][0]["metadata"].update(
         query="sum(rate(tessera_capacity_refused_tokens_total[5m]))"), "not a gauge of present demand"),
    ("k8s/overlays/autoscale", "an HPA scaling something else than whole groups",
     lambda o: find(o, "HorizontalPodAutoscaler", "tessera-group")["spec"]["scaleTargetRef"].update(
         kind="Deployment", name="tessera-coordinator"), "not a group workload"),
    ("k8s/overlays/autoscale", "a scale-down without stabilisation",
     lambda o: find(o, "HorizontalPodAutoscaler", "tessera-group")["spec"]["behavior"]["scaleDown"].update(
         stabilizationWindowSeconds=0), "stabilizationWindowSeconds"),
    ("k8s/overlays/autoscale", "autoscaling on one etcd member",
     lambda o: find(o, "StatefulSet", "etcd")["spec"].update(replicas=1), "fewer than 3 etcd members"),
    ("k8s/overlays/cpu-dev", "single-rank worker pods with TP=2",
     lambda o: container_of(o, "StatefulSet", "tessera-group").update(
         args=["worker", "--insecure", "--id=$(POD_NAME)", "--advertise-host=$(POD_IP)", "--etcd=$(TESSERA_ETCD)",
               "--drain-timeout-secs=$(TESSERA_DRAIN_TIMEOUT_SECS)"]), "nothing keeps a group's ranks together"),
    ("k8s/base", "a drain shorter than the longest request",
     lambda o: find(o, "ConfigMap", "tessera-group-config")["data"].update(TESSERA_DRAIN_TIMEOUT_SECS="60"), "shorter than the longest request"),
    ("k8s/base", "a grace period shorter than the drain",
     lambda o: find(o, "StatefulSet", "tessera-group")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=600),
     "must exceed --drain-timeout-secs"),
    ("k8s/base", "a memory limit below weights + KV",
     lambda o: container_of(o, "StatefulSet", "tessera-group")["resources"].update(
         requests={"cpu": "4", "memory": "1Gi"}, limits={"cpu": "4", "memory": "1Gi"}), "below what the group holds"),
    ("k8s/base", "requests below limits",
     lambda o: container_of(o, "StatefulSet", "tessera-group")["resources"]["requests"].update(cpu="2"), "requests = limits"),
    ("k8s/base", "threads not from the CPU limit",
     lambda o: set_arg(container_of(o, "StatefulSet", "tessera-group"), "--threads", "16"), "CPU limit"),
    ("k8s/base", "readiness that is not serving-in-a-group",
     lambda o: container_of(o, "StatefulSet", "tessera-group")["readinessProbe"]["grpc"].update(service=""), "readiness must be rank 0"),
    ("k8s/base", "no minReadySeconds",
     lambda o: find(o, "StatefulSet", "tessera-group")["spec"].pop("minReadySeconds"), "minReadySeconds"),
    ("k8s/base", "no coordinator PDB",
     lambda o: o.remove(find(o, "PodDisruptionBudget", "tessera-coordinator")), "no PodDisruptionBudget covers it"),
    ("k8s/base", "a model wait the startup probe cuts short",
     lambda o: container_of(o, "Deployment", "tessera-coordinator")["startupProbe"].update(failureThreshold=10), "startupProbe allows"),
    ("k8s/base", "coordinator settings in the shared ConfigMap",
     lambda o: container_of(o, "Deployment", "tessera-coordinator")["envFrom"].pop(), "only the coordinator reads"),
    ("k8s/base", "no formation timeout flag",
     lambda o: container_of(o, "Deployment", "tessera-coordinator")["args"].remove("--load-timeout-secs=$(TESSERA_LOAD_TIMEOUT_SECS)"),
     "--load-timeout-secs"),
    ("k8s/base", "group ports without a NetworkPolicy",
     lambda o: o.remove(find(o, "NetworkPolicy", "tessera-group")), "covered by no NetworkPolicy"),
    ("k8s/base", "rank ports closed to the coordinator",
     lambda o: find(o, "NetworkPolicy", "tessera-group")["spec"]["ingress"][0]["ports"][0].pop("endPort"), "not open to the coordinator"),
    ("k8s/base", "etcd open to everyone",
     lambda o: find(o, "NetworkPolicy", "etcd")["spec"]["ingress"][0].pop("from"), "open to everyone"),
    ("k8s/base", "no default deny",
     lambda o: o.remove(find(o, "NetworkPolicy", "default-deny-ingress")), "no default-deny"),
    ("k8s/base", "a service account token in a pod",
     lambda o: find(o, "Deployment", "tessera-coordinator")["spec"]["template"]["spec"].update(automountServiceAccountToken=True),
     "automountServiceAccountToken"),
    ("k8s/base", "a namespace without Pod Security",
     lambda o: find(o, "Namespace", "tessera")["metadata"].pop("labels"), "restricted Pod Security"),
    ("k8s/base", "an image not pinned by digest",
     lambda o: container_of(o, "StatefulSet", "etcd").update(image="quay.io/coreos/etcd:v3.5.17"), "not pinned by digest"),
    ("k8s/overlays/gpu", "the coordinator on the CUDA image",
     lambda o: container_of(o, "Deployment", "tessera-coordinator").update(image="tessera:cuda"), "CPU image"),
    ("k8s/overlays/gpu", "GPU pods without a runtime class",
     lambda o: find(o, "StatefulSet", "tessera-group")["spec"]["template"]["spec"].pop("runtimeClassName"), "runtimeClassName"),
    ("k8s/overlays/monitoring", "a metrics Service nobody scrapes",
     lambda o: o.remove(find(o, "ServiceMonitor", "tessera-group")), "no ServiceMonitor scrapes it"),
]


def self_test(rendered, helps, kube_version):
    """Every breakage must be caught with its message; returns the ones that were not."""
    missed = []
    for kustomization, what, breakage, expected in BREAKAGES:
        objects = copy.deepcopy(rendered[kustomization])
        breakage(objects)
        failures = Failures()
        check_objects(f"deploy/{kustomization}", objects, helps, kube_version, failures, schemas=False)
        if not any(expected in m for m in failures.messages):
            missed.append(f"{kustomization}: {what}: expected a failure containing {expected!r}, got {failures.messages}")
    return missed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--tessera", required=True)
    parser.add_argument("--kube-version", default=kubernetes_validate.latest_version())
    args = parser.parse_args()

    helps = {role: tessera_help(args.tessera, role) for role in ROLES}
    failures = Failures()
    counts = []
    rendered = {}
    for kustomization in KUSTOMIZATIONS:
        objects = render(args.kubectl, kustomization)
        rendered[kustomization] = objects
        check_objects(f"deploy/{kustomization}", objects, helps, args.kube_version, failures)
        counts.append(f"{kustomization}: {len(objects)} objects")
    check_compose(helps, failures)
    check_dockerfiles(failures)

    if failures.messages:
        print(f"check_deploy: {len(failures.messages)} problem(s):", file=sys.stderr)
        for message in failures.messages:
            print(f"  - {message}", file=sys.stderr)
        return 1
    missed = self_test(rendered, helps, args.kube_version)
    if missed:
        print(f"check_deploy: {len(missed)} deliberately broken manifest(s) passed the checks:", file=sys.stderr)
        for message in missed:
            print(f"  - {message}", file=sys.stderr)
        return 1
    print(f"check_deploy: ok (Kubernetes {args.kube_version} schemas, strict): " + "; ".join(counts)
          + "; docker-compose.yml and Dockerfiles consistent with `tessera --help`"
          + f"; {len(BREAKAGES)} deliberately broken copies each caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
