"""megatron_pma.parallel without torch: real forked groups (``Group.forked``, what ``--workers N``
uses) and the launched-group detection.

A forked worker ends its process in ``close()``, so every group runs in a child Python
(``subprocess.run`` with a timeout: pytest itself never forks) and each rank reports what it saw
through a JSON file in ``tmp_path``.
"""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from megatron_pma import parallel

REPO = Path(__file__).resolve().parents[2]

# Run as: python group_script.py SCENARIO WORKERS OUT_DIR
SCRIPT = r'''
import dataclasses, json, os, pickle, sys
from pathlib import Path

from megatron_pma.parallel import Group


@dataclasses.dataclass(frozen=True)
class Item:  # like the merge's storage/digest entries: many small dataclass objects
    path: str
    offset: int
    length: int


def shard(rank, n):
    d = {f"decoder.layers.{i}.mlp.weight/{rank}": Item(f"__{rank}_0.distcp", i * 4096, 4096 + rank)
         for i in range(n)}
    d["shared"] = Item(f"rank {rank}", rank, 0)  # a key on every rank: the last rank's wins
    return d


scenario, workers, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
report = {}
g = Group.forked(workers)
report.update(rank=g.rank, world=g.world, pid=os.getpid())

if scenario == "collectives":
    report["only_rank2"] = g.first_error("boom on rank 2" if g.rank == 2 else None)
    report["from_rank1_up"] = g.first_error(f"boom on rank {g.rank}" if g.rank >= 1 else None)
    report["no_error"] = g.first_error(None)
    report["broadcast"] = g.broadcast({"rank": g.rank, "pid": os.getpid()})
    report["pids"] = g.gather_dicts({g.rank: os.getpid()})
elif scenario == "gather":
    n = 70_000  # ~5 MB pickled per rank
    mine = shard(g.rank, n)
    report["payload_bytes"] = len(pickle.dumps(mine))
    merged = g.gather_dicts(mine)
    expected = {}
    for r in range(g.world):
        expected.update(shard(r, n))
    report["equal"] = merged == expected
    report["keys"] = len(merged)
    report["key_order"] = list(merged) == list(expected)
    report["shared"] = merged["shared"].path
elif scenario == "dies":
    if g.rank == 2:
        os._exit(3)  # dies before the collective: rank 0 must not wait for it forever
    try:
        g.first_error(None)
        report["error"] = None
    except RuntimeError as e:
        report["error"] = str(e)
    report["children"] = list(g._children)
report["torch_imported"] = "torch" in sys.modules
(out / f"rank{g.rank}.json").write_text(json.dumps(report))
g.close()
# Only rank 0 gets past close(): a forked worker ends in it.
(out / f"after_close{g.rank}").write_text("")
if g.rank == 0:
    try:
        os.waitpid(-1, os.WNOHANG)
        unreaped = True
    except ChildProcessError:
        unreaped = False
    (out / "closed.json").write_text(json.dumps({"unreaped_children": unreaped}))
'''


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    # the checkout under test, also for the script in tmp_path (whose folder heads sys.path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(PYTHONWARNINGS="ignore", **extra)
    return env


def _run_group(tmp_path, scenario, workers, timeout=60):
    script = tmp_path / "group_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, str(script), scenario, str(workers), str(out)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    reports = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank[0-9]*.json")}
    return r, out, reports


def _check_closed(r, out, workers):
    assert r.returncode == 0, r.stdout + r.stderr
    # every worker ended in close(); rank 0 went on and had reaped them all
    assert sorted(p.name for p in out.glob("after_close*")) == ["after_close0"]
    assert json.loads((out / "closed.json").read_text()) == {"unreaped_children": False}


@pytest.mark.parametrize("workers", [2, 3])
def test_first_error_and_broadcast_agree_on_every_rank(tmp_path, workers):
    r, out, reports = _run_group(tmp_path, "collectives", workers)
    _check_closed(r, out, workers)
    assert sorted(reports) == list(range(workers))
    pids = {rep["pid"] for rep in reports.values()}
    assert len(pids) == workers  # really separate processes
    for rank, rep in reports.items():
        assert rep["rank"] == rank and rep["world"] == workers
        # an error raised only on rank 2 reaches every rank; lowest-rank error wins
        assert rep["only_rank2"] == ("boom on rank 2" if workers > 2 else None)
        assert rep["from_rank1_up"] == "boom on rank 1"
        assert rep["no_error"] is None
        assert rep["broadcast"] == {"rank": 0, "pid": reports[0]["pid"]}
        assert rep["pids"] == {str(k): v["pid"] for k, v in sorted(reports.items())}
        assert rep["torch_imported"] is False


@pytest.mark.parametrize("workers", [2, 3])
def test_gather_dicts_with_a_large_payload(tmp_path, workers):
    r, out, reports = _run_group(tmp_path, "gather", workers)
    _check_closed(r, out, workers)
    assert sorted(reports) == list(range(workers))
    for rank, rep in reports.items():
        assert rep["payload_bytes"] > 4_000_000
        assert rep["equal"] is True and rep["key_order"] is True, rank
        assert rep["keys"] == workers * 70_000 + 1
        assert rep["shared"] == f"rank {workers - 1}"  # union in rank order: the last rank wins


def test_a_worker_dying_mid_collective_fails_rank_0_instead_of_hanging(tmp_path):
    r, out, reports = _run_group(tmp_path, "dies", 3, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = reports[0]
    assert rep["error"] and "rank 2" in rep["error"], rep
    assert 2 not in reports
    # rank 0's close() ended and reaped the surviving worker too
    assert json.loads((out / "closed.json").read_text()) == {"unreaped_children": False}
    assert not (out / "after_close1").exists()
    if 1 in reports:  # it may have been killed before it could report
        assert reports[1]["error"] and "rank 0" in reports[1]["error"]


def test_truncated_messages_raise_naming_the_peer():
    """A peer that dies part-way through a message (header or payload) is an error, not a hang
    or a short read; and the group refuses to go on after it."""
    for sent in (b"\0\0\0", parallel._HEADER.pack(1000) + b"x" * 10):
        mine, theirs = socket.socketpair()
        t = parallel._SocketTransport(0, 2, [mine], [4242])
        theirs.sendall(sent)
        theirs.close()
        errors = []

        def gather_twice():
            for _ in range(2):
                try:
                    t.allgather("x")
                except RuntimeError as e:
                    errors.append(str(e))

        th = threading.Thread(target=gather_twice, daemon=True)  # a hang fails the test, not the run
        th.start()
        th.join(timeout=30)
        assert not th.is_alive(), "allgather hung on a closed peer"
        assert len(errors) == 2
        assert "rank 1 (pid 4242) exited during a collective" in errors[0]
        assert "broken" in errors[1]
        mine.close()


def test_large_messages_are_read_in_full():
    """Both directions of an all-gather with messages far larger than a socket buffer."""
    a, b = socket.socketpair()
    root, worker = parallel._SocketTransport(0, 2, [a]), parallel._SocketTransport(1, 2, [b])
    big0, big1 = b"0" * 6_000_000, {i: str(i) * 20 for i in range(200_000)}
    got = {}
    t = threading.Thread(target=lambda: got.update(worker=worker.allgather(big1)))
    t.start()
    got["root"] = root.allgather(big0)
    t.join(timeout=60)
    assert not t.is_alive()
    assert got["root"] == got["worker"] == [big0, big1]
    a.close(), b.close()


def _python(code, timeout=120, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def test_module_group_from_env_and_forked_group_do_not_import_torch(tmp_path):
    r = _python(
        "import sys\n"
        "import megatron_pma.parallel as p\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "g = p.Group.from_env()\n"
        "assert (g.rank, g.world) == (0, 1) and g.first_error('e') == 'e' and g.broadcast(7) == 7\n"
        "g.close()\n"
        "assert 'torch' not in sys.modules, 'from_env'\n"
        "g = p.Group.forked(2)\n"
        "assert g.gather_dicts({g.rank: 1}) == {0: 1, 1: 1}\n"
        "assert 'torch' not in sys.modules, 'forked'\n"
        "g.close()\n"
        "print('done', g.rank)\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split("\n") == ["done 0", ""]  # and the worker never got past close()


@pytest.mark.parametrize("env", [{"RANK": "0", "WORLD_SIZE": "2"},
                                 {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1"}])
def test_forked_refuses_a_launched_process_without_importing_torch(env):
    r = _python(
        "import sys\n"
        "import megatron_pma.parallel as p\n"
        "try:\n"
        "    p.Group.forked(2)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
        "assert 'torch' not in sys.modules\n", **env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--workers cannot be combined with torchrun/srun" in r.stdout


def test_an_initialised_torch_distributed_group_is_detected(tmp_path):
    """Inside a training job (torch.distributed already initialised, no launcher variables) the
    merge joins that group and refuses to fork."""
    r = _python(
        "import torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)\n"
        "import megatron_pma.parallel as p\n"
        "g = p.Group.from_env()\n"
        "assert (g.rank, g.world) == (0, 1)\n"
        "assert isinstance(g._transport, p._GlooTransport), g._transport\n"
        "assert g._transport.allgather('x') == ['x']\n"
        "try:\n"
        "    p.Group.forked(2)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
        "g.close()\n"
        "assert dist.is_initialized()  # not ours to tear down\n"
        "dist.destroy_process_group()\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--workers cannot be combined" in r.stdout
