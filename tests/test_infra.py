"""The deployment files in infra/ agree with the package: the RayJob entrypoints are real `adpipe run`
commands on specs that exist and validate, every container runs this version's image, the image
is built on the Ray release pyproject pins, and no manifest carries a credential. No Ray, no network."""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import pipelines
from pipelines.cli import build_parser, cmd_nightly, cmd_run
from pipelines.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "infra" / "kuberay"
DOCKERFILE = REPO / "infra" / "Dockerfile"
IMAGE = f"adpipe:{pipelines.__version__}"
S3_SECRET = "adpipe-s3"
STORAGE_CONFIGMAP = "adpipe-storage"
# Names that hold a secret wherever they appear; such values may only come from a Secret.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Reading the files


def manifest_paths() -> list[Path]:
    return sorted(KUBERAY.glob("*.yaml")) + sorted(KUBERAY.glob("*.yml"))


def load_manifests() -> list[tuple[Path, dict[str, Any]]]:
    documents = []
    for path in manifest_paths():
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path, document))
    return documents


def of_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in load_manifests() if doc.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every Ray cluster the manifests describe: RayCluster specs and RayJob rayClusterSpecs."""
    specs = [(f"{p.name}:RayCluster/{d['metadata']['name']}", d["spec"]) for p, d in of_kind("RayCluster")]
    specs += [(f"{p.name}:RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"])
              for p, d in of_kind("RayJob") if "rayClusterSpec" in d["spec"]]
    return specs


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def containers(document: Any) -> list[dict[str, Any]]:
    """All containers (and init containers) anywhere in a manifest, whatever the nesting."""
    found = []
    for node in walk(document):
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                if isinstance(node.get(key), list):
                    found.extend(node[key])
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued instruction"
    return instructions


def dockerfile_workdir() -> str:
    workdirs = [args for keyword, args in dockerfile_instructions() if keyword == "WORKDIR"]
    assert workdirs, "the Dockerfile sets no WORKDIR"
    return workdirs[-1].rstrip("/")


def dockerfile_copies() -> dict[str, str]:
    """Repository path -> where COPY puts it in the image (build context = the repository root)."""
    copied = {}
    for keyword, args in dockerfile_instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        *sources, destination = words
        for source in sources:
            source = source.rstrip("/")
            if (REPO / source).is_dir():  # a directory's contents land in the destination
                target = destination.rstrip("/")
            elif destination.endswith("/") or len(sources) > 1:
                target = destination.rstrip("/") + "/" + Path(source).name
            else:
                target = destination
            copied[source] = target
    return copied


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_ray() -> Requirement:
    requirements = [Requirement(d) for d in pyproject()["project"]["dependencies"]]
    ray = [r for r in requirements if r.name == "ray"]
    assert len(ray) == 1, "pyproject.toml should pin ray exactly once"
    return ray[0]


def base_image() -> tuple[Version, str, str]:
    """(Ray version, Python tag, variant) of the Dockerfile's rayproject/ray base."""
    froms = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) == 1, f"expected one FROM, got {froms}"
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|gpu)(?:\s+AS\s+\S+)?", froms[0],
                         re.IGNORECASE)
    assert match, f"FROM {froms[0]!r} is not an official rayproject/ray:<version>-py<XY>-cpu|gpu image"
    return Version(match[1]), f"{match[2]}.{match[3]}", match[4]


# ---------------------------------------------------------------------------------------------
# Manifests


def test_manifests_are_kuberay_v1_clusters_and_jobs():
    documents = load_manifests()
    assert documents, f"no manifests under {KUBERAY}"
    for path, document in documents:
        assert document.get("apiVersion") == "ray.io/v1", f"{path.name}: apiVersion {document.get('apiVersion')!r}"
        assert document.get("kind") in ("RayCluster", "RayJob", "RayCronJob", "RayService"), \
            f"{path.name}: unexpected kind {document.get('kind')!r} (Secrets do not belong in infra/)"
        assert document.get("metadata", {}).get("name"), f"{path.name}: {document['kind']} without a name"
    kinds = {document["kind"] for _, document in documents}
    assert {"RayCluster", "RayJob"} <= kinds


def test_rayjob_entrypoints_run_specs_that_exist_validate_and_are_in_the_image():
    jobs = of_kind("RayJob")
    assert jobs, "no RayJob manifest"
    copied = dockerfile_copies()
    workdir = dockerfile_workdir()
    for path, job in jobs:
        where = f"{path.name}:RayJob/{job['metadata']['name']}"
        entrypoint = job["spec"]["entrypoint"]
        assert entrypoint.startswith("adpipe run "), f"{where}: entrypoint {entrypoint!r} is not `adpipe run ...`"
        argv = shlex.split(entrypoint)
        # The real CLI parser accepts it (argparse exits on an unknown option or a missing spec).
        args = build_parser().parse_args(argv[1:])
        assert args.func is cmd_run
        assert args.ray_address == "auto", f"{where}: must join the cluster it runs on (--ray-address auto)"
        spec_path = Path(args.spec)
        assert not spec_path.is_absolute() and ".." not in spec_path.parts, \
            f"{where}: spec path {args.spec!r} should be relative to the image's WORKDIR"
        assert (REPO / spec_path).is_file(), f"{where}: {args.spec} does not exist in the repository"
        load_spec(REPO / spec_path)  # raises SpecError if the spec is invalid
        # The image carries the spec at WORKDIR/<path>, where the entrypoint looks for it.
        top = spec_path.parts[0]
        assert copied.get(top) == f"{workdir}/{top}", \
            f"{where}: the Dockerfile does not copy {top}/ to {workdir}/{top} (copies: {copied})"
        # Lifecycle: the cluster goes away after the job, and not instantly (logs stay readable).
        assert job["spec"].get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes"
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        assert isinstance(ttl, int) and ttl > 0, f"{where}: ttlSecondsAfterFinished {ttl!r}"
        # Self-contained, and nothing installed when the job starts: everything is in the image.
        assert "rayClusterSpec" in job["spec"], f"{where}: no rayClusterSpec"
        runtime_env = str(job["spec"].get("runtimeEnvYAML", ""))
        assert not re.search(r"\b(pip|uv|conda|py_modules|working_dir)\b", runtime_env), \
            f"{where}: runtimeEnvYAML installs or ships code at run time: {runtime_env!r}"


def test_ray_containers_run_in_the_image_workdir():
    workdir = dockerfile_workdir()
    for where, spec in cluster_specs():
        for container in containers(spec):
            assert container.get("workingDir", workdir).rstrip("/") == workdir, \
                f"{where}: container {container.get('name')} works in {container['workingDir']}, not {workdir}"


def test_every_container_runs_this_versions_image():
    for path, document in load_manifests():
        found = containers(document)
        assert found, f"{path.name}: no containers"
        images = {container.get("image") for container in found}
        assert images == {IMAGE}, f"{path.name}: images {images}, expected only {IMAGE}"


def test_clusters_have_a_head_cpu_and_gpu_workers_and_keep_token_auth():
    ray_version, _, _ = base_image()
    specs = cluster_specs()
    assert len(specs) >= 2, "expected the RayCluster and the RayJob's rayClusterSpec"
    for where, spec in specs:
        assert containers(spec["headGroupSpec"]), f"{where}: head without containers"
        gpu_counts = []
        for group in spec.get("workerGroupSpecs", []):
            limits = [c.get("resources", {}).get("limits", {}) for c in containers(group)]
            gpu_counts.append(sum(int(limit.get("nvidia.com/gpu", 0)) for limit in limits))
        assert 0 in gpu_counts, f"{where}: no CPU-only worker group"
        assert 1 in gpu_counts, f"{where}: no worker group with nvidia.com/gpu: 1"
        assert spec.get("rayVersion") == str(ray_version), \
            f"{where}: rayVersion {spec.get('rayVersion')!r} differs from the image's Ray {ray_version}"
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token auth is not on"
        for container in containers(spec):
            for env in container.get("env", []):
                if env["name"] == "RAY_AUTH_MODE":
                    assert str(env.get("value", "")).lower() != "disabled", f"{where}: RAY_AUTH_MODE=disabled"


def test_containers_get_s3_credentials_from_the_secret_and_the_endpoint_from_the_configmap():
    for path, document in load_manifests():
        for container in containers(document):
            where = f"{path.name}: container {container.get('name')}"
            secrets = [source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source]
            assert S3_SECRET in secrets, f"{where}: no envFrom secretRef {S3_SECRET}"
            env = {entry["name"]: entry for entry in container.get("env", [])}
            endpoint = env.get("AWS_ENDPOINT_URL_S3")
            assert endpoint is not None, f"{where}: no AWS_ENDPOINT_URL_S3"
            assert "value" not in endpoint, f"{where}: AWS_ENDPOINT_URL_S3 inlined instead of from the ConfigMap"
            reference = endpoint.get("valueFrom", {}).get("configMapKeyRef", {})
            assert reference.get("name") == STORAGE_CONFIGMAP, \
                f"{where}: AWS_ENDPOINT_URL_S3 not from the ConfigMap {STORAGE_CONFIGMAP}"
            assert reference.get("optional") is not True, f"{where}: the endpoint must not be optional"


def credential_problems(document: Any) -> list[str]:
    """Secret values written into a manifest instead of referenced from a Secret."""
    problems = []
    for node in walk(document):
        if not isinstance(node, dict):
            continue
        # An env entry with a secret-like name: only valueFrom.secretKeyRef is allowed.
        name = node.get("name")
        if isinstance(name, str) and SECRET_NAME.search(name):
            if "value" in node:
                problems.append(f"literal value for {name}")
            elif "valueFrom" in node and set(node["valueFrom"]) != {"secretKeyRef"}:
                problems.append(f"{name} from {sorted(node['valueFrom'])}, not a Secret (secretKeyRef)")
        # A mapping key like AWS_SECRET_ACCESS_KEY: <value> (stringData, runtimeEnv env_vars, ...).
        for key, value in node.items():
            if isinstance(key, str) and SECRET_NAME.search(key) and isinstance(value, (str, int, float)):
                problems.append(f"literal value for {key}")
    text = yaml.safe_dump(document)
    if re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text):
        problems.append("an AWS access key id")
    return problems


def test_no_manifest_contains_a_credential_value():
    for path, document in load_manifests():
        assert credential_problems(document) == [], path.name
        assert not re.search(r"(?i)aws_secret_access_key\s*[=:]\s*\S", path.read_text()), path.name


def test_the_credential_check_rejects_an_inlined_secret():
    _, job = of_kind("RayJob")[0]
    head = containers(job["spec"]["rayClusterSpec"]["headGroupSpec"])[0]
    # A new list: YAML aliases (env: *storage-env) make containers share one.
    head["env"] = [*head.get("env", []), {"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-secret"}]
    assert credential_problems(job) == ["literal value for AWS_SECRET_ACCESS_KEY"]
    head["env"][-1] = {"name": "AWS_SECRET_ACCESS_KEY",
                       "valueFrom": {"configMapKeyRef": {"name": STORAGE_CONFIGMAP, "key": "secret"}}}
    assert len(credential_problems(job)) == 1
    head["env"][-1] = {"name": "AWS_SECRET_ACCESS_KEY",
                       "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": "AWS_SECRET_ACCESS_KEY"}}}
    assert credential_problems(job) == []


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_base_image_is_the_ray_release_pyproject_pins():
    ray_version, python, _ = base_image()
    ray = pinned_ray()
    assert ray.specifier.contains(ray_version), f"base image Ray {ray_version} is outside pyproject's {ray}"
    lower = [Version(s.version) for s in ray.specifier if s.operator in (">=", "==", "~=")]
    assert lower, f"pyproject's {ray} has no lower bound"
    assert (ray_version.major, ray_version.minor) == (lower[0].major, lower[0].minor), \
        f"base image Ray {ray_version} is not the pinned {lower[0].major}.{lower[0].minor} series"
    requires_python = SpecifierSet(pyproject()["project"]["requires-python"])
    assert requires_python.contains(f"{python}.0"), f"base image Python {python} outside {requires_python}"


def test_dockerfile_installs_the_package_at_build_time_and_runs_offline():
    instructions = dockerfile_instructions()
    workdir = dockerfile_workdir()
    assert workdir == "/app"
    copied = dockerfile_copies()
    readme = pyproject()["project"].get("readme")
    for needed in ("pyproject.toml", "pipelines", "jobs", *([readme] if isinstance(readme, str) else [])):
        assert copied.get(needed) == f"{workdir}/{needed}", f"{needed} is not copied to {workdir}/{needed}: {copied}"
    install = [i for i, (keyword, args) in enumerate(instructions)
               if keyword == "RUN" and re.search(rf"\bpip install\b[^&;|]*\s{re.escape(workdir)}/?(\s|$)", args)]
    assert install, f"no `RUN pip install ... {workdir}` in the Dockerfile"
    last_copy = max(i for i, (keyword, _) in enumerate(instructions) if keyword in ("COPY", "ADD"))
    assert install[-1] > last_copy, "the package is installed before all its files are copied"
    for keyword, args in instructions:
        if keyword in ("CMD", "ENTRYPOINT"):
            assert "pip" not in args and "uv " not in args, f"{keyword} installs at run time: {args}"
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            words = shlex.split(args)
            if len(words) >= 2 and "=" not in words[0]:  # legacy `ENV KEY value`
                env[words[0]] = " ".join(words[1:])
            else:
                env.update(word.split("=", 1) for word in words)
    assert env.get("HF_HUB_OFFLINE") == "1", f"HF_HUB_OFFLINE not 1: {env}"
    assert env.get("RAY_USAGE_STATS_ENABLED") == "0", f"RAY_USAGE_STATS_ENABLED not 0: {env}"


# ---------------------------------------------------------------------------------------------
# The nightly schedule: infra/kuberay/nightly/ (CronJob -> RayJob from a template)

NIGHTLY = KUBERAY / "nightly"


def nightly_documents() -> dict[str, dict[str, Any]]:
    documents = {}
    for path in sorted(NIGHTLY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents[f"{path.name}:{document['kind']}"] = document
    return documents


def test_nightly_kustomization_lists_files_that_exist_and_generates_the_template_the_cronjob_mounts():
    docs = nightly_documents()
    kustomization = docs["kustomization.yaml:Kustomization"]
    for resource in kustomization["resources"]:
        assert (NIGHTLY / resource).is_file(), resource
    [generator] = kustomization["configMapGenerator"]
    assert generator["files"] == ["rayjob-nightly.yaml"] and (NIGHTLY / "rayjob-nightly.yaml").is_file()
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True  # the CronJob names it as is
    cron = docs["cronjob.yaml:CronJob"]["spec"]
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    [volume] = pod["volumes"]
    assert volume["configMap"]["name"] == generator["name"]
    [creator] = pod["containers"]
    [mount] = creator["volumeMounts"]
    assert mount["name"] == volume["name"]
    # The pod creates a RayJob from the mounted template (kubectl create: generateName works).
    assert creator["args"] == ["create", "-f", f"{mount['mountPath']}/rayjob-nightly.yaml"]
    assert creator["image"].startswith("registry.k8s.io/kubectl:")


def test_nightly_cronjob_schedule_is_the_specs_and_runs_one_night_at_a_time():
    docs = nightly_documents()
    cron = docs["cronjob.yaml:CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    job = docs["rayjob-nightly.yaml:RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_nightly and args.ray_address == "auto" and args.date is None
    spec = load_spec(REPO / args.spec)  # exists and validates
    assert spec.kind == "nightly"
    assert cron["spec"]["schedule"] == spec.steps[0].params.schedule
    assert cron["spec"]["timeZone"] == "Etc/UTC"  # adpipe reads schedules in UTC
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert job["metadata"]["generateName"].endswith("-") and "name" not in job["metadata"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    # The pod's service account may create RayJobs, and nothing more.
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    role, binding = docs["cronjob.yaml:Role"], docs["cronjob.yaml:RoleBinding"]
    assert docs["cronjob.yaml:ServiceAccount"]["metadata"]["name"] == pod["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]


def test_nightly_rayjob_runs_this_image_with_secrets_from_secrets_only():
    docs = nightly_documents()
    job = docs["rayjob-nightly.yaml:RayJob"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    found = containers(cluster)
    assert found and {c["image"] for c in found} == {IMAGE}
    for container in found:
        assert S3_SECRET in [s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s]
        env = {entry["name"]: entry for entry in container.get("env", [])}
        # The catalog's URI (no password) from a ConfigMap, the password from a Secret.
        assert env["PYICEBERG_CATALOG__ADPIPE__URI"]["valueFrom"] == {
            "configMapKeyRef": {"name": "adpipe-catalog", "key": "uri"}}
        assert env["PGPASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "adpipe-catalog", "key": "password"}}
    for name, document in docs.items():
        assert credential_problems(document) == [], name
    # A GPU worker group sized for the spec's scorers.
    spec = load_spec(REPO / "jobs" / "nightly.yaml").steps[0].params
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in containers(g))]
    assert gpu_groups and gpu_groups[0]["replicas"] * 1 >= spec.resources.workers * spec.resources.gpus_per_worker
