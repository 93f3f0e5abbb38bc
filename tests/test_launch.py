"""Unit tests for course_lib.launch: forked ranks and torchrun launches, their results, and which
rank is reported when one fails (from exit codes and result files, never from error text)."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from course_lib import launch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_run_workers_returns_rank_values_and_output(capsys) -> None:
    def fn(rank, world, base):
        t = torch.tensor([float(rank + base)])
        dist.all_reduce(t)
        print("hello from", rank)
        return rank, world, t.item()

    assert launch.run_workers(fn, 2, args=(10,)) == [(0, 2, 21.0), (1, 2, 21.0)]
    assert capsys.readouterr().out == ""
    assert launch.run_workers(fn, 1, args=(0,), show_output=True) == [(0, 1, 0.0)]
    assert capsys.readouterr().out == "[rank 0] hello from 0\n"


@pytest.mark.parametrize("broken", [0, 1])
def test_run_workers_reports_the_rank_that_raised_first(broken: int) -> None:
    """The other rank fails too (its peer left the all-reduce), or waits until stopped: either
    way the rank that raised first is the one reported."""
    def fn(rank, world):
        if rank == broken:
            raise ValueError(f"rank {broken} is broken")
        t = torch.ones(1)
        dist.all_reduce(t)
        return t

    with pytest.raises(launch.WorkerError, match=f"(?s)rank {broken} of 2 raised.*rank {broken} is broken"):
        launch.run_workers(fn, 2, timeout=30)


def test_run_workers_reports_a_rank_that_died_without_a_word() -> None:
    def fn(rank, world):
        if rank == 1:
            os._exit(3)  # no exception, no result file: only the exit code tells
        return rank

    with pytest.raises(launch.WorkerError, match=r"rank 1 of 2 ended without a result \(exit code 3\)"):
        launch.run_workers(fn, 2, timeout=30)


def test_run_workers_reports_a_value_that_does_not_pickle() -> None:
    with pytest.raises(launch.WorkerError, match="(?s)rank 0 of 1 raised.*"):
        launch.run_workers(lambda rank, world: (lambda: None), 1)


def test_torchrun_command_lines() -> None:
    one = launch.torchrun_command("s.py", 2, ["--x", 3])
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "s.py",
                       "--x", "3"]
    two = launch.torchrun_command("s.py", 1, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400")
    assert "--nnodes=2" in two and "--node-rank=1" in two and "--rdzv-endpoint=10.0.0.1:29400" in two
    with pytest.raises(ValueError):
        launch.torchrun_command("s.py", 1, nnodes=2)
    # --local-addr is a launcher option: it must come before the script, not among its arguments.
    three = launch.torchrun_command("s.py", 2, ["--x"], local_addr="127.0.0.1")
    assert three.index("--local-addr=127.0.0.1") < three.index("s.py") < three.index("--x")


def test_loopback_env_pins_gloo_to_lo_without_sys() -> None:
    # Found from the kernel's interface list, so it also works where /sys is not mounted (sandbox).
    env = launch.loopback_env()
    assert env["MASTER_ADDR"] == "127.0.0.1"
    if sys.platform.startswith("linux"):
        assert env.get("GLOO_SOCKET_IFNAME") == "lo"


SCRIPT = textwrap.dedent("""
    import os
    import torch
    import torch.distributed as dist
    from course_lib.launch import save_rank_result
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank()) + 1])
    dist.all_reduce(t)
    save_rank_result({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item(),
                      "local": int(os.environ["LOCAL_RANK"]), "group": int(os.environ["GROUP_RANK"])})
    dist.destroy_process_group()
""")


def test_torchrun_and_multinode_launch_real_ranks(tmp_path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    results = launch.torchrun(script, 2, timeout=120)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)
    nodes = launch.torchrun_multinode(script, nnodes=2, nproc_per_node=1, timeout=120)
    assert sorted(r["group"] for r in nodes) == [0, 1]
    assert all(r["local"] == 0 and r["world"] == 2 and r["sum"] == 3.0 for r in nodes)


def test_torchrun_names_the_ranks_without_a_result(tmp_path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import os
        from course_lib.launch import save_rank_result
        if os.environ["RANK"] == "1":
            raise SystemExit(5)
        save_rank_result("done")
    """))
    with pytest.raises(launch.WorkerError, match=r"torchrun exited with 1; ranks without a result: \[1\]"):
        launch.torchrun(script, 2, timeout=120)
