"""infra/ray-cluster.yaml against Ray's own cluster-config validation, infra/kuberay.yaml against
a schema per kind plus the cross-references between its manifests, infra/Dockerfile's pins and
tag against the rest, and the guarded docker step of CI. No network, no cluster."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess

import jsonschema
import pytest
import yaml

from tests.infra_checks import INFRA, check_manifests, dockerfile_tag, manifests, pod_specs
from tests.servers import REPO


def _ray_config() -> dict:
    return yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())


def _ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before it launches anything: defaults, then validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# -- ray up ------------------------------------------------------------------------------------

def test_ray_cluster_yaml_passes_rays_validation_and_launches_gpu_workers():
    cfg = _ray_validate(_ray_config())
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    gpu_types = {n: t for n, t in types.items() if n != head and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type with a GPU"
    # A GPU worker exists when the search starts (a search that asks for GPUs sees them) and the
    # autoscaler may add more, up to the global cap.
    assert sum(t.get("min_workers", 0) for t in gpu_types.values()) >= 1
    assert all(t["max_workers"] >= max(1, t.get("min_workers", 0)) for t in gpu_types.values())
    assert cfg["max_workers"] >= sum(t["max_workers"] for t in gpu_types.values())
    assert cfg["idle_timeout_minutes"] > 0
    # The head runs the autoscaler only when started with the bootstrap config `ray up` writes.
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start
    # Every node installs ovss-tune and mounts the shared cache storage before Ray starts.
    setup = " ".join(cfg["setup_commands"])
    assert "bash infra/setup.sh" in setup and "mount -t nfs4" in setup
    assert "|| true" not in setup  # a failed mount must stop the node, not leave a local cache
    assert cfg["file_mounts"]["/home/ubuntu/ovss-tune"] == "."
    assert ".venv" in cfg["rsync_exclude"]
    assert "boto3" in " ".join(cfg["head_setup_commands"])


def _del(key):
    def f(c):
        del c[key]
    return f


def _set(path, value):
    def f(c):
        *parents, last = path
        for p in parents:
            c = c[p]
        c[last] = value
    return f


@pytest.mark.parametrize("breakage, error", [
    (_del("head_node_type"), "head_node_type"),
    (_set(["head_node_type"], "gpu"), "head_node_type"),
    (_set(["available_node_types", "gpu_worker", "resources", "GPU"], 0.5), "0.5"),
    (_set(["max_workers"], "four"), "four"),
    (_set(["idle_timeout_minutes"], "10m"), "10m"),
    (_set(["workers"], 3), "workers"),
    (_set(["available_node_types", "gpu_worker", "min_workers"], 9), "max_workers"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), "node_config"),
])
def test_ray_validation_rejects_broken_cluster_config(breakage, error):
    cfg = _ray_config()
    breakage(cfg)
    with pytest.raises((ValueError, jsonschema.ValidationError)) as e:
        _ray_validate(cfg)
    assert error in str(e.value)


# -- KubeRay manifests (schemas and cross-checks: tests/infra_checks.py) -----------------------

def test_kuberay_manifests_pass_schema_and_cross_checks():
    docs = manifests()
    assert check_manifests(docs, dockerfile_tag()) == []
    kinds = [d["kind"] for d in docs]
    assert {"RayCluster", "RayJob", "StorageClass", "Deployment", "Service"} <= set(kinds)
    pvcs = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert {"ovss-cache", "ovss-data"} <= pvcs


def test_kuberay_rayjob_entrypoint_parses_with_search_cli_and_targets_the_services():
    from search.run import build_parser

    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    job = next(d for (k, _), d in docs.items() if k == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "search.run"]
    args = build_parser().parse_args(argv[3:])  # an unknown flag exits here
    assert args.address == "auto"
    mounts = {m["mountPath"] for pod in pod_specs(docs[("RayCluster", "ovss-tune")])
              for c in pod["containers"] for m in c.get("volumeMounts", [])}
    assert args.cache_dir.startswith("/cache") and args.data_root.startswith("/data")
    assert {"/cache", "/data"} <= mounts
    # --tracking-uri is the MLflow Service, on its port, and the server allows that Host header.
    svc = docs[("Service", "mlflow")]
    assert args.tracking_uri == f"http://mlflow:{svc['spec']['ports'][0]['port']}"
    mlflow_pod = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    mlflow_args = mlflow_pod["containers"][0]["args"]
    allowed = next(a for a in mlflow_args if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    assert "mlflow:5000" in allowed.split(",")
    assert any(a.startswith("--backend-store-uri=") for a in mlflow_args)
    # The backend is the PostgreSQL Service of this file.
    secret = docs[("Secret", "ovss-postgres")]["stringData"]
    assert secret["dsn"].startswith("postgresql://") and "@postgres:5432/" in secret["dsn"]
    assert ("Service", "postgres") in docs


def _remove(kind, path):
    def f(docs):
        d = next(x for x in docs if x["kind"] == kind)
        *parents, last = path
        for p in parents:
            d = d[p]
        del d[last]
    return f


def _put(kind, path, value, name=None):
    def f(docs):
        d = next(x for x in docs if x["kind"] == kind
                 and (name is None or x["metadata"]["name"] == name))
        *parents, last = path
        for p in parents:
            d = d[p]
        d[last] = value
    return f


@pytest.mark.parametrize("breakage, error", [
    (_remove("RayCluster", ["spec", "headGroupSpec"]), "headGroupSpec"),
    (_put("RayCluster", ["spec", "workerGroupSpecs"], []), "workerGroupSpecs"),
    (_remove("RayJob", ["spec", "entrypoint"]), "entrypoint"),
    (_remove("RayJob", ["spec", "clusterSelector"]), "RayJob"),
    (_put("PersistentVolumeClaim", ["spec", "accessModes"], ["ReadWriteOnce"]), "ReadWriteMany"),
    (_remove("PersistentVolumeClaim", ["spec", "storageClassName"]), "storageClassName"),
    (_put("PersistentVolumeClaim", ["spec", "storageClassName"], "gp3"), "gp3"),
    (_put("Deployment", ["spec", "selector", "matchLabels"], {"app": "mlfow"}), "selector"),
    (_put("Service", ["spec", "selector"], {"app": "nothing"}, name="mlflow"), "matches no"),
    (_put("RayJob", ["spec", "clusterSelector"], {"ray.io/cluster": "other"}), "other"),
    (lambda docs: docs.__setitem__(0, {"kind": "StorageClass", "apiVersion": "v1",
                                       "metadata": {"name": "x"}}), "provisioner"),
    (lambda docs: docs.remove(next(d for d in docs if d["kind"] == "StorageClass")),
     "not defined"),
])
def test_kuberay_check_rejects_broken_manifests(breakage, error):
    docs = manifests()
    breakage(docs)
    errors = check_manifests(docs, dockerfile_tag())
    assert errors and any(error in e for e in errors), errors


def test_kuberay_check_rejects_an_image_the_dockerfile_does_not_build():
    docs = manifests()
    head = next(d for d in docs if d["kind"] == "RayCluster")["spec"]["headGroupSpec"]
    head["template"]["spec"]["containers"][0]["image"] = "ovss-tune:latest"
    assert any("ovss-tune:latest" in e for e in check_manifests(docs, dockerfile_tag()))
    assert check_manifests(manifests(), "ovss-tune:9.9") != []


# -- Dockerfile and CI's docker step -----------------------------------------------------------

def test_dockerfile_pins_match_setup_sh_and_the_installed_ray():
    import ray

    text = (INFRA / "Dockerfile").read_text()
    setup = (INFRA / "setup.sh").read_text()
    torch_pin = re.search(r'OVSS_TORCH:-([^}]+)}', setup).group(1)
    assert f'ARG OVSS_TORCH="{torch_pin}"' in text
    assert f"ARG RAY_VERSION={ray.__version__}" in text
    rc = next(d for d in manifests() if d["kind"] == "RayCluster")
    assert rc["spec"]["rayVersion"] == ray.__version__
    # Editable install of the copied repo: conf/ must sit beside the code (methods.base.CONF_DIR).
    assert "COPY --chown=ray conf conf" in text and "pip install" in text and "-e ." in text
    assert dockerfile_tag() == "ovss-tune:0.1.0"


def test_dockerfile_copies_what_the_package_needs(tmp_path):
    """The image's final check (`import search.run` from the copied tree) passes on exactly the
    files the Dockerfile copies: nothing imports bench/, tests/ or docs/."""
    import shutil
    import sys

    text = (INFRA / "Dockerfile").read_text()
    copied = [src for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M)
              for src in line.split()[:-1]]
    assert {"pyproject.toml", "conf", "search", "methods", "rewards"} <= set(copied)
    for src in copied:
        dst = tmp_path / "img" / src
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / src, dst)
    env = {k: v for k, v in os.environ.items() if k not in ("OVSS_CONF_PATH",)}
    env["PYTHONPATH"] = str(tmp_path / "img")
    img = str(tmp_path / "img")
    code = ("import search.run, methods.base as b; "
            f"assert str(b.CONF_DIR).startswith({img!r}), b.CONF_DIR; "
            "print(sorted(p.stem for p in (b.CONF_DIR / 'methods').glob('*.yaml')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "clipseg" in out.stdout


def _fake_docker(tmp_path, info_rc: int):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "docker.log"
    (bindir / "docker").write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {log}\n'
        f'[ "$1" = info ] && exit {info_rc}\nexit 0\n')
    (bindir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(INFRA / "docker-build.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    return out, (log.read_text().splitlines() if log.exists() else [])


def test_docker_build_step_skips_without_an_engine(tmp_path):
    out, calls = _fake_docker(tmp_path, info_rc=1)
    assert out.returncode == 0, out.stderr
    assert "skip" in out.stdout.lower() and "docker" in out.stdout.lower()
    assert calls == ["info"]  # nothing built


def test_docker_build_step_builds_and_smoke_tests_the_tag_with_an_engine(tmp_path):
    out, calls = _fake_docker(tmp_path, info_rc=0)
    assert out.returncode == 0, out.stderr
    tag = dockerfile_tag()
    assert calls[0] == "info"
    assert calls[1] == f"build -f infra/Dockerfile -t {tag} ."
    assert calls[2].startswith(f"run --rm {tag} python -c")


def test_readme_cluster_section_commands_parse_and_name_the_infra_files():
    from search.run import build_parser

    text = (REPO / "README.md").read_text()
    section = text.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    # ray:// needs ray[client] (grpcio), not installed: nothing may advertise it as an address.
    for f in (REPO / "README.md", *INFRA.iterdir()):
        assert not re.search(r"address[ =]+`?ray://", f.read_text()), f
    blocks = re.findall(r"```\n(.+?)\n```", section, re.S)
    search_cmd = next(b for b in blocks if "-m search.run" in b).replace("\\\n", " ")
    argv = shlex.split(search_cmd.split("-m search.run", 1)[1])
    args = build_parser().parse_args(argv)
    cfg = _ray_config()
    assert args.address == "auto" and args.cache_dir.startswith("/mnt/ovss/")
    assert "/mnt/ovss/cache" in " ".join(cfg["setup_commands"])
    assert "RAY_AUTH_MODE" in section and "RAY_AUTH_TOKEN" in section
    for f in ("infra/ray-cluster.yaml", "infra/kuberay.yaml", "infra/Dockerfile"):
        assert f in section and (REPO / f).is_file()
    assert f"-t {dockerfile_tag()} " in section
