"""Exercise 8's runner, one per rank under mpirun: runahead.prefill with the ChainKV of the file given.

    mpirun -n 3 python exercises/08_chain/run_chain.py FILE OUT

Every rank logs what its exchange does to OUT/rank{r}.log as it happens, one JSON object a line
(start, update, recv, got, isend, finish, finished, done, saved), so that a hung job still tells
who waited for what. Once its prefill is over it saves OUT/rank{r}.pt: its cache (each layer's first
cache.n[layer] tokens), its logits, and which of the final norm and LM head it ran. check.py compares
them with one process prefilling the same chunks.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))              # grade, which puts the project's root on the path
import grade  # noqa: E402

OPTIONS = ["--prompt-len", "23", "--threads", "1", "--partition", "9,8,6"]   # built-in Llama, 4 layers
RANKS = 3


class Log:
    """Append-only JSON lines, written through at once: what a rank did survives its being killed."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, ev, **fields):
        os.write(self.fd, (json.dumps(dict(ev=ev, **fields)) + "\n").encode())


def watch(job, Student, log):
    """The student's ChainKV, with its updates and the transport's calls logged."""
    import program

    now = {}                                           # the exchange and layer of the update under way

    class Watched(Student):
        def update(self, layer, k, v):
            now.update(kv=self, layer=layer)
            log("update", layer=layer)
            try:
                return super().update(layer, k, v)
            except program.Done:
                log("done", layer=layer)
                raise

    tr = job.transport
    recv, isend, finish = tr.recv, tr.isend, tr.finish

    def logged_recv(shape, dtype, source, tag):
        log("recv", source=source, tag=tag, shape=list(shape))
        out = recv(shape, dtype, source, tag)
        log("got", source=source, tag=tag)
        return out

    def logged_isend(t, dest, tag):
        try:                                           # how many positions the layer's cache held
            held = now["kv"].cache.n[now["layer"]]
        except (AttributeError, IndexError, KeyError, TypeError):
            held = None
        log("isend", dest=dest, tag=tag, shape=list(getattr(t, "shape", [])), held=held)
        return isend(t, dest, tag)

    def logged_finish():
        log("finish")
        finish()
        log("finished")

    tr.recv, tr.isend, tr.finish = logged_recv, logged_isend, logged_finish
    return Watched


def main(path, out):
    import cli
    args = cli.runahead().parse_args(OPTIONS)
    import torch
    import partition
    import program
    import runahead

    def prepare(job):
        job.c, job.c_source = partition.parse(args.partition, job.tokens.shape[1], job.size), "given"

    job = program.setup(args, prepare=prepare)
    log = Log(os.path.join(out, f"rank{job.rank}.log"))
    cfg, c = job.model.cfg, job.c
    log("start", c=c, layers=cfg.n_layers,            # what rank r should send: K, V of all S[r] positions
        send=[1, sum(c[:job.rank + 1]), 2, cfg.n_kv_heads, cfg.head_dim])
    head = []                                          # a non-last rank must never get this far
    for name in ("norm", "lm_head"):
        if hasattr(job.model, name):
            getattr(job.model, name).register_forward_hook(lambda *_, name=name: head.append(name))
    with program.abort_on_error(job.comm):
        runahead.ChainKV = watch(job, grade.load(path).ChainKV, log)
        logits, cache, _ = runahead.prefill(job, job.c)
        job.transport.finish()
        kv = [cache.held(layer).clone() for layer in range(len(cache.kv))]
        file = os.path.join(out, f"rank{job.rank}.pt")
        torch.save(dict(rank=job.rank, c=job.c, tokens=job.tokens.cpu(), n=list(cache.n), kv=kv,
                        logits=None if logits is None else logits.cpu(), head=sorted(set(head))), file + ".tmp")
        os.replace(file + ".tmp", file)                # whole or absent
        log("saved")


if __name__ == "__main__":
    main(*sys.argv[1:3])
