"""The SLURM launcher: the rendered sbatch script is valid bash (and shellcheck-clean), carries the
rendezvous, NCCL and requeue pieces, and behaves: run under bash with fake `srun`/`scontrol`/`torchrun`
on PATH, it launches the trainer with the right arguments, forwards SIGUSR1, requeues when the
trainer asks, and stops the SGLang servers it started."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tempo_mega.launch.slurm import (
    REQUEUE_EXIT_CODE,
    REQUEUE_MARKER_NAME,
    SlurmJob,
    main,
    render_sbatch,
    request_requeue,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "scripts" / "slurm" / "tempo.sbatch"
BASH = shutil.which("bash")
SHELLCHECK = shutil.which("shellcheck")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

OVERRIDES = ("experiment=qwen3_8b_tempo", "model.path=/shared/models/actor")


def job(**kw) -> SlurmJob:
    kw.setdefault("nodes", 1)
    kw.setdefault("output_dir", "/shared/runs/tempo")
    kw.setdefault("overrides", OVERRIDES)
    return SlurmJob(**kw)


VARIANTS = {
    "1node-container": job(nodes=1, container_image="/shared/containers/tempo.sqsh", partition="gpu", account="proj"),
    "2node-venv": job(nodes=2, venv="/shared/venv", exclusive=True),
    "4node-plain": job(nodes=4, gpus_per_node=4, time_limit="1-00:00:00", sbatch_args=("--mem=0",)),
    "4node-separate": job(nodes=4, sglang_placement="separate", sglang_nodes=1, sglang_tp=4,
                          container_image="nvcr.io#nvidia/pytorch:26.09-py3", sglang_args=("--mem-fraction-static=0.8",)),
}


def write(tmp_path: Path, text: str, name: str = "tempo.sbatch") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", list(VARIANTS))
def test_script_has_the_pieces(name):
    j = VARIANTS[name]
    text = render_sbatch(j)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert f"#SBATCH --nodes={j.nodes}" in lines
    assert f"#SBATCH --gpus-per-node={j.gpus_per_node}" in lines
    for directive in ("--requeue", "--open-mode=append", "--signal=B:USR1@180",
                      f"--output={j.output_dir}/logs/%x-%j.out", f"--time={j.time_limit}"):
        assert f"#SBATCH {directive}" in lines, directive
    # every #SBATCH line comes before the first command, or sbatch ignores it
    first_cmd = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    # rendezvous from SLURM's variables
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert "MASTER_PORT=$(( 10000 + SLURM_JOB_ID % 20000 ))" in lines
    assert "NODE_RANK=$SLURM_NODEID" in text and "WORLD_SIZE=$(( TRAIN_NODES * GPUS_PER_NODE ))" in lines
    for arg in ('torchrun --nnodes "$TRAIN_NODES" --nproc-per-node "$GPUS_PER_NODE"',
                '--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"',
                '-m tempo_mega.cli train "${TRAIN_ARGS[@]}"', "--signals-to-handle", "--shutdown-timeout"):
        assert arg in text, arg
    # NCCL settings in one block, each once
    for var in ("NCCL_DEBUG=", "NCCL_SOCKET_IFNAME=", "NCCL_IB_HCA=", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1"):
        assert sum(var in line and not line.lstrip().startswith("#") for line in lines) == 1, var
    nccl = [i for i, line in enumerate(lines) if "NCCL" in line and not line.startswith("#")]
    assert max(nccl) - min(nccl) < 12
    # requeue: traps, marker, scontrol, resume on every run
    assert "trap 'forward_signal USR1' USR1" in lines and "trap 'forward_signal TERM' TERM" in lines
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}" in lines
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "  trainer.resume=auto" in lines and '  "trainer.output_dir=$OUT"' in lines
    assert ("--container-image" in text) == bool(j.container_image)
    assert ("sglang.launch_server" in text) == (j.sglang_placement == "separate")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_script_passes_bash_n_and_shellcheck(name, tmp_path):
    path = write(tmp_path, render_sbatch(VARIANTS[name]))
    out = subprocess.run([BASH, "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if SHELLCHECK is None:
        pytest.skip("shellcheck is not on PATH (apt-get install shellcheck): bash -n passed, lint not run")
    out = subprocess.run([SHELLCHECK, "--shell=bash", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_committed_example_is_current(capsys):
    text = EXAMPLE.read_text()
    command = next(line for line in text.splitlines() if line.startswith("#   tempo-mega launch slurm "))
    argv = shlex.split(command[len("#   tempo-mega launch slurm "):])
    assert "--nodes" in argv and argv[argv.index("--nodes") + 1] == "1"
    assert main([*argv, "--print"]) == 0
    assert capsys.readouterr().out == text, (
        "scripts/slurm/tempo.sbatch is stale: regenerate it with the command in its header plus --print")


@pytest.mark.parametrize("kw, msg", [
    ({"nodes": 0}, "--nodes"),
    ({"time_limit": "24h"}, "--time"),
    ({"container_image": "img", "venv": "/v"}, "not both"),
    ({"container_mounts": ("/a:/a",)}, "need --container-image"),
    ({"overrides": ("trainer.resume=false",)}, "trainer.resume=auto"),
    ({"overrides": ("trainer.output_dir=/x",)}, "--output-dir"),
    ({"overrides": ("experiment",)}, "KEY=VALUE"),
    ({"signal_lead_s": 70000}, "65535"),
    ({"output_dir": "/runs/my run"}, "--output-dir"),
    ({"sglang_placement": "remote"}, "--sglang-placement"),
    ({"sglang_nodes": 1}, "separate"),
    ({"nodes": 2, "sglang_placement": "separate", "sglang_nodes": 2}, "at least one node must train"),
    ({"nodes": 2, "sglang_placement": "separate", "sglang_nodes": 1, "sglang_tp": 3}, "must divide"),
    ({"nodes": 2, "sglang_placement": "separate", "sglang_nodes": 1, "overrides": ()}, "model"),
])
def test_bad_jobs_say_what_is_wrong(kw, msg):
    with pytest.raises(ValueError, match=msg):
        render_sbatch(job(**kw))


def test_main_writes_the_script_and_logs_dir(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--nodes", "2", "--output-dir", str(out), "--venv", "/shared/venv", *OVERRIDES]) == 0
    script = out / "tempo.sbatch"
    assert script.is_file() and (out / "logs").is_dir() and os.access(script, os.X_OK)
    assert "#SBATCH --nodes=2" in script.read_text()
    assert f"sbatch {script}" in capsys.readouterr().out


def test_main_rejects_bad_options_with_exit_2(tmp_path, capsys):
    assert main(["--nodes", "2", "--output-dir", str(tmp_path), "trainer.resume=false"]) == 2
    assert "trainer.resume=auto" in capsys.readouterr().err
    assert not (tmp_path / "tempo.sbatch").exists()


@pytest.mark.parametrize("nodes, overrides, msg", [
    ("1", ("experiment=qwen3_8b_tempoo", "model.path=/m"), r"no experiment/qwen3_8b_tempoo\.yaml.*qwen3_8b_tempo"),
    ("1", (*OVERRIDES, "algo.lerning_rate=1"), r"'algo\.lerning_rate': no such key; did you mean algo\.actor\.lr"),
    ("1", ("experiment=qwen3_32b_tempo", "model.path=/m"), r"layout does not fit: world size 8 .* multiple of 16"),
    ("1", ("experiment=qwen3_8b_tempo",), r"model\.path"),
    ("2", ("experiment=debug_cpu",), r"backend=torch trains in one process"),
])
def test_main_validates_the_run_config_before_rendering(tmp_path, capsys, nodes, overrides, msg):
    """The checks `tempo-mega train` runs, before the job waits in the queue; --force renders anyway."""
    argv = ["--nodes", nodes, "--output-dir", str(tmp_path / "run"), *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(msg, err) and "--force" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "tempo.sbatch").exists()
    assert main([*argv, "--force"]) == 0
    assert "rendering anyway" in capsys.readouterr().err and (tmp_path / "run" / "tempo.sbatch").is_file()


def test_main_renders_a_layout_that_fits(tmp_path):
    assert main(["--nodes", "2", "--output-dir", str(tmp_path), "--print", "experiment=qwen3_32b_tempo",
                 "model.path=/m"]) == 0


def test_one_step_off_needs_separate_placement_and_renders_with_it(tmp_path, capsys):
    """rollout.async_steps=1 is checked as the run will see it: with separate placement the script hands
    the run its servers' URLs; colocated, it is refused before the job waits in the queue."""
    over = ["experiment=qwen3_8b_tempo", "model.path=/m", "rollout.async_steps=1", "algo.tis_cap=2.0"]
    assert main(["--nodes", "1", "--output-dir", str(tmp_path / "a"), *over]) == 2
    assert "separate placement" in capsys.readouterr().err
    assert main(["--nodes", "2", "--sglang-placement", "separate", "--sglang-nodes", "1",
                 "--output-dir", str(tmp_path / "b"), *over]) == 0
    assert (tmp_path / "b" / "tempo.sbatch").is_file()


def test_submit_without_sbatch_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["--nodes", "1", "--output-dir", str(tmp_path / "run"), "--submit", *OVERRIDES]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
    assert (tmp_path / "run" / "tempo.sbatch").is_file()


def test_submit_runs_sbatch_on_the_written_script(tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!{BASH}\necho "Submitted batch job 42 ($1)"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["--nodes", "1", "--output-dir", str(tmp_path / "run"), "--submit", *OVERRIDES]) == 0
    assert f"Submitted batch job 42 ({tmp_path / 'run' / 'tempo.sbatch'})" in capsys.readouterr().out


# ---- behaviour: run the script under bash with fake SLURM commands ----------------------------------

FAKE_SRUN = """#!{bash}
# srun stand-in: a server step sleeps; any other step runs its command here, without srun's options
printf '%s\\n' "$@" > "$FAKE_LOG/srun-$$.args"
for a in "$@"; do
  if [[ "$a" == sglang.launch_server ]]; then exec sleep 300; fi
done
while [[ "$1" == --* ]]; do shift; done
export SLURM_NODEID=0
exec "$@"
"""
FAKE_SCONTROL = """#!{bash}
case "$1" in
  show) tr ',' '\\n' <<< "$3" ;;
  requeue) echo "requeue $2" >> "$FAKE_LOG/scontrol.log" ;;
  *) exit 1 ;;
esac
"""
FAKE_TORCHRUN = """#!{bash}
printf '%s\\n' "$@" > "$FAKE_LOG/torchrun.args"
echo "$NODE_RANK $MASTER_ADDR $MASTER_PORT $WORLD_SIZE $NCCL_DEBUG $TORCH_NCCL_ASYNC_ERROR_HANDLING" > "$FAKE_LOG/torchrun.env"
exec {bash} -c "$FAKE_TRAINER"
"""
# A trainer that checkpoints on SIGUSR1 or SIGTERM: writes the marker and exits 1, as torchrun reports it.
PREEMPTIBLE = """
trap 'echo USR1 > "$FAKE_LOG/trainer.signal"; touch "$TEMPO_REQUEUE_MARKER"; exit 1' USR1
trap 'echo TERM > "$FAKE_LOG/trainer.signal"; touch "$TEMPO_REQUEUE_MARKER"; exit 1' TERM
touch "$FAKE_LOG/trainer.started"
for _ in $(seq 400); do sleep 0.05; done
exit 9
"""


def run_script(tmp_path: Path, j: SlurmJob, trainer: str, nodes: str, *, send: signal.Signals | None = None,
               env: dict | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "log"
    bin_dir = tmp_path / "bin"
    for d in (log, bin_dir, Path(j.output_dir) / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("torchrun", FAKE_TORCHRUN)):
        (bin_dir / name).write_text(body.format(bash=BASH))
        (bin_dir / name).chmod(0o755)
    script = write(tmp_path, render_sbatch(j))
    full_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_LOG": str(log),
        "FAKE_TRAINER": trainer, "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": nodes,
        "SLURM_NNODES": str(len(nodes.split(","))), "SGLANG_READY_TIMEOUT_S": "0", **(env or {}),
    }
    proc = subprocess.Popen([BASH, str(script)], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if send is not None:
        deadline = time.monotonic() + 15
        while not (log / "trainer.started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the trainer never started"
            time.sleep(0.02)
        proc.send_signal(send)
    stdout, _ = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout), log


def requeues(log: Path) -> list[str]:
    path = log / "scontrol.log"
    return path.read_text().splitlines() if path.exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.mark.slow
def test_run_launches_torchrun_with_resume_and_rendezvous(tmp_path):
    out = tmp_path / "out"
    j = job(output_dir=str(out), overrides=(*OVERRIDES, "x.note=a b"))
    res, log = run_script(tmp_path, j, "exit 0", "nodeA")
    assert res.returncode == 0, res.stdout
    args = (log / "torchrun.args").read_text().splitlines()
    assert args[:4] == ["--nnodes", "1", "--nproc-per-node", "8"]
    assert args[args.index("--rdzv-endpoint") + 1] == "nodeA:11234"  # 10000 + 1234 % 20000
    assert args[args.index("--signals-to-handle") + 1].split(",")[-1] == "SIGUSR1"
    assert args[args.index("-m") + 1:] == ["tempo_mega.cli", "train", *OVERRIDES, "x.note=a b",
                                           f"trainer.output_dir={out}", "trainer.resume=auto"]
    assert (log / "torchrun.env").read_text().split() == ["0", "nodeA", "11234", "8", "WARN", "1"]
    assert requeues(log) == []


@pytest.mark.slow
def test_a_failed_run_is_not_requeued(tmp_path):
    res, log = run_script(tmp_path, job(output_dir=str(tmp_path / "out")), "exit 3", "nodeA")
    assert res.returncode == 3 and requeues(log) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_the_signal_reaches_the_trainer_and_the_job_is_requeued(tmp_path, sig):
    out = tmp_path / "out"
    res, log = run_script(tmp_path, job(output_dir=str(out)), PREEMPTIBLE, "nodeA", send=sig)
    assert (log / "trainer.signal").read_text().strip() == sig.name[3:], res.stdout
    assert f"caught {sig.name}" in res.stdout
    assert requeues(log) == ["requeue 1234"], res.stdout
    assert res.returncode == 0 and not (out / REQUEUE_MARKER_NAME).exists()


@pytest.mark.slow
def test_a_trainer_using_request_requeue_is_requeued(tmp_path):
    # the helper the trainer calls, run from inside the job as a rank would
    trainer = f"{shlex.quote(sys.executable)} -c 'import sys; from tempo_mega.launch.slurm import request_requeue; " \
              "sys.exit(request_requeue())'"
    res, log = run_script(tmp_path, job(output_dir=str(tmp_path / "out")), trainer, "nodeA")
    assert requeues(log) == ["requeue 1234"] and res.returncode == 0, res.stdout


def test_request_requeue_outside_a_job_writes_nothing(tmp_path):
    assert request_requeue(env={}) == REQUEUE_EXIT_CODE
    marker = tmp_path / "m"
    assert request_requeue("time limit", env={"TEMPO_REQUEUE_MARKER": str(marker)}) == REQUEUE_EXIT_CODE
    assert marker.read_text() == "time limit\n"


@pytest.mark.slow
def test_exit_code_85_alone_also_requeues(tmp_path):
    res, log = run_script(tmp_path, job(output_dir=str(tmp_path / "out")), f"exit {REQUEUE_EXIT_CODE}", "nodeA")
    assert requeues(log) == ["requeue 1234"] and res.returncode == 0, res.stdout


@pytest.mark.slow
def test_requeues_stop_at_the_limit(tmp_path):
    j = job(output_dir=str(tmp_path / "out"), max_requeues=3)
    res, log = run_script(tmp_path, j, f"exit {REQUEUE_EXIT_CODE}", "nodeA", env={"SLURM_RESTART_COUNT": "3"})
    assert requeues(log) == [] and res.returncode == REQUEUE_EXIT_CODE
    assert "MAX_REQUEUES=3" in res.stdout


@pytest.mark.slow
@needs_proc
def test_separate_placement_starts_servers_passes_urls_and_stops_them(tmp_path):
    out = tmp_path / "out"
    j = job(nodes=3, output_dir=str(out), sglang_placement="separate", sglang_nodes=2, sglang_tp=4,
            container_image="/shared/containers/tempo.sqsh")
    trainer = 'echo "$TEMPO_SGLANG_API_KEY" > "$FAKE_LOG/trainer.key"\n' + PREEMPTIBLE
    res, log = run_script(tmp_path, j, trainer, "nodeA,nodeB,nodeC", send=signal.SIGUSR1)
    assert requeues(log) == ["requeue 1234"], res.stdout
    args = (log / "torchrun.args").read_text().splitlines()
    assert args[:2] == ["--nnodes", "1"]
    assert args[-1] == "rollout.sglang.urls=[http://nodeB:30000,http://nodeC:30000]"
    pids = [int(p) for p in (out / "logs" / "sglang-1234.pids").read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids), "the SGLang server steps outlived the job script"
    server_args = [p.read_text().splitlines() for p in log.glob("srun-*.args")]
    server_args = [a for a in server_args if "sglang.launch_server" in a]
    assert len(server_args) == 2
    # bound to its node's address (not 0.0.0.0), with the job's key, which the trainer gets from the
    # environment and which neither the script nor its output shows
    key = (log / "trainer.key").read_text().strip()
    assert len(key) == 64 and int(key, 16) >= 0
    assert sorted(a[a.index("--host") + 1] for a in server_args) == ["nodeB", "nodeC"]
    assert all(a[a.index("--api-key") + 1] == key for a in server_args)
    assert key not in res.stdout and key not in render_sbatch(j) and "0.0.0.0" not in render_sbatch(j)
    for a in server_args:
        assert a[a.index("--tp-size") + 1] == "4" and a[a.index("--dp-size") + 1] == "2"
        assert a[a.index("--model-path") + 1] == "/shared/models/actor"
        assert "--container-image=/shared/containers/tempo.sqsh" in a


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_colocated_jobs_sample_on_every_node(nodes):
    """Colocated SGLang on 1..N nodes: one torchrun per node (each node's first rank then launches that
    node's servers, rollout.sglang.launch_on=every_node), no server step of the script's own."""
    text = render_sbatch(job(nodes=nodes))
    assert f"#SBATCH --nodes={nodes}" in text and "SGLANG_NODES=0" in text
    assert "each training node's first rank" in text and "sglang.launch_server" not in text
    assert '--nodes="$TRAIN_NODES" --ntasks="$TRAIN_NODES" --ntasks-per-node=1' in text


def test_a_preset_names_its_placement_for_the_launcher(capsys):
    """rollout.placement / rollout.rollout_nodes (the 235B preset: separate, 4 nodes) are what launch slurm
    uses without --sglang-placement; the flags given say the same to the run."""
    assert main(["--nodes", "36", "--output-dir", "/shared/runs/x", "--print", "experiment=qwen3_235b_a22b_tempo",
                 "model.path=/m"]) == 0
    text = capsys.readouterr().out
    assert "SGLANG_NODES=4  # nodes at the end of the allocation that serve SGLang (separate placement)" in text
    assert "rollout.placement=separate" not in text  # the preset says it already
    assert main(["--nodes", "2", "--sglang-placement", "separate", "--sglang-nodes", "1", "--output-dir",
                 "/shared/runs/y", "--print", *OVERRIDES]) == 0
    text = capsys.readouterr().out
    assert all(f"  {o}" in text for o in ("rollout.placement=separate", "rollout.rollout_nodes=1",
                                          "rollout.sglang.weight_sync=distributed"))
