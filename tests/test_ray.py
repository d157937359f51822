"""The ray executor: replicas of the local backends on Ray actors register exactly a local run's snapshots, on a
two-node cluster too, through a lost replica and a killed driver; bad executor options fail before any work."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from builders.catalog import Catalog  # noqa: E402
from builders.config import ExecutorConfig, GenerateConfig, RankConfig, SamplingConfig, SplitConfig  # noqa: E402
from builders.errors import InputError  # noqa: E402
from builders.generate import generate  # noqa: E402
from builders.prompts import import_prompts, split_prompts  # noqa: E402
from builders.rank import rank  # noqa: E402
from tests.conftest import ROOT, SAMPLE, generations_catalog  # noqa: E402

FAST = SamplingConfig(num_responses=3, temperature=0.7, max_tokens=16, seed=7)
MB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster():
    """One two-node Ray cluster (1 CPU each, small object stores) for the whole file; this process is its driver.
    Replicas of 1 CPU each land one per node, so every run here crosses nodes."""
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * MB, "include_dashboard": False}
    )
    c.add_node(num_cpus=1, object_store_memory=80 * MB)
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """A catalog with iteration 1's prompt sets (12 train, 4 test), copied by each test."""
    path = tmp_path_factory.mktemp("ray") / "prompts.duckdb"
    catalog = Catalog(path)
    import_prompts(catalog, str(SAMPLE))
    split_prompts(catalog, SplitConfig(iterations=1, train_size=12, test_size=4, seed=1))
    return path


def copy(src: Path, dst: Path) -> Catalog:
    shutil.copy(src, dst)
    return Catalog(dst)


def gen_cfg(model: Path, **kw) -> GenerateConfig:
    return GenerateConfig(model=str(model), splits=("train",), sampling=FAST, batch_prompts=2, **kw)


RAY2 = ExecutorConfig(executor="ray", replicas=2)


@pytest.fixture(scope="module")
def local_ids(prompts_file, tiny_models, tmp_path_factory) -> list[str]:
    """The snapshot ids of a local run: what every Ray run below must register."""
    catalog = copy(prompts_file, tmp_path_factory.mktemp("local") / "c.duckdb")
    return [s.id for s in generate(catalog, 1, gen_cfg(tiny_models / "generator"), progress=False).snapshots]


def _work_key(catalog: Catalog) -> str:
    with catalog.connect() as con:
        return con.execute("SELECT work_key FROM work_units LIMIT 1").fetchone()[0]


# --------------------------------------------------------------------------------------------------------- generate
def test_generate_on_two_nodes_registers_the_local_snapshot(cluster, prompts_file, tiny_models, tmp_path, local_ids):
    catalog = copy(prompts_file, tmp_path / "c.duckdb")
    result = generate(catalog, 1, gen_cfg(tiny_models / "generator", scale_out=RAY2), progress=False)
    assert [s.id for s in result.snapshots] == local_ids
    ex = result.executor
    assert ex["replicas"] == 2 and ex["nodes"] == 2 and sum(ex["units_per_replica"]) == 12
    assert min(ex["units_per_replica"]) > 0  # both replicas worked
    snap = result.snapshots[0]
    assert snap.params["executor"] == {"executor": "ray", "replicas": 2} and snap.params["backend"] == "transformers"
    # the replicas are gone when the stage returns
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("iterdpo-")]


@pytest.mark.slow
def test_a_replica_killed_mid_run_is_replaced_and_the_run_ends_with_the_local_snapshot(
    cluster, prompts_file, tiny_models, tmp_path, local_ids, capsys
):
    catalog = copy(prompts_file, tmp_path / "c.duckdb")
    commit, killed = catalog.add_work, []

    def add_work(*args, **kwargs):  # after the first commit, kill a replica that has chunks in flight
        commit(*args, **kwargs)
        if not killed:
            names = sorted(
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("iterdpo-generate-")
            )
            actor = ray.get_actor(
                names[0],
                namespace=next(
                    a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == names[0]
                ),
            )
            ray.kill(actor)  # gone for good: Ray does not restart it
            killed.append(len(catalog.work_units(_work_key(catalog))))

    catalog.add_work = add_work
    result = generate(catalog, 1, gen_cfg(tiny_models / "generator", scale_out=RAY2, commit_seconds=0), progress=False)
    assert killed and killed[0] < 12, "kill a replica in the middle of the run"
    assert result.executor["replaced_replicas"] == 1 and result.executor["resubmitted_chunks"] >= 1
    assert "generate replica" in capsys.readouterr().err
    assert [s.id for s in result.snapshots] == local_ids
    assert result.splits[0].processed == 12


def test_a_node_lost_mid_run_leaves_its_chunks_to_the_other_replicas(cluster, tmp_path, capsys):
    """A third node joins, one replica runs there; the node goes away after the first commit. Its chunks go to the
    two replicas left (its replacement finds no room and is never needed) and the run ends with the local ids."""
    cfg = RankConfig(
        ranker="python", ranker_model="tests.scorers:slow_longer_is_better", batch_prompts=1, commit_seconds=0
    )
    local = rank(generations_catalog(tmp_path / "local.duckdb", n_prompts=12), 1, cfg, progress=False)
    node = cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
    cluster.wait_for_nodes()
    catalog = generations_catalog(tmp_path / "c.duckdb", n_prompts=12)
    commit, removed = catalog.add_work, []

    def add_work(*args, **kwargs):
        commit(*args, **kwargs)
        if not removed:
            cluster.remove_node(node)
            removed.append(len(catalog.work_units(_work_key(catalog))))

    catalog.add_work = add_work
    result = rank(catalog, 1, replace(cfg, scale_out=ExecutorConfig(executor="ray", replicas=3)), progress=False)
    assert removed and removed[0] < 12
    assert result.executor["replaced_replicas"] == 1 and result.executor["resubmitted_chunks"] >= 1
    assert "rank replica" in capsys.readouterr().err
    assert [s.id for s in result.snapshots] == [s.id for s in local.snapshots]


_DRIVER = """
import json, sys
from builders.catalog import Catalog
from builders.config import ExecutorConfig, RankConfig
from builders.rank import rank
catalog = Catalog(sys.argv[1])
commit = catalog.add_work
def add_work(*args, **kwargs):  # the handshake: the test kills this driver after its third commit
    commit(*args, **kwargs)
    print("committed", flush=True)
catalog.add_work = add_work
cfg = RankConfig(ranker="python", ranker_model="tests.scorers:slow_longer_is_better", batch_prompts=1,
                 commit_seconds=0, scale_out=ExecutorConfig(executor="ray", replicas=2, ray_address=sys.argv[2]))
print(json.dumps([s.id for s in rank(catalog, 1, cfg, progress=False).snapshots]), flush=True)
"""


@pytest.mark.slow
def test_kill_9_of_the_driver_then_the_same_command_registers_the_local_snapshot(cluster, tmp_path):
    cfg = RankConfig(ranker="python", ranker_model="tests.scorers:slow_longer_is_better")
    local = rank(generations_catalog(tmp_path / "local.duckdb", n_prompts=16), 1, cfg, progress=False)
    catalog = generations_catalog(tmp_path / "c.duckdb", n_prompts=16)
    command = [sys.executable, "-c", _DRIVER, str(catalog.path), cluster.address]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    commits = 0
    for line in proc.stdout:  # EOF if it dies first
        commits += line.strip() == "committed"
        if commits == 3:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert commits == 3, "the driver never committed three chunks"
    done_before = len(catalog.work_units(_work_key(catalog)))
    assert 3 <= done_before < 16 and catalog.list(kind="scores") == []

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.splitlines()[-1]) == [s.id for s in local.snapshots]
    assert again.stdout.count("committed") == 16 - done_before  # only the rest was scored


# ------------------------------------------------------------------------------------------------------------- rank
@pytest.mark.parametrize("ranker", ["pairrm", "python"])
def test_rank_on_ray_registers_the_local_snapshot(cluster, tiny_models, tmp_path, ranker):
    model = str(tiny_models / "ranker") if ranker == "pairrm" else "tests.scorers:longer_is_better"
    cfg = RankConfig(ranker=ranker, ranker_model=model, batch_prompts=3)
    local = rank(generations_catalog(tmp_path / "local.duckdb", n_prompts=10), 1, cfg, progress=False)
    on_ray = rank(
        generations_catalog(tmp_path / "ray.duckdb", n_prompts=10), 1, replace(cfg, scale_out=RAY2), progress=False
    )
    assert [s.id for s in on_ray.snapshots] == [s.id for s in local.snapshots]
    assert on_ray.executor["nodes"] == 2 and sum(on_ray.executor["units_per_replica"]) == 10
    # the work key is the local one: a local rerun finds everything done
    again = rank(Catalog(tmp_path / "ray.duckdb"), 1, cfg, progress=False)
    assert again.splits[0].processed == 0 and again.snapshots[0].id == local.snapshots[0].id


def test_cli_rank_starts_a_local_ray_and_stops_it(tmp_path):
    """No --ray-address: the command starts its own Ray (2 replicas on this machine) and shuts it down."""
    local = rank(
        generations_catalog(tmp_path / "local.duckdb", n_prompts=8),
        1,
        RankConfig(ranker="python", ranker_model="tests.scorers:longer_is_better"),
        progress=False,
    )
    generations_catalog(tmp_path / "ray.duckdb", n_prompts=8)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not this file's cluster
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "builders.cli",
            "--catalog",
            str(tmp_path / "ray.duckdb"),
            "rank",
            "--iteration",
            "1",
            "--ranker",
            "python",
            "--ranker-model",
            "tests.scorers:longer_is_better",
            "--batch-prompts",
            "2",
            "--executor",
            "ray",
            "--replicas",
            "2",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert doc["splits"][0]["snapshot"]["id"] == local.snapshots[0].id
    assert doc["executor"]["nodes"] == 1 and min(doc["executor"]["units_per_replica"]) > 0


# ------------------------------------------------------------------------------------------------------- best-of-n
def test_best_of_n_on_ray_writes_the_local_outputs(cluster, tiny_models, tmp_path):
    from builders.config import BestOfNConfig
    from builders.evaluate import best_of_n

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"instruction": f"Say something about {w}."}) + "\n"
            for w in ("rivers", "music", "tables", "python", "cities")
        )
    )
    gen = GenerateConfig(
        model=str(tiny_models / "generator"),
        batch_prompts=2,
        sampling=SamplingConfig(num_responses=3, temperature=0.7, max_tokens=8, seed=3),
    )
    ranker = RankConfig(ranker="python", ranker_model="tests.scorers:longer_is_better", batch_prompts=2)
    best_of_n(BestOfNConfig(prompts, tmp_path / "local.json", gen, ranker))
    best_of_n(
        BestOfNConfig(prompts, tmp_path / "ray.json", replace(gen, scale_out=RAY2), replace(ranker, scale_out=RAY2))
    )
    local, on_ray = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "ray"))
    assert [r["output"] for r in on_ray] == [r["output"] for r in local] and len(local) == 5
    sidecar = [json.loads(line) for line in (tmp_path / "ray.candidates.jsonl").read_text().splitlines()]
    assert [r["candidate_scores"] for r in sidecar] == [
        json.loads(line)["candidate_scores"] for line in (tmp_path / "local.candidates.jsonl").read_text().splitlines()
    ]


# ------------------------------------------------------------------------------------------------------- bad input
def _state(path: Path) -> list[int]:
    with Catalog(path).connect() as con:
        return [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("snapshots", "work_units")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--executor", "ray", "--replicas", "0"], "--replicas must be at least 1, not 0"),
        (["--replicas", "2"], "--replicas 2 needs the ray executor"),
        (["--ray-address", "auto"], "--ray-address needs the ray executor"),
        (["--executor", "ray", "--ray-address", "http://head:8265"], "--ray-address must be auto, HOST:PORT or ray://"),
        (
            ["--executor", "ray", "NO_RAY"],
            "the ray executor needs Ray, which is not installed: pip install 'iterdpo[ray]'",
        ),
    ],
)
@pytest.mark.parametrize("command", ["generate", "rank", "best-of-n"])
def test_bad_executor_options_fail_before_any_work(
    cli, catalog_path, tiny_models, tmp_path, monkeypatch, command, args, message
):
    if "NO_RAY" in args:
        args = [a for a in args if a != "NO_RAY"]
        monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    generations_catalog(catalog_path, n_prompts=2)
    before = _state(catalog_path)
    common = {
        "generate": ["generate", "--iteration", "1", "--model", tiny_models / "generator"],
        "rank": ["rank", "--iteration", "1", "--ranker", "python", "--ranker-model", "tests.scorers:longer_is_better"],
        "best-of-n": [
            "best-of-n",
            "--model",
            tiny_models / "generator",
            "--prompts",
            SAMPLE,
            "--ranker-model",
            tiny_models / "ranker",
            "--output",
            tmp_path / "out.json",
        ],
    }[command]
    result = cli(*common, *args)
    assert result.code == 1 and result.out == "" and len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith(f"Error: {message}")
    assert _state(catalog_path) == before and not (tmp_path / "out.json").exists()


def test_an_unreachable_cluster_is_one_line_at_once(catalog_path):
    """Ray retries an unreachable address for minutes; the command says so at once (a fresh process: this one is
    already connected to the file's cluster, which a stage reuses)."""
    generations_catalog(catalog_path, n_prompts=2)
    before = _state(catalog_path)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "builders.cli",
            "--catalog",
            str(catalog_path),
            "rank",
            "--iteration",
            "1",
            "--ranker",
            "python",
            "--ranker-model",
            "tests.scorers:longer_is_better",
            "--executor",
            "ray",
            "--ray-address",
            "127.0.0.1:1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and out.stdout == "" and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("Error: cannot reach Ray at 127.0.0.1:1")
    assert _state(catalog_path) == before


def test_unknown_executor_is_an_error_in_the_api_and_the_pipeline(tmp_path):
    from builders.pipeline import load_pipeline, validate_pipeline

    with pytest.raises(InputError, match="executor must be one of local, ray, not 'dask'"):
        generate(Catalog(tmp_path / "c.duckdb"), 1, GenerateConfig(scale_out=ExecutorConfig(executor="dask")))
    assert not (tmp_path / "c.duckdb").exists()
    (tmp_path / "p.yaml").write_text("generation:\n  scale_out:\n    executor: ray\n    replicas: 0\n")
    with pytest.raises(InputError, match="generation: replicas must be at least 1, not 0"):
        validate_pipeline(load_pipeline(tmp_path / "p.yaml"), "p.yaml")


def test_a_pipeline_on_ray_is_validated_without_starting_replicas(tiny_models, tmp_path, monkeypatch):
    from builders.backends import ray as ray_backend
    from builders.pipeline import load_pipeline, validate_pipeline

    def no_replicas(*args, **kwargs):
        raise AssertionError("validation started Ray replicas")

    monkeypatch.setattr(ray_backend.RayPool, "__init__", no_replicas)
    # generation: this machine's own Ray (replicas checked against its CPUs up front); ranking: a cluster, whose
    # room is known only once connected (and may grow)
    (tmp_path / "p.yaml").write_text(
        f"generation:\n  model: {tiny_models / 'generator'}\n  scale_out: {{executor: ray, replicas: 1}}\n"
        f"ranking:\n  ranker: python\n  ranker_model: tests.scorers:longer_is_better\n"
        f"  scale_out: {{executor: ray, replicas: 4, ray_address: auto}}\n"
        f"training:\n  recipe: {ROOT / 'train' / 'recipes' / 'tiny-cpu.yaml'}\n"
    )
    cfg = load_pipeline(tmp_path / "p.yaml")
    assert cfg.ranking.scale_out == ExecutorConfig(executor="ray", replicas=4, ray_address="auto")
    validate_pipeline(cfg, "p.yaml")


# ------------------------------------------------------------- checks that need Ray's view, before the first snapshot
def _fresh(*args, timeout: float = 120, **env_vars: str) -> subprocess.CompletedProcess:
    """`iterdpo ARGS` in a new process, not connected to this file's cluster (a stage would reuse that one)."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env_vars}
    return subprocess.run(
        [sys.executable, "-m", "builders.cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1 and out.stdout == "" and len(out.stderr.splitlines()) == 1, out.stderr[-2000:]
    return out.stderr


@pytest.mark.parametrize("command", ["generate", "rank"])
def test_more_replicas_than_this_machines_cpus_is_one_line_before_any_work(catalog_path, tiny_models, command):
    """A local Ray can never hold them: said up front, from the CPU count, without starting Ray (it writes its
    session folder under RAY_TMPDIR when it starts)."""
    generations_catalog(catalog_path, n_prompts=2)
    before = _state(catalog_path)
    stage = {
        "generate": ["generate", "--iteration", "1", "--model", tiny_models / "generator"],
        "rank": ["rank", "--iteration", "1", "--ranker", "python", "--ranker-model", "tests.scorers:longer_is_better"],
    }[command]
    ray_tmp = Path(tempfile.mkdtemp(prefix="iterdpo-ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    try:
        err = _one_line_error(
            _fresh(
                "--catalog", catalog_path, *stage, "--executor", "ray", "--replicas", "4096", RAY_TMPDIR=str(ray_tmp)
            )
        )
        assert not any(ray_tmp.rglob("session_*")), "Ray was started to say so"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert re.match(
        r"Error: --replicas 4096 need 4096 CPUs; this machine's Ray has \d+ CPUs: use fewer replicas", err
    ), err
    assert _state(catalog_path) == before


def test_rank_on_ray_with_a_device_this_machine_lacks_says_what_the_local_path_says(cli, catalog_path, tiny_models):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    generations_catalog(catalog_path, n_prompts=2)
    before = _state(catalog_path)
    stage = [
        "rank",
        "--iteration",
        "1",
        "--ranker",
        "pairrm",
        "--ranker-model",
        tiny_models / "ranker",
        "--device",
        "cuda",
    ]
    local = cli(*stage)
    assert local.code == 1 and local.err.startswith("Error: --device cuda: CUDA is not available"), local.err
    assert _one_line_error(_fresh("--catalog", catalog_path, *stage, "--executor", "ray")) == local.err
    assert _state(catalog_path) == before


def test_a_device_index_on_ray_is_refused(cli, catalog_path, tiny_models):
    """Ray shows each replica only the GPU it was given (as cuda:0): cuda:1 would fail inside every replica."""
    generations_catalog(catalog_path, n_prompts=2)
    before = _state(catalog_path)
    result = cli(
        "rank",
        "--iteration",
        "1",
        "--ranker",
        "pairrm",
        "--ranker-model",
        tiny_models / "ranker",
        "--device",
        "cuda:1",
        "--executor",
        "ray",
        "--ray-address",
        "127.0.0.1:1",
    )
    assert result.code == 1 and len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith("Error: --device cuda:1: on the ray executor every replica is given a GPU of its own")
    assert _state(catalog_path) == before


def test_ray_replicas_ask_for_a_gpu_when_the_device_is_cuda():
    """On a cluster without GPUs now, --device cuda replicas wait for GPU nodes (with a warning) instead of
    starting on CPUs and failing there."""
    from builders.backends.ray import ranker_resources

    cuda = RankConfig(ranker="pairrm", device="cuda", scale_out=RAY2)
    assert ranker_resources(cuda, gpus=0) == {"num_cpus": 1, "num_gpus": 1}
    assert ranker_resources(replace(cuda, device=None), gpus=0)["num_gpus"] == 0
    assert ranker_resources(replace(cuda, device="cpu"), gpus=4)["num_gpus"] == 0
    assert ranker_resources(replace(cuda, device=None), gpus=4)["num_gpus"] == 1


def _pipeline_yaml(tmp_path: Path, tiny: Path, generation: dict, ranking: dict) -> Path:
    import yaml

    doc = {
        "prompts": {"source": str(SAMPLE)},
        "split": {"iterations": 1, "train_size": 4, "test_size": 2},
        "generation": {
            "model": str(tiny / "generator"),
            "sampling": {"num_responses": 2, "max_tokens": 8},
            **generation,
        },
        "ranking": {"ranker": "python", "ranker_model": "tests.scorers:longer_is_better", **ranking},
        "training": {"recipe": str(ROOT / "train/recipes/tiny-cpu.yaml"), "output_dir": str(tmp_path / "m{n}")},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("generation", "ranking", "message"),
    [
        (
            {"scale_out": {"executor": "ray", "ray_address": "127.0.0.1:1"}},
            {},
            "generation: cannot reach Ray at 127.0.0.1:1",
        ),
        ({}, {"scale_out": {"executor": "ray", "replicas": 4096}}, "ranking: replicas 4096 need 4096 CPUs"),
        (
            {},
            {"ranker": "pairrm", "ranker_model": "TINY_RANKER", "device": "cuda", "scale_out": {"executor": "ray"}},
            "ranking: device cuda: CUDA is not available on this machine",
        ),
    ],
)
def test_run_checks_the_ray_cluster_before_the_first_snapshot(tiny_models, tmp_path, generation, ranking, message):
    """`iterdpo run` used to import and split the prompts, then fail when the first Ray stage started."""
    if "device" in ranking:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        ranking = {**ranking, "ranker_model": str(tiny_models / "ranker")}
    catalog = tmp_path / "c.duckdb"
    config = _pipeline_yaml(tmp_path, tiny_models, generation, ranking)
    err = _one_line_error(_fresh("--catalog", catalog, "run", config))
    assert re.match(rf"Error: .*p\.yaml: {message}", err), err
    assert not catalog.exists() and not (tmp_path / "m1").exists()
