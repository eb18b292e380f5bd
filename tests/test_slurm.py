"""The SLURM profile, end to end, on a real single-node SLURM cluster started for the test.

tests/slurm/start_cluster.sh installs Debian's slurm-wlm and munge if they are missing (root
and apt-get needed) and starts munged, slurmctld and slurmd on localhost with a ``cpu`` and a
``gpu`` partition and fake GPUs (as many as CPUs); tests/slurm/stop_cluster.sh stops exactly
those daemons.
Where the cluster cannot start (not root, no apt-get, ...), the tests are skipped with the
reason and the daemons' log tails; set EMFM_REQUIRE_SLURM=1 to make that a failure instead.

Workflows run through ``snakemake --profile profiles/slurm`` (the site-profile template, with
the ``cpu`` partition as the site's default) plus the workflow profile ``profiles/default``
that Snakemake loads by itself, with only the overrides a one-node test cluster needs (see
``cluster_overrides``), among them the partition file ``tests/slurm/partitions.yaml``: the
plugin's own partition selection sends the GPU rules to the ``gpu`` partition. GPU requests,
groups come from the workflow profile, retries from the site profile, as users get them. What ran where is read back from the
jobs themselves (``$SLURM_JOB_PARTITION``, ``scontrol -d show job``) and from the sbatch
calls in Snakemake's log.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO_ROOT / "tests" / "slurm"
SLURM_PROFILE = REPO_ROOT / "profiles" / "slurm"
WORKFLOW_PROFILE = REPO_ROOT / "profiles" / "default"
PARTITIONS = SLURM_SCRIPTS / "partitions.yaml"

# Upper bounds; a healthy run takes far less (see the report printed by each test).
CLUSTER_START_TIMEOUT_S = 600  # includes a first-time apt-get install
# Catches a hang only: the demo on SLURM ran 12 min 8 s on a loaded 2-core machine with every
# job succeeding, so the limit is several times that.
SNAKEMAKE_TIMEOUT_S = 3600
# Largest sbatch --mem of one job on the test node (RealMemory is ~80 % of the machine's);
# memory is only bookkeeping there (no cgroups), so this only has to let jobs fit.
TEST_MEM_CAP_MB = 2000


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class SlurmCluster:
    state_dir: Path
    conf: Path
    start_seconds: float

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        # state_dir/bin: sbatch/srun/... wrappers pinned to this cluster's slurm.conf (the
        # slurm-jobstep plugin drops SLURM_CONF before its nested srun); then the venv.
        env["PATH"] = os.pathsep.join(
            [str(self.state_dir / "bin"), str(Path(sys.executable).parent), env.get("PATH", ""), "/usr/sbin"]
        )
        for var in [v for v in env if v.startswith("SLURM_") and v != "SLURM_CONF"]:
            del env[var]  # do not leak an outer allocation into the test cluster
        return env

    def run(self, *cmd: str, timeout: float = 30) -> str:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=True, timeout=timeout).stdout

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job the cluster still knows (MinJobAge=3600), as ``scontrol -d show job`` fields."""
        ids = self.run("squeue", "--states=all", "--noheader", "--format=%i").split()
        return {job_id: parse_scontrol(self.run("scontrol", "-d", "show", "job", job_id)) for job_id in ids}


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job`` output as a dict (the detail lines' ``GRES=`` becomes ``NodeGRES``)."""
    fields: dict[str, str] = {}
    for key, value in re.findall(r"(\S+?)=(\S*)", text):
        fields.setdefault("NodeGRES" if key == "GRES" else key, value)
    return fields


def gpus_requested(job: dict[str, str]) -> int:
    """GPUs the job asked for (``--gpus=N`` shows as TresPerJob=gres:gpu:N, or gres/gpu:N)."""
    m = re.search(r"gres[:/]gpu(?::[^:,]+)?[:=](\d+)", job.get("TresPerJob", ""))
    return int(m.group(1)) if m else 0


def gpus_allocated(job: dict[str, str]) -> int:
    """GPUs SLURM allocated: JOB_GRES=gpu:N, node GRES=gpu:N(IDX:..), or gres/gpu=N in (Alloc)TRES."""
    for key in ("JOB_GRES", "NodeGRES"):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", job.get(key, ""))
        if m:
            return int(m.group(1))
    for key in ("AllocTRES", "TRES"):
        m = re.search(r"gres/gpu=(\d+)", job.get(key, ""))
        if m:
            return int(m.group(1))
    return 0


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A running single-node cluster for this module; stopped (all daemons) at the end."""
    state_dir = tmp_path_factory.mktemp("slurm-cluster")
    start = time.monotonic()
    try:
        # As many fake GPUs as CPUs: on one node, GPU jobs should queue for CPUs like the
        # rest, not behind a single fake device.
        env = dict(os.environ, SLURM_TEST_GPUS=str(os.cpu_count() or 1))
        proc = subprocess.run(
            ["bash", str(SLURM_SCRIPTS / "start_cluster.sh"), str(state_dir)],
            capture_output=True,
            text=True,
            timeout=CLUSTER_START_TIMEOUT_S,
            env=env,
        )
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = -1, f"start_cluster.sh timed out after {exc.timeout}s\n{exc.stdout or ''}{exc.stderr or ''}"
    elapsed = time.monotonic() - start
    try:
        if rc != 0:
            reason = f"SLURM test cluster did not start (start_cluster.sh rc={rc}):\n{out[-4000:]}"
            if os.environ.get("EMFM_REQUIRE_SLURM") == "1":
                pytest.fail(reason)
            print(f"SKIP: {reason}")
            pytest.skip(reason)
        conf = state_dir / "slurm.conf"
        print(f"SLURM test cluster up in {elapsed:.1f}s ({conf})")
        yield SlurmCluster(state_dir=state_dir, conf=conf, start_seconds=elapsed)
    finally:
        stop = subprocess.run(
            ["bash", str(SLURM_SCRIPTS / "stop_cluster.sh"), str(state_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        print(stop.stdout + stop.stderr)
        left = [p.name for p in (state_dir / "run").glob("*.pid")] if (state_dir / "run").is_dir() else []
        assert stop.returncode == 0 and not left, f"daemons left running: {left}\n{stop.stderr}"


def cluster_overrides() -> list[str]:
    """Command-line options that adapt the site profile to the one-node test cluster.

    Everything else (partitions, ``gpu: 1``, runtimes, retries, groups) comes from the
    profile unchanged. ``--cores``/``--resources mem_mb`` replace the profile's per-job size
    limits (with SLURM both count per submitted job): rules' threads and ``mem_mb`` are capped
    to what the node has, and group jobs are packed to fit it.
    """
    return [
        # no accounting database: job status from squeue, and no account to guess
        "--slurm-status-command",
        "squeue",
        "--slurm-no-account",
        # the site's partitions, for the plugin's partition selection (GPU rules clear theirs)
        "--slurm-partition-config",
        str(PARTITIONS),
        # poll every few seconds instead of 40 s (MinJobAge=3600 keeps squeue reliable)
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--seconds-between-status-checks",
        "2",
        "--slurm-keep-successful-logs",
        "--latency-wait",
        "5",
        "--cores",
        str(os.cpu_count() or 1),
        "--resources",
        f"mem_mb={TEST_MEM_CAP_MB}",
        # log every sbatch call (debug level)
        "--verbose",
    ]


@dataclass
class SnakemakeRun:
    returncode: int
    log: str
    seconds: float
    sbatch_calls: list[str]


def run_snakemake_on_slurm(
    cluster: SlurmCluster, snakefile: Path, workdir: Path, extra_args: list[str] | tuple[str, ...] = ()
) -> SnakemakeRun:
    """``snakemake -s SNAKEFILE -d WORKDIR --profile profiles/slurm`` + test overrides + EXTRA_ARGS."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(snakefile),
        "--directory",
        str(workdir),
        "--profile",
        str(SLURM_PROFILE),
        *cluster_overrides(),
        *extra_args,
    ]
    log_path = workdir.parent / f"{workdir.name}.snakemake.log"
    print("$ SLURM_CONF=" + str(cluster.conf) + " " + shlex.join(cmd))
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=cluster.env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=SNAKEMAKE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # SIGINT: Snakemake stops submitting (it waits for running jobs; the fixture's
            # stop_cluster.sh scancels whatever is left).
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"snakemake did not finish in {SNAKEMAKE_TIMEOUT_S}s; log tail:\n{_tail(log_path, 80)}")
    seconds = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    sbatch_calls = re.findall(r"sbatch call: (sbatch .*)", text)
    print(f"snakemake on SLURM: rc={returncode} in {seconds:.1f}s, {len(sbatch_calls)} sbatch calls")
    for call in sbatch_calls:
        print("  " + re.sub(r' --wrap=".*', ' --wrap="..."', call))
    return SnakemakeRun(returncode=returncode, log=text, seconds=seconds, sbatch_calls=sbatch_calls)


def jobs_of_run(cluster: SlurmCluster, workdir: Path) -> dict[str, dict[str, str]]:
    """The SLURM jobs a run submitted (its working directory), keyed by job id."""
    return {i: j for i, j in cluster.jobs().items() if j.get("WorkDir") == str(workdir)}


def assert_gpu_placement(jobs: dict[str, dict[str, str]], run: SnakemakeRun) -> None:
    """GPU rules ran in the gpu partition with exactly one GPU allocated; every other job
    (single rules and groups) in the cpu partition without a GPU; all completed. The
    matching sbatch calls carry --gpus=1 exactly for the GPU rules."""
    assert jobs, "no SLURM jobs found for this run"
    for job_id, job in jobs.items():
        name = rule_of(job)
        assert job["JobState"] == "COMPLETED", (job_id, name, job["JobState"])
        if name in GPU_RULES:
            assert job["Partition"] == "gpu", (job_id, name, job["Partition"])
            assert gpus_requested(job) == 1 and gpus_allocated(job) == 1, (job_id, name, job)
        else:
            assert job["Partition"] == "cpu", (job_id, name, job["Partition"])
            assert gpus_requested(job) == 0 and gpus_allocated(job) == 0, (job_id, name, job)
    assert len(run.sbatch_calls) == len(jobs), (len(run.sbatch_calls), len(jobs))
    for call in run.sbatch_calls:
        if rule_of({"Comment": sbatch_comment(call)}) in GPU_RULES:
            assert " -p gpu" in call and "--gpus=1" in call, call
        else:
            assert " -p cpu" in call and "--gpus" not in call, call


def sbatch_comment(call: str) -> str:
    """The --comment of an sbatch call as the plugin writes it (shell-quoted when needed)."""
    m = re.search(r"--comment ('[^']*'|\S+)", call)
    assert m, call
    return shlex.split(m.group(1))[0]


def rule_of(job: dict[str, str]) -> str:
    """The rule (or group_rules) name the plugin put into the job's comment: rule_<name>[_wildcards_...]."""
    m = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", job.get("Comment", ""))
    return m.group(1) if m else ""


# ---------------------------------------------------------------------------------------
# Toy workflow with rule names like the real one: checks from inside the jobs.

TOY_RECORD_SH = r"""#!/usr/bin/env bash
# record.sh RULE OUTPUT: write what SLURM gave this job into OUTPUT
set -euo pipefail
{
    echo "rule=$1"
    echo "SLURM_JOB_ID=${SLURM_JOB_ID:-}"
    echo "SLURM_JOB_PARTITION=${SLURM_JOB_PARTITION:-}"
    echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"
    echo "----- scontrol -d show job -----"
    scontrol -d show job "${SLURM_JOB_ID:?not inside a SLURM job}"
} >"$2"
"""

TOY_SNAKEFILE = r"""
RECORD = f"bash {workflow.basedir}/record.sh"

rule all:
    input:
        "results/aggregate.txt",

# a GPU rule of the real workflow: the profile sends it to the gpu partition with --gpus=1
rule cache_features:
    output:
        "results/features.txt",
    threads: 1
    shell:
        RECORD + " {rule} {output}"

# CPU rules; the profile groups evaluate jobs (up to 8 per SLURM job)
rule evaluate:
    input:
        "results/features.txt",
    output:
        "results/eval_{i}.txt",
    threads: 1
    shell:
        RECORD + " {rule} {output}"

rule aggregate:
    input:
        expand("results/eval_{i}.txt", i=range(3)),
    output:
        "results/aggregate.txt",
    shell:
        RECORD + " {rule} {output}"
"""


def read_record(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    env_part, _, scontrol_part = path.read_text().partition("----- scontrol -d show job -----")
    env = dict(line.split("=", 1) for line in env_part.splitlines() if "=" in line)
    return env, parse_scontrol(scontrol_part)


def toy_workflow(directory: Path) -> Path:
    """The toy Snakefile with record.sh and the real workflow profile beside it."""
    directory.mkdir(exist_ok=True)
    (directory / "Snakefile").write_text(TOY_SNAKEFILE)
    (directory / "record.sh").write_text(TOY_RECORD_SH)
    shutil.copytree(WORKFLOW_PROFILE, directory / "profiles" / "default")
    return directory / "Snakefile"


def test_profile_dry_run_parses(tmp_path: Path) -> None:
    """``snakemake --profile profiles/slurm -n`` accepts the profiles (no cluster needed)."""
    toy_workflow(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(tmp_path / "Snakefile"),
            "-d",
            str(tmp_path),
            "--profile",
            str(SLURM_PROFILE),
            "-n",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "slurm_partition=cpu" in out and "slurm_partition=," in out and "gpu=1" in out, out
    assert "Group job evaluation" in out or "group job evaluation" in out.lower(), out


# Rules that need a GPU (profiles/default gives them gpu: 1; tests/test_profiles.py checks it).
GPU_RULES = {"cache_features", "cache_features_aligned", "train_head", "train_lora", "train_fullft", "train_supervised"}


def test_toy_workflow_on_slurm(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    wf = tmp_path / "workflow"
    toy_workflow(wf)
    workdir = tmp_path / "work"
    workdir.mkdir()

    run = run_snakemake_on_slurm(slurm_cluster, wf / "Snakefile", workdir)
    assert run.returncode == 0, f"snakemake failed; log tail:\n{run.log[-6000:]}"

    # The jobs' own records: the GPU rule ran in the gpu partition with a GPU allocated ...
    env, job = read_record(workdir / "results" / "features.txt")
    assert env["SLURM_JOB_PARTITION"] == "gpu", env
    assert job["Partition"] == "gpu", job
    assert gpus_requested(job) == 1 and gpus_allocated(job) == 1, job
    assert env["CUDA_VISIBLE_DEVICES"] != "", env  # slurmd exported the (fake) device

    # ... the CPU rules in the cpu partition without one; the 3 evaluations shared one SLURM job.
    eval_jobs = set()
    for i in range(3):
        env, job = read_record(workdir / "results" / f"eval_{i}.txt")
        assert env["SLURM_JOB_PARTITION"] == "cpu" and job["Partition"] == "cpu", (env, job)
        assert gpus_requested(job) == 0 and gpus_allocated(job) == 0, job
        eval_jobs.add(env["SLURM_JOB_ID"])
    assert len(eval_jobs) == 1, f"evaluate jobs were not grouped: {eval_jobs}"
    env, job = read_record(workdir / "results" / "aggregate.txt")
    assert env["SLURM_JOB_PARTITION"] == "cpu" and gpus_allocated(job) == 0, (env, job)

    # The scheduler's view and the sbatch calls agree (jobs stay listed for MinJobAge=3600 s):
    # one GPU job, one group job for the 3 evaluations, one for the aggregation.
    # (group jobs are commented rule_<group>_<rules>)
    jobs = jobs_of_run(slurm_cluster, workdir)
    assert sorted(rule_of(j) for j in jobs.values()) == [
        "cache_features",
        "evaluation_evaluate",
        "summaries_aggregate",
    ], jobs
    assert_gpu_placement(jobs, run)
    print(f"cluster start-up {slurm_cluster.start_seconds:.1f}s, toy run {run.seconds:.1f}s")


# ---------------------------------------------------------------------------------------
# The real workflow's demo config (profiles/demo/workflow_config.yaml) with one seed instead
# of all of them: every rule and both backbones/regimes still run, in about half the jobs,
# so the test stays within its time budget on a 2-core machine.
DEMO_SNAKEFILE = REPO_ROOT / "Snakefile"
DEMO_CONFIG = REPO_ROOT / "profiles" / "demo" / "workflow_config.yaml"


def demo_args(tmp_path: Path) -> list[str]:
    import yaml

    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["seeds"] = config["seeds"][:1]
    path = tmp_path / "demo_one_seed.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ["--configfile", str(path)]


def test_demo_workflow_on_slurm(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    workdir.mkdir()
    run = run_snakemake_on_slurm(slurm_cluster, DEMO_SNAKEFILE, workdir, demo_args(tmp_path))
    assert run.returncode == 0, f"snakemake failed; log tail:\n{run.log[-6000:]}"
    jobs = jobs_of_run(slurm_cluster, workdir)
    names = sorted({rule_of(j) for j in jobs.values()})
    print(f"demo on SLURM: {len(jobs)} SLURM jobs ({', '.join(names)}) in {run.seconds:.0f}s")
    assert GPU_RULES & set(names), names
    assert any(n.startswith("evaluation_") for n in names), names
    assert_gpu_placement(jobs, run)
