"""Ranks over several nodes, on one machine. MPICH's MPIR_CVAR_NUM_CLIQUES=2 (ranks split into two
runs) and MPIR_CVAR_ODD_EVEN_CLIQUES=1 (even and odd ranks apart) make MPI_COMM_TYPE_SHARED return
one clique, as a node would. Both programs, zigzag too, on 3 and 4 ranks, on the host route and on
the staged one (KVR_ROUTE=staged: its protocol with plain copies; a shared slot serves only the
ranks of one node, the rest goes through MPI), give what one node gives: the same tokens, and
bitwise the same logits and cache (--save), never a hang."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import MPIRUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = {"two nodes": {"MPIR_CVAR_NUM_CLIQUES": "2"}, "odd and even": {"MPIR_CVAR_ODD_EVEN_CLIQUES": "1"}}
ROUTES = {"host": "host memory (CPU tensors straight to MPI)",
          "staged": "KVR_ROUTE=staged: CPU tensors staged through host memory, shared by the node's ranks"}


def run(args, n, env, save):
    r = subprocess.run([MPIRUN, "-n", str(n), sys.executable, *args, "--prompt-len", "61", "--threads", "1",
                        "--max-new-tokens", "4", "--save", str(save)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout, torch.load(save, weights_only=True)


def nodes(env, n):
    """How many nodes MPI makes of n ranks under env (MPI_COMM_TYPE_SHARED's groups)."""
    code = ("import transport; c, _ = transport.init(); firsts = c.allgather(transport.local_comm(c).rank == 0); "
            "print(sum(firsts) if c.rank == 0 else '')")
    r = subprocess.run([MPIRUN, "-n", str(n), sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, **env})
    return int(r.stdout.strip() or 0)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("args", [["runahead.py", "--partition", "even"], ["tsp.py"], ["tsp.py", "--zigzag"]],
                         ids=["runahead", "tsp", "zigzag"])
def test_ranks_over_nodes_give_one_nodes_result_on_every_route(tmp_path, args, n):
    if nodes(SPLITS["odd and even"], n) != 2:
        pytest.skip("this MPI does not split one machine into cliques (MPICH's MPIR_CVAR_*_CLIQUES)")
    out, want = run(args, n, {}, tmp_path / "one.pt")
    assert ROUTES["host"] in out
    for split, env in SPLITS.items():
        for route, line in ROUTES.items():
            got_out, got = run(args, n, {**env, **({"KVR_ROUTE": route} if route != "host" else {})},
                               tmp_path / f"{route}.pt")
            where = f"{split}, {route}"
            assert line in got_out, (where, got_out)
            assert got["generated_ids"] == want["generated_ids"], where
            assert torch.equal(got["logits"], want["logits"]), where
            assert all(torch.equal(a, b) for kv, kw in zip(got["past_key_values"], want["past_key_values"])
                       for a, b in zip(kv, kw)), where
