"""Exercise 6: a ring all-gather that hangs. Fix the order of its sends and receives.

    mpirun -n 4 python exercises/06_deadlock/starter.py --n 16     # blocks of 64 bytes: it works
    mpirun -n 4 python exercises/06_deadlock/starter.py            # blocks of 1 MiB: it hangs (Ctrl-C)
    python exercises/check.py 6
"""
import argparse
import os

import numpy as np
from mpi4py import MPI


def ring_allgather(comm, block):
    """Every rank's block, in rank order, on every rank: an array (p, *block.shape).

    TSP's all-gather as a ring: in step s = 0 .. p-2, each rank passes the block it received in step
    s-1 (its own in step 0) to its right neighbour, and receives from its left neighbour the block
    that neighbour passes on. After p-1 steps every block has gone round to every rank.
    """
    p, r = comm.size, comm.rank
    out = np.empty((p, *block.shape), block.dtype)
    out[r] = block
    right, left = (r + 1) % p, (r - 1) % p
    for step in range(p - 1):
        mine, theirs = (r - step) % p, (r - step - 1) % p   # the block passed on, the block received
        comm.Send(out[mine], dest=right, tag=step)
        comm.Recv(out[theirs], source=left, tag=step)
    return out


# Why does it hang with 1 MiB blocks but not with 64-byte ones? "A", "B", "C" or "D": see README.md.
WHY = None


def main():
    ap = argparse.ArgumentParser(description="All-gather one block per rank around a ring (run under mpirun).")
    ap.add_argument("--n", type=int, default=262144, help="int32 values per block (default: 1 MiB)")
    ap.add_argument("--out", help="directory where each rank saves what it gathered, as rank<r>.npy")
    a = ap.parse_args()
    comm = MPI.COMM_WORLD
    block = np.arange(a.n, dtype=np.int32) + comm.rank * a.n
    gathered = ring_allgather(comm, block)
    if a.out:
        np.save(os.path.join(a.out, f"rank{comm.rank}.npy"), gathered)
    print(f"rank {comm.rank}: gathered {len(gathered)} blocks", flush=True)


if __name__ == "__main__":
    main()
