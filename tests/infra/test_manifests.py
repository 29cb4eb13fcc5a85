"""Static checks of infra/: Dockerfiles, compose file, Kubernetes and Prefect configs.

Nothing here needs Docker or a cluster. The checks hold the files to each other and to the CLI:
the commands they run must parse with `vae-pipeline`'s own parser and their `--set` overrides
must validate against `pipelines.params`, so renaming a subcommand or a parameter breaks a test
here instead of a cluster job.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from pipelines.cli import build_parser
from pipelines.params_file import load_params

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "docker" / "mlflow.Dockerfile"
COMPOSE = INFRA / "docker" / "compose.yaml"
K8S = INFRA / "k8s"
NAMESPACE = "vae-pipeline"
IMAGE_REPO = "vae-pipeline"


# -- helpers --------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, doc) for p in sorted(K8S.glob("*.yaml")) for doc in load_docs(p)]


def k8s_kind(kind: str) -> dict:
    found = [doc for _, doc in k8s_docs() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {K8S}, found {len(found)}"
    return found[0]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines
    ]


def dockerignore_patterns() -> list[str]:
    text = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in text if ln.strip() and not ln.startswith("#")]


def is_dockerignored(rel: str, patterns: list[str]) -> bool:
    parts = PurePosixPath(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        pat = pat.removeprefix("/")
        if pat.startswith("**/"):
            if any(fnmatch.fnmatch(part, pat[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pat) for prefix in prefixes):
            return True
    return False


def copy_instructions(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY without --from (those come from the build context)."""
    out = []
    for instr, args in dockerfile_instructions(path):
        if instr != "COPY":
            continue
        tokens = shlex.split(args)
        if any(t.startswith("--from") for t in tokens):
            continue
        tokens = [t for t in tokens if not t.startswith("--")]
        out.append((tokens[:-1], tokens[-1]))
    return out


def parse_cli(argv: list[str]):
    """Parse a `vae-pipeline` command line with the real parser; fail the test on a bad one."""
    assert argv[0] == "vae-pipeline", f"command must start with the console script: {argv}"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits on unknown subcommands/options
        pytest.fail(f"vae-pipeline rejects {shlex.join(argv)} (exit {exc.code})")
    return args


def validated_params(args):
    """The overrides applied to built-in defaults, validated by pipelines.params."""
    return load_params(None, args.overrides)


def env_list_to_dict(env: list[dict]) -> dict[str, dict]:
    return {item["name"]: item for item in env}


def ray_pod_specs(cluster_spec: dict) -> list[dict]:
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    return [head] + [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


def without_interpolation(text: str) -> str:
    """Compose `${VAR:?message}` replaced by a placeholder, so URLs around it parse."""
    return re.sub(r"\$\{[^}]*\}", "VAR", text)


def image_repo(image: str) -> str:
    image = without_interpolation(image)
    return image.rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image


def dockerfile_image_destination() -> Path:
    """Where the Dockerfile puts params.yaml in the image."""
    workdir = PurePosixPath("/")
    for instr, args in dockerfile_instructions(DOCKERFILE):
        if instr == "WORKDIR":
            workdir = workdir / args.strip()
        if instr == "COPY" and "params.yaml" in shlex.split(args)[:-1]:
            return Path(workdir / shlex.split(args)[-1])
    pytest.fail("the Dockerfile does not COPY params.yaml")


# -- Dockerfiles ----------------------------------------------------------------------------


def test_dockerfile_selects_a_cpu_or_cuda_base_with_the_variant_build_arg():
    instrs = dockerfile_instructions(DOCKERFILE)
    first_from = next(i for i, (instr, _) in enumerate(instrs) if instr == "FROM")
    global_args = [args for instr, args in instrs[:first_from] if instr == "ARG"]
    assert "VARIANT=cpu" in global_args, "ARG VARIANT=cpu must come before the first FROM"
    stages = [args.split() for instr, args in instrs if instr == "FROM"]
    names = {s[-1] for s in stages if len(s) == 3 and s[1].upper() == "AS"}
    assert {"base-cpu", "base-cuda"} <= names
    # The Ray worker image builds on the chosen variant; the pipeline image (the last stage, what
    # a build without --target gives) adds orchestration and versioning on top of the worker's.
    assert ["base-${VARIANT}", "AS", "worker"] in stages
    assert stages[-1] == ["worker", "AS", "pipeline"], "the default image must be the pipeline's"


def test_dockerfile_installs_the_locked_torch_version_before_the_package():
    text = DOCKERFILE.read_text()
    locked = re.search(r"^torch==(\S+)$", (REPO / "requirements.lock").read_text(), re.M)
    assert locked, "requirements.lock pins torch"
    assert f"ARG TORCH_VERSION={locked.group(1)}" in text
    runs = [args for instr, args in dockerfile_instructions(DOCKERFILE) if instr == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    worker_step = next(i for i, r in enumerate(runs) if "-c requirements-worker.lock" in r)
    pipeline_step = next(i for i, r in enumerate(runs) if '-c requirements.lock ".[s3]"' in r)
    assert torch_step < worker_step < pipeline_step
    # The project's own dependencies name the whole stack: the worker takes it without them.
    assert "pip install --no-deps ." in runs[worker_step]


def test_dockerfile_entrypoint_is_the_pipeline_console_script():
    entry = [args for instr, args in dockerfile_instructions(DOCKERFILE) if instr == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["vae-pipeline"]]
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="vae-pipeline")
    assert script.value == "pipelines.entry:main"  # signal handlers before the heavy imports


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda p: p.name)
def test_every_file_a_dockerfile_copies_exists_and_is_in_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    copies = copy_instructions(dockerfile)
    assert copies, f"{dockerfile.name} copies nothing"
    for sources, _ in copies:
        for src in sources:
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}: not in the repo"
            assert not is_dockerignored(src, patterns), f"{src} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_data_and_secrets_out_of_images():
    patterns = dockerignore_patterns()
    for path in [".venv", ".git", ".stack/env.sh", "data/shards", "outputs/x", "mlflow.db"]:
        assert is_dockerignored(path, patterns), f"{path} would be sent to the Docker daemon"
    assert is_dockerignored("infra/docker/.env", patterns)
    assert not is_dockerignored("pipelines/cli.py", patterns)
    # .dockerignore drops the top-level data/ folder, never the package pipelines/data.
    assert not is_dockerignored("pipelines/data/shards/loader.py", patterns)


# -- compose --------------------------------------------------------------------------------


def test_compose_has_the_shared_services_and_every_dependency_exists():
    services = compose()["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "trainer"} <= set(
        services
    )
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_compose_publishes_unique_ports_on_loopback_only():
    seen: dict[int, str] = {}
    for name, svc in compose()["services"].items():
        for spec in svc.get("ports", []):
            host_ip, host_port, _ = str(spec).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {spec} beyond loopback"
            assert int(host_port) not in seen, f"{name} and {seen.get(int(host_port))} share a port"
            seen[int(host_port)] = name


def test_compose_mlflow_stores_runs_in_postgres_and_artifacts_in_minio():
    services = compose()["services"]
    mlflow = services["mlflow"]
    env, cmd = mlflow["environment"], [str(c) for c in mlflow["command"]]
    backend = urlsplit(without_interpolation(env["MLFLOW_BACKEND_STORE_URI"]))
    assert backend.scheme == "postgresql" and backend.hostname == "postgres"
    assert backend.path == "/" + services["postgres"]["environment"]["POSTGRES_DB"]
    artifacts = cmd[cmd.index("--artifacts-destination") + 1]
    assert artifacts.startswith("s3://")
    assert urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    bucket = urlsplit(artifacts).netloc
    assert f"local/{bucket}" in " ".join(services["minio-init"]["entrypoint"])
    # MLflow 3.5+ refuses Host headers it does not know; containers call it "mlflow".
    assert "mlflow:*" in cmd[cmd.index("--allowed-hosts") + 1].split(",")


def test_compose_trainer_reaches_mlflow_prefect_and_minio_by_service_name():
    services = compose()["services"]
    env = services["trainer"]["environment"]
    mlflow_cmd = [str(c) for c in services["mlflow"]["command"]]
    tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
    assert (tracking.hostname, str(tracking.port)) == (
        "mlflow",
        mlflow_cmd[mlflow_cmd.index("--port") + 1],
    )
    prefect_cmd = services["prefect-server"]["command"]
    prefect = urlsplit(env["PREFECT_API_URL"])
    assert prefect.hostname == "prefect-server"
    assert str(prefect.port) == prefect_cmd[prefect_cmd.index("--port") + 1]
    assert urlsplit(env["AWS_ENDPOINT_URL"]).hostname == "minio"


@pytest.mark.parametrize("service", ["stage", "trainer"])
def test_compose_pipeline_commands_parse_with_the_cli(service):
    svc = compose()["services"][service]
    assert image_repo(svc["image"]) == IMAGE_REPO
    assert svc["build"]["dockerfile"] == "infra/docker/Dockerfile"
    assert (COMPOSE.parent / svc["build"]["context"]).resolve() == REPO
    args = parse_cli(["vae-pipeline", *map(str, svc["command"])])
    assert args.command == service.replace("trainer", "train")
    assert Path(args.params) == dockerfile_image_destination()
    params = validated_params(args)
    assert params.data.shards_dir.startswith("/data/"), "shards must be on the shared volume"
    if service == "trainer":
        bucket = urlsplit(params.cluster.storage_path).netloc
        assert params.cluster.storage_path.startswith("s3://")
        assert f"local/{bucket}" in " ".join(compose()["services"]["minio-init"]["entrypoint"])


def test_compose_files_it_mounts_exist_and_its_variables_are_documented():
    text = COMPOSE.read_text()
    for name, svc in compose()["services"].items():
        for vol in svc.get("volumes", []):
            src = str(vol).split(":")[0]
            if src.startswith("."):
                assert (COMPOSE.parent / src).exists(), f"{name} mounts missing {src}"
    documented = {
        ln.split("=", 1)[0]
        for ln in (COMPOSE.parent / ".env.example").read_text().splitlines()
        if "=" in ln and not ln.startswith("#")
    }
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    assert used <= documented, f"undocumented in .env.example: {sorted(used - documented)}"


# -- Kubernetes -----------------------------------------------------------------------------


def test_every_k8s_manifest_has_api_version_kind_name_and_our_namespace():
    docs = k8s_docs()
    assert {doc["kind"] for _, doc in docs} >= {
        "Namespace",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "Job",
        "RayJob",
        "RayCluster",
    }
    for path, doc in docs:
        for field in ("apiVersion", "kind"):
            assert doc.get(field), f"{path.name}: a document lacks {field}"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} lacks a name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name}: {doc['kind']}"


def test_rayjob_and_raycluster_have_a_head_and_gpu_worker_groups():
    for kind in ("RayJob", "RayCluster"):
        doc = k8s_kind(kind)
        assert doc["apiVersion"] == "ray.io/v1"
        spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
        assert spec["headGroupSpec"]["template"]["spec"]["containers"], kind
        assert spec["workerGroupSpecs"], f"{kind} has no worker groups"
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"]
            for container in group["template"]["spec"]["containers"]:
                limits = container["resources"]["limits"]
                assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{kind} {group['groupName']}"


def test_rayjob_entrypoint_is_a_valid_train_command_that_fits_the_gpu_workers():
    job = k8s_kind("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    args = parse_cli(argv)
    assert args.command == "train"
    assert Path(args.params) == dockerfile_image_destination()
    params = validated_params(args)
    assert params.cluster.use_gpu is True
    assert params.cluster.num_workers == 4
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(
        g["replicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
        for g in workers
        for c in g["template"]["spec"]["containers"]
    )
    assert gpus >= params.cluster.num_workers, "fewer GPUs than training workers: the job hangs"
    # Checkpoints and shards must be on storage every node reaches: the object store.
    assert params.cluster.storage_path.startswith("s3://")
    assert params.data.shards_dir.startswith("s3://")


def test_stage_job_stages_for_the_same_worker_count_as_the_rayjob():
    job = k8s_kind("Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = parse_cli(["vae-pipeline", *container["args"]])
    assert args.command == "stage"
    staged = validated_params(args)
    trained = validated_params(parse_cli(shlex.split(k8s_kind("RayJob")["spec"]["entrypoint"])))
    assert staged.data.shards_dir == trained.data.shards_dir
    assert staged.cluster.num_workers == trained.cluster.num_workers


def test_ray_pods_share_one_pipeline_image_the_mlflow_service_and_secret_credentials():
    mlflow_svc = next(d for _, d in k8s_docs() if d["kind"] == "Service")
    port = mlflow_svc["spec"]["ports"][0]["port"]
    expected_uri = f"http://{mlflow_svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
    mlflow_args = k8s_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = mlflow_args[mlflow_args.index("--allowed-hosts") + 1].split(",")
    assert f"{urlsplit(expected_uri).hostname}:*" in allowed, "MLflow would reject the Ray pods"
    claims = {d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}

    heads, workers = set(), set()
    for kind in ("RayJob", "RayCluster"):
        doc = k8s_kind(kind)
        spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
        for i, pod in enumerate(ray_pod_specs(spec)):
            volumes = {v["name"]: v for v in pod["volumes"]}
            for container in pod["containers"]:
                (workers if i else heads).add(container["image"])
                env = env_list_to_dict(container["env"])
                assert env["MLFLOW_TRACKING_URI"]["value"] == expected_uri
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert "value" not in env[key], f"{kind}: {key} inline"
                    assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                claim = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
                assert claim in claims
    # The head runs the driver (the whole pipeline image); the workers the Dockerfile's `worker`
    # stage, built from the same commit: one tag, or Ray's versions could differ across pods.
    assert len(heads) == 1 and len(workers) == 1, f"one image per role: {heads}, {workers}"
    head, worker = heads.pop(), workers.pop()
    assert image_repo(head) == IMAGE_REPO and image_repo(worker) == f"{IMAGE_REPO}-worker"
    assert head.rsplit(":", 1)[1] == worker.rsplit(":", 1)[1], "head and workers: one tag"


# -- Prefect --------------------------------------------------------------------------------


def test_prefect_work_pool_template_runs_the_pipeline_image_with_the_shared_volume():
    template = json.loads((K8S / "prefect" / "base-job-template.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    props = template["variables"]["properties"]
    assert image_repo(props["image"]["default"]) == IMAGE_REPO
    assert props["namespace"]["default"] == NAMESPACE
    assert props["env"]["default"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # The image's ENTRYPOINT is vae-pipeline; the worker's `prefect flow-run execute` goes into
    # args, so the template must replace the entrypoint.
    assert container["command"] == ["/usr/bin/env"] and container["args"] == "{{ command }}"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "vae-data"
    assert container["envFrom"] == [{"secretRef": {"name": "vae-s3-credentials"}}]


def test_prefect_deployment_targets_the_kubernetes_work_pool_and_the_image_code():
    config = yaml.safe_load((K8S / "prefect" / "prefect.yaml").read_text())
    pull = config["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert Path(pull["directory"]) == dockerfile_image_destination().parent
    for dep in config["deployments"]:
        assert dep["work_pool"]["name"] == "vae-k8s"
        assert image_repo(dep["work_pool"]["job_variables"]["image"]) == IMAGE_REPO
        path, _, func = dep["entrypoint"].partition(":")
        assert path.startswith("pipelines/") and path.endswith(".py") and func.isidentifier()
        # The flow module is copied into the image with the package (COPY pipelines).
        assert ["pipelines"] in [src for src, _ in copy_instructions(DOCKERFILE)]
        module = REPO / path
        if module.exists():
            assert re.search(rf"^(async )?def {func}\(", module.read_text(), re.M), dep["name"]


# -- no secrets, no registry hosts ----------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"://[^/\s:@]+:(?!\$\{|<)[^@\s/]+@"),  # user:password@, not ${VAR} or <placeholder>
    re.compile(
        r"(?i)(password|secret|token)[\w-]*[ \t]*[:=][ \t]*['\"]?(?!\$\{)[A-Za-z0-9+/_.-]{8,}"
    ),
]


def infra_text_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.suffix not in {".py", ".pyc"}]
    return [*files, REPO / ".dockerignore"]


def test_no_credentials_are_written_into_infra_files():
    for path in infra_text_files():
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            hit = pattern.search(text)
            assert hit is None, f"{path.relative_to(REPO)} looks like it holds a secret: {hit[0]}"
    example = (INFRA / "docker" / ".env.example").read_text().splitlines()
    for line in example:
        key, _, value = line.partition("=")
        if re.search(r"PASSWORD|SECRET|USER", key):
            assert value == "", f".env.example must leave {key} empty"


def test_images_are_plain_names_without_a_registry_host():
    images = [svc["image"] for svc in compose()["services"].values() if "image" in svc]
    for _, doc in k8s_docs():
        text = json.dumps(doc)
        images += re.findall(r'"image": "([^"]+)"', text)
    assert images
    for image in images:
        first = image.split("/")[0]
        assert "/" not in image or ("." not in first and ":" not in first), image


# -- environment variables: what the manifests set is what the code reads ---------------------

# Read by libraries the pipeline uses, not by our code: (name, who reads it).
LIBRARY_ENV = {
    "AWS_REGION": "botocore, pyarrow",
    "PREFECT_API_URL": "prefect",
}
# What a pod that runs pipeline code must be given; the flow pod also needs the Ray cluster.
NEEDED = {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # vae-s3-credentials (namespace.yaml)


def env_read_by_the_code() -> set[str]:
    """Every variable pipelines/ reads by name (os.environ.get / [...] / in, and the object
    store's list in pipelines/storage.py)."""
    names: set[str] = set()
    for path in (REPO / "pipelines").rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"os\.environ(?:\.get)?[\[(]\s*\"([A-Z0-9_]+)\"", text))
        names |= set(re.findall(r"os\.getenv\(\s*\"([A-Z0-9_]+)\"", text))
    from pipelines.storage import _STORE_ENV

    return names | set(_STORE_ENV)


def _container_env(container: dict) -> set[str]:
    env = container.get("env", [])
    names = {e["name"] for e in env} if isinstance(env, list) else set()  # "{{ env }}": below
    for source in container.get("envFrom", []):
        if source.get("secretRef", {}).get("name") == "vae-s3-credentials":
            names |= SECRET_KEYS
    return names


def pipeline_containers() -> dict[str, set[str]]:
    """Each container that runs pipeline code -> the variables it is given."""
    found: dict[str, set[str]] = {}
    for path, doc in k8s_docs():
        if doc.get("kind") == "RayJob":
            spec = doc["spec"]["rayClusterSpec"]
        elif doc.get("kind") == "RayCluster":
            spec = doc["spec"]
        elif doc.get("kind") == "Job":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                found[f"{path.name}:{c['name']}"] = _container_env(c)
            continue
        else:
            continue
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            for c in group["template"]["spec"]["containers"]:
                found[f"{path.name}:{c['name']}"] = _container_env(c)
    template = json.loads((K8S / "prefect" / "base-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    flow = _container_env(pod["containers"][0])
    flow |= set(template["variables"]["properties"]["env"]["default"])
    found["prefect flow pod"] = flow
    return found


def test_every_variable_the_manifests_set_is_read_and_every_needed_one_is_set():
    read = env_read_by_the_code() | set(LIBRARY_ENV)
    containers = pipeline_containers()
    assert len(containers) >= 5, containers  # RayJob and RayCluster head+workers, jobs, flow
    for name, given in containers.items():
        assert given <= read, f"{name} sets {sorted(given - read)}, which nothing reads"
        needed = NEEDED - {"MLFLOW_TRACKING_URI"} if name.startswith("stage-job") else NEEDED
        assert needed <= given, f"{name} lacks {sorted(needed - given)}"
    assert "RAY_ADDRESS" in containers["prefect flow pod"], "the flow pod trains on the cluster"
    assert "RAY_ADDRESS" in env_read_by_the_code()


def test_shards_and_checkpoints_live_in_the_object_store():
    rayjob = yaml.safe_load((K8S / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    stage = " ".join(
        yaml.safe_load((K8S / "stage-job.yaml").read_text())["spec"]["template"]["spec"][
            "containers"
        ][0]["args"]
    )
    flow = yaml.safe_load((K8S / "prefect" / "prefect.yaml").read_text())["deployments"][0]
    overrides = " ".join(flow["parameters"]["overrides"])
    for text in (rayjob, stage, overrides):
        assert "data.shards_dir=s3://vae-data/shards" in text, text
    for text in (rayjob, overrides):
        assert "cluster.storage_path=s3://" in text, text
