"""`stagecoach k8s` (issue 20): the committed deploy/k8s/ is the generated one; every Kubernetes manifest passes
`kubernetes-validate --strict`, every KEDA resource KEDA's own CRD schema (../shared/k8s/); each stage queue
has a ScaledObject whose Redis list is the one kombu really fills for that queue (checked on a real Redis)."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from celery import Celery

from cli.k8s import HEAD, K8sOptions, database_index, redis_lists, render
from contracts.catalog import load_catalog
from contracts.names import stage_queue
from contracts.priority import queue_lists
from contracts.specs import Limits, ScaleSpec
from tests.services import ROOT, private_redis
from workers.settings import Settings

# ../shared/k8s beside the repo; STAGECOACH_TEST_KEDA_CRDS points elsewhere (a worktree outside /work)
KEDA_CRDS = Path(os.environ.get("STAGECOACH_TEST_KEDA_CRDS") or ROOT.parent / "shared" / "k8s")
K8S_VERSION = "1.31.0"
STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))


def catalog() -> Any:
    return load_catalog([ROOT / "pipelines"])


def generated(options: K8sOptions | None = None, settings: Settings | None = None) -> dict[str, str]:
    return render(catalog(), settings or Settings(), options or K8sOptions())


def docs_of(texts: dict[str, str]) -> list[dict[str, Any]]:
    return [doc for name, text in sorted(texts.items()) if name != "kustomization.yaml"
            for doc in yaml.safe_load_all(text) if doc]


def of_kind(texts: dict[str, str], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs_of(texts) if doc["kind"] == kind]


# --- the committed folder ----------------------------------------------------------------------------

def test_committed_manifests_are_the_generated_ones() -> None:
    committed = {path.name: path.read_text() for path in (ROOT / "deploy" / "k8s").glob("*.yaml")}
    assert committed == generated(), "run: stagecoach k8s -o deploy/k8s"


def test_the_cli_writes_the_same_files_and_removes_only_its_own_stale_ones(tmp_path: Path) -> None:
    (tmp_path / "worker-gone.yaml").write_text(HEAD + "kind: Deployment\n")
    (tmp_path / "mine.yaml").write_text("kind: ConfigMap\n")  # not generated: left alone
    done = subprocess.run([STAGECOACH, "k8s", "-o", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "removed worker-gone.yaml" in done.stderr
    written = {path.name: path.read_text() for path in tmp_path.glob("*.yaml") if path.name != "mine.yaml"}
    assert written == generated() and (tmp_path / "mine.yaml").exists()


def test_kustomization_lists_every_file() -> None:
    texts = generated()
    kustomization = yaml.safe_load(texts["kustomization.yaml"])
    assert kustomization["namespace"] == "stagecoach"
    assert sorted(kustomization["resources"]) == sorted(set(texts) - {"kustomization.yaml"})


# --- validation without a cluster ------------------------------------------------------------------------

def test_every_kubernetes_manifest_validates_strictly() -> None:
    kinds = set()
    for doc in docs_of(generated()):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert kinds == {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                     "PodDisruptionBudget"}


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The check above can fail: a misspelt field is refused."""
    deployment = of_kind(generated(), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["probes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def keda_schema(kind: str) -> dict[str, Any]:
    """KEDA's CRD schema of `kind`, strict the way a cluster's field validation is: unknown fields refused."""
    name = {"ScaledObject": "keda.sh_scaledobjects.yaml",
            "TriggerAuthentication": "keda.sh_triggerauthentications.yaml"}
    path = KEDA_CRDS / name[kind]
    if not path.exists():
        pytest.fail(f"KEDA's CRDs not found at {path}: the tests read them from ../shared/k8s/ beside the repo "
                    "(or STAGECOACH_TEST_KEDA_CRDS)")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return strict(version["schema"]["openAPIV3Schema"])


def strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


SENTINELS = "sentinel://redis-sentinel-0.redis-sentinel:26379/2;sentinel://redis-sentinel-1.redis-sentinel:26379;" \
            "sentinel://redis-sentinel-2.redis-sentinel:26380"


@pytest.mark.parametrize("broker", ["redis://redis:6379/0", "amqp://stagecoach@rabbitmq:5672//", SENTINELS])
def test_keda_resources_validate_against_kedas_crds(broker: str) -> None:
    backend = SENTINELS if broker == SENTINELS else "redis://redis:6379/0"
    texts = generated(K8sOptions(broker_url=broker, result_backend=backend, sentinel_password=True))
    found = 0
    for kind in ("ScaledObject", "TriggerAuthentication"):
        for doc in of_kind(texts, kind):
            jsonschema.validate(doc, keda_schema(kind))
            found += 1
    assert found == len(catalog().stages) + 1


def test_keda_validation_rejects_an_unknown_field() -> None:
    scaled = of_kind(generated(), "ScaledObject")[0]
    scaled["spec"]["minReplicas"] = 1  # KEDA's field is minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, keda_schema("ScaledObject"))


# --- KEDA watches exactly kombu's lists --------------------------------------------------------------

def test_every_stage_queue_has_a_scaled_object_on_its_list() -> None:
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in of_kind(generated(), "ScaledObject")}
    deployments = {doc["metadata"]["name"]: doc for doc in of_kind(generated(), "Deployment")}
    for ref in catalog().stages:
        queue = stage_queue(ref)
        consumers = [name for name, d in deployments.items() if queue_of(d) == queue]
        assert len(consumers) == 1, (ref, consumers)
        triggers = scaled[consumers[0]]["spec"]["triggers"]  # one per priority list (contracts/priority.py)
        assert [t["metadata"]["listName"] for t in triggers] == queue_lists(queue)
        assert all(t["type"] == "redis" and t["authenticationRef"] == {"name": "stagecoach-broker"} for t in triggers)
    assert "routing" in deployments and "routing" not in scaled


def queue_of(deployment: dict[str, Any]) -> str | None:
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    return command[command.index("-Q") + 1] if "-Q" in command else None


def test_the_lists_are_the_ones_kombu_fills() -> None:
    """A task sent the way Stagecoach sends it lands in the list KEDA watches; with priorities on, a message of
    each priority lands in one of the triggers' lists."""
    steps = (0, 3, 6, 9)
    with private_redis() as url:
        app = Celery("probe", broker=url)
        db = redis.Redis.from_url(url)
        try:
            app.send_task("stage.key_terms", args=[{}], queue=stage_queue("key_terms"))
            (plain,) = redis_lists(stage_queue("key_terms"))
            assert db.llen(plain) == 1
            lists = redis_lists(stage_queue("answer"), steps)
            assert len(lists) == 4
            for priority in range(10):
                app.send_task("stage.answer", args=[{}], queue=stage_queue("answer"), priority=priority)
            counts = [db.llen(name) for name in lists]
            assert sum(counts) == 10 and all(counts), counts
            assert sorted(k.decode() for k in db.keys("stage.answer*")) == sorted(lists)
        finally:
            app.close()


def test_priority_lists_give_one_trigger_each() -> None:
    texts = generated(K8sOptions(priority_steps=(0, 3, 6, 9)))
    scaled = {doc["metadata"]["name"]: doc for doc in of_kind(texts, "ScaledObject")}
    names = [t["metadata"]["listName"] for t in scaled["worker-answer"]["spec"]["triggers"]]
    assert names == ["stage.answer", "stage.answer\x06\x163", "stage.answer\x06\x166", "stage.answer\x06\x169"]


@pytest.mark.parametrize(("url", "index"), [("redis://redis:6379/0", 0), ("redis://r:6380/3", 3), ("redis://r", 0),
                                            ("rediss://r:6379/5", 5)])
def test_database_index_and_address_come_from_the_broker_url(url: str, index: int) -> None:
    assert database_index(url) == index
    trigger = of_kind(generated(K8sOptions(broker_url=url)), "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]
    assert trigger["databaseIndex"] == str(index)
    assert trigger["enableTLS"] == ("true" if url.startswith("rediss") else "false")
    assert trigger["address"].split(":")[0] in url


def test_rabbitmq_broker_gives_rabbitmq_triggers_on_the_queue() -> None:
    texts = generated(K8sOptions(broker_url="amqp://stagecoach@rabbitmq:5672//", result_backend="redis://redis:6379/0"))
    for doc in of_kind(texts, "ScaledObject"):
        (trigger,) = doc["spec"]["triggers"]
        assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"].startswith("stage.")
        assert trigger["metadata"]["mode"] == "QueueLength"
    (auth,) = of_kind(texts, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "host", "name": "stagecoach-secrets",
                                                "key": "rabbitmq-url"}]


def test_scale_comes_from_the_stage_spec_and_list_length_from_concurrency() -> None:
    cat = catalog()
    cat.stages["answer"] = cat.stages["answer"].model_copy(update={"scale": ScaleSpec(min=0, max=3)})
    cat.stages["key_terms"] = cat.stages["key_terms"].model_copy(update={"scale": ScaleSpec(max=5, per_replica=2)})
    texts = render(cat, Settings(concurrency=6), K8sOptions())
    scaled = {doc["metadata"]["name"]: doc["spec"] for doc in of_kind(texts, "ScaledObject")}
    assert (scaled["worker-answer"]["minReplicaCount"], scaled["worker-answer"]["maxReplicaCount"]) == (0, 3)
    assert scaled["worker-answer"]["triggers"][0]["metadata"]["listLength"] == "6"
    assert scaled["worker-key-terms"]["triggers"][0]["metadata"]["listLength"] == "2"
    assert scaled["worker-define"]["minReplicaCount"] == 1  # the default
    with pytest.raises(ValueError, match=r"scale: min \(4\) is above max \(2\)"):
        ScaleSpec(min=4, max=2)


# --- what a pod is given ---------------------------------------------------------------------------------

def test_stopping_a_stage_pod_waits_out_its_hard_limit() -> None:
    cat = catalog()
    cat.stages["answer"] = cat.stages["answer"].model_copy(update={"time_limit": 45.0})
    settings = Settings()
    deployments = {d["metadata"]["name"]: d for d in of_kind(render(cat, settings, K8sOptions()), "Deployment")}
    pod = deployments["worker-answer"]["spec"]["template"]["spec"]
    hard = Limits.stage(cat.stages["answer"], settings.stage_time_limit).hard
    assert hard == 49.5 and pod["terminationGracePeriodSeconds"] >= hard + 10
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["STAGECOACH_SOFT_SHUTDOWN_SECONDS"] == "49.5"
    assert "REMAP_SIGTERM" not in env  # SIGTERM is Celery's warm shutdown: finish what runs, take nothing new
    assert "replicas" not in deployments["worker-answer"]["spec"]  # KEDA owns it


def test_no_secret_value_in_any_manifest() -> None:
    for doc in docs_of(generated()):
        assert doc["kind"] != "Secret"
        for container in containers(doc):
            for env in container.get("env", []):
                if env.get("value") in ("true", "false"):  # a switch (STAGECOACH_API_AUTH), not a secret
                    continue
                if any(word in env["name"] for word in ("PASSWORD", "AUTH", "KEY", "TOKEN")):
                    assert env["valueFrom"]["secretKeyRef"]["name"] == "stagecoach-secrets", env
    configmap = of_kind(generated(), "ConfigMap")[0]["data"]
    assert "@" not in configmap["STAGECOACH_BROKER_URL"]  # no credentials in a URL


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] != "Deployment":
        return []
    return list(doc["spec"]["template"]["spec"]["containers"])


def test_probes_ask_the_service_not_the_process() -> None:
    for doc in of_kind(generated(), "Deployment"):
        (container,) = containers(doc)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = container[probe]
            if "httpGet" in check:
                continue
            command = " ".join(check["exec"]["command"])
            assert "workers.health" in command or "watchdog --once" in command, (doc["metadata"]["name"], command)
        assert container["resources"]["requests"] and container["resources"]["limits"]


def test_every_worker_mounts_the_data_volume_and_knows_the_corpus_path() -> None:
    texts = generated()
    assert of_kind(texts, "ConfigMap")[0]["data"]["STAGECOACH_HOTPOTQA_PATH"] == "/data/hotpotqa_dev_hard_200.jsonl"
    for doc in of_kind(texts, "Deployment"):
        if queue_of(doc) is None:
            continue
        (container,) = containers(doc)
        assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data", "readOnly": True}]
        volumes = doc["spec"]["template"]["spec"]["volumes"]
        assert volumes[0]["persistentVolumeClaim"]["claimName"] == "stagecoach-data"


def test_a_broker_url_it_cannot_scale_on_is_refused_naming_the_option() -> None:
    with pytest.raises(ValueError, match=r"--broker-url: expected redis://, rediss://, sentinel:// or amqp://"):
        generated(K8sOptions(broker_url="unix:///run/redis.sock"))
    with pytest.raises(ValueError, match=r"--result-backend: expected redis://, rediss:// or sentinel://"):
        generated(K8sOptions(broker_url="amqp://stagecoach@rabbitmq:5672//"))
    with pytest.raises(ValueError, match=r"sentinel URL .*got redis://r:6379"):
        generated(K8sOptions(broker_url="sentinel://s1:26379;redis://r:6379"))


# --- Redis Sentinel: KEDA asks the sentinels for the master ---------------------------------------------------

def test_a_sentinel_broker_gives_redis_sentinel_triggers_on_kombus_lists() -> None:
    texts = generated(K8sOptions(broker_url=SENTINELS, sentinel_master="stagecoach-master"))
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in of_kind(texts, "ScaledObject")}
    assert len(scaled) == len(catalog().stages)
    for name, doc in scaled.items():
        triggers = doc["spec"]["triggers"]  # one per priority list (contracts/priority.py)
        deployment = next(d for d in of_kind(texts, "Deployment") if d["metadata"]["name"] == name)
        assert [t["metadata"]["listName"] for t in triggers] == queue_lists(str(queue_of(deployment)))
        for trigger in triggers:
            assert trigger["type"] == "redis-sentinel"
            assert trigger["authenticationRef"] == {"name": "stagecoach-broker"}
            meta = trigger["metadata"]
            assert meta["addresses"] == ("redis-sentinel-0.redis-sentinel:26379,redis-sentinel-1.redis-sentinel:26379,"
                                         "redis-sentinel-2.redis-sentinel:26380")
            assert meta["sentinelMaster"] == "stagecoach-master" and meta["databaseIndex"] == "2"
    configmap = of_kind(texts, "ConfigMap")[0]["data"]
    assert configmap["STAGECOACH_SENTINEL_MASTER"] == "stagecoach-master"
    assert configmap["STAGECOACH_BROKER_URL"] == configmap["STAGECOACH_RESULT_BACKEND"] == SENTINELS
    (auth,) = of_kind(texts, "TriggerAuthentication")
    assert [ref["parameter"] for ref in auth["spec"]["secretTargetRef"]] == ["password"]  # the master's only


def test_sentinels_with_a_password_of_their_own_get_it_from_the_secret() -> None:
    texts = generated(K8sOptions(broker_url=SENTINELS, sentinel_password=True))
    (auth,) = of_kind(texts, "TriggerAuthentication")
    assert {"parameter": "sentinelPassword", "name": "stagecoach-secrets",
            "key": "sentinel-password"} in auth["spec"]["secretTargetRef"]
    for doc in of_kind(texts, "Deployment"):
        (container,) = containers(doc)
        env = {e["name"]: e for e in container["env"]}
        assert env["STAGECOACH_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "stagecoach-secrets", "key": "sentinel-password"}
    plain = generated()  # a plain Redis broker: nothing about sentinels anywhere
    assert "SENTINEL" not in "".join(plain.values()) and "sentinel" not in "".join(plain.values())


def test_sentinel_manifests_validate_strictly() -> None:
    for doc in docs_of(generated(K8sOptions(broker_url=SENTINELS, sentinel_password=True))):
        if not doc["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
