"""Exercise 8: the chain under `mpirun -n 3`. Every rank's cache and the last rank's logits are
compared bitwise with one process prefilling the same chunks; what each rank's exchange did (its
log: receives, sends, finish, Done) is checked against the four rules; a hung job is killed, and the
logs say who waited for what."""
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import torch

from grade import Fail, load

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "run_chain.py")
TIMEOUT, STALL = 60, 10        # s: at most; and with every rank started but none logging anything new
_here = os.path.join(os.path.dirname(sys.executable), "mpirun")
MPIRUN = _here if os.path.exists(_here) else "mpirun"
RULE = "every rank but the last must isend each layer's whole cache to rank + 1 with tag=layer"


def stop(job, marker):
    """Exercise 6's: end a hung mpirun job and every rank of it, so that none is left on a core."""
    ex6 = load(os.path.join(os.path.dirname(HERE), "06_deadlock", "check.py"), "check_06_deadlock")
    return ex6.stop(job, marker)


# ------------------------------------------------------------------ is update written at all?

class _Nothing:
    """A trace or transport for one rank alone: every call does nothing; recv gets zeros."""

    def recv(self, shape, dtype, source, tag):
        return torch.zeros(shape, dtype=dtype)

    def __getattr__(self, name):
        return lambda *a, **k: None


def written(ChainKV):
    """Call update once, as rank 0 of two, here: a NotImplementedError goes up to check.py, which
    names the function still to write (under mpirun it would only abort the job). Any other error
    is the real run's to show."""
    from kvcache import KVCache
    t = _Nothing()
    t.rank, t.size = 0, 2
    kv = ChainKV(KVCache(types.SimpleNamespace(n_kv_heads=1, head_dim=2, n_layers=2), 1, 3), t, 0)
    try:
        kv.update(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    except NotImplementedError:
        raise
    except Exception:
        pass


# ------------------------------------------------------------------ the run

def run(path, out, ranks):
    """mpirun the runner on `path`: (exit status, output), or None if it hung (it is killed then)."""
    cmd = [MPIRUN, "-n", str(ranks), sys.executable, RUNNER, os.path.abspath(path), out]
    with open(os.path.join(out, "output.txt"), "w+") as output:   # a file: a chatty job cannot block
        job = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        t0 = last_change = time.monotonic()
        seen = None
        while True:
            try:
                code = job.wait(timeout=0.2)
                output.seek(0)
                return code, output.read()
            except subprocess.TimeoutExpired:
                pass
            state = [os.path.getsize(f) if os.path.exists(f) else -1
                     for f in (os.path.join(out, f"rank{r}.log") for r in range(ranks))]
            now = time.monotonic()
            if state != seen:
                seen, last_change = state, now
            if now - t0 > TIMEOUT or (min(state) > 0 and now - last_change > STALL):
                stop(job, out)
                return None


def events(out, rank):
    try:
        with open(os.path.join(out, f"rank{rank}.log")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def by_layer(ev):
    """{layer: (what the exchange did in that layer's update and until the next, complete?)}."""
    groups, order = {}, []
    for e in ev:
        if e["ev"] == "update":
            order.append(e["layer"])
            groups[e["layer"]] = []
        elif order:
            groups[order[-1]].append(e)
    saved = any(e["ev"] == "saved" for e in ev)
    return {L: (g, saved or L != order[-1] or any(e["ev"] == "done" for e in g)) for L, g in groups.items()}


# ------------------------------------------------------------------ the rules, from a rank's log

def protocol(r, ev, ranks):
    """The first rule rank r's exchange broke, as its log shows it, or None."""
    if not ev or ev[0]["ev"] != "start":
        return None
    c, layers, want = ev[0]["c"], ev[0]["layers"], ev[0]["send"]
    S_prev, S, last = sum(c[:r]), sum(c[:r + 1]), r == ranks - 1
    for L, (g, complete) in sorted(by_layer(ev).items()):
        recvs = [e for e in g if e["ev"] == "recv"]
        sends = [e for e in g if e["ev"] == "isend"]
        if r == 0 and recvs:
            e = recvs[0]
            return (f"rank 0 called recv(source={e['source']}, tag={e['tag']}) in layer {L}; rank 0 has no prefix "
                    "(prefix == 0) and must not receive: it never waits for anybody")
        if r and recvs and (recvs[0]["source"], recvs[0]["tag"]) != (r - 1, L):
            e = recvs[0]
            return (f"rank {r} called recv(source={e['source']}, tag={e['tag']}) in layer {L}; its prefix comes "
                    f"from rank {r - 1} with tag={L} (the layer)")
        if r and len(recvs) > 1:
            return f"rank {r} received {len(recvs)} times in layer {L}; the prefix comes in one message a layer"
        if r and not recvs and (complete or sends):
            return (f"rank {r} did not receive its prefix in layer {L}: receive the prefix first, recv the K/V of "
                    f"[0, {S_prev}) from rank {r - 1} (tag=layer) and append it to the cache before its own k, v")
        if last and sends:
            e = sends[0]
            return (f"the last rank, {r}, sent layer {L}'s K/V to rank {e['dest']}; it has no right neighbour "
                    "and must not send")
        for e in sends:
            if e["dest"] != r + 1:
                return (f"rank {r} sent layer {L}'s K/V to rank {e['dest']} (tag {e['tag']}); it goes to the right "
                        f"neighbour, rank {r + 1}: {RULE}")
            if e["tag"] != L:
                return f"rank {r} sent layer {L}'s K/V with tag {e['tag']}; the tag is the layer, tag={L}: {RULE}"
            if r and e["shape"] == want[:1] + [c[r]] + want[2:]:
                return (f"rank {r} sent layer {L}'s K/V of its own {c[r]} positions only, shape {e['shape']}; the "
                        f"right rank needs all {S} positions [0, {S}), prefix included: send the layer's whole "
                        f"cache, shape {want}")
            if e["shape"] != want:
                return (f"rank {r} sent layer {L}'s K/V as shape {e['shape']}; rank {r + 1} needs K and V of all "
                        f"{S} positions [0, {S}), shape {want}: send the layer's whole cache")
            if e["held"] is not None and e["held"] < S:
                return (f"rank {r} sent layer {L}'s cache when it held {e['held']} of its {S} positions: send it "
                        "after appending the prefix and the rank's own k, v")
        if len(sends) > 1:
            return f"rank {r} sent {len(sends)} messages in layer {L}; one a layer: {RULE}"
        if not last and not sends and complete:
            return f"rank {r} sent nothing in layer {L}: {RULE}"
        if any(e["ev"] == "done" for e in g) and L != layers - 1:
            return (f"rank {r} raised Done in layer {L} of {layers}; it stops only after the last layer's "
                    f"send (layer {layers - 1})")
    return None


def stopped(r, d, ev, ranks):
    """The last rule: a rank that is not last stops (finish, Done) after its last layer's send."""
    if r == ranks - 1:
        if any(e["ev"] == "done" for e in ev):
            raise Fail(f"the last rank, {r}, raised Done; it goes on to the final norm and LM head, for the "
                       "first token is its to emit")
        return
    if d["head"] or d["logits"] is not None:
        ran = [what for name, what in (("norm", "final norm"), ("lm_head", "LM head")) if name in d["head"]]
        raise Fail(f"rank {r} is not the last, yet after its last layer's send it went on to compute the "
                   f"{' and '.join(ran) or 'logits'} for nobody (no Done): after the last layer's isend, a rank "
                   "that is not last calls self.t.finish() and raises Done")
    i_done = next((i for i, e in enumerate(ev) if e["ev"] == "done"), len(ev))
    i_sent = max((i for i, e in enumerate(ev[:i_done]) if e["ev"] == "isend"), default=0)
    if not any(e["ev"] == "finished" for e in ev[i_sent:i_done]):
        raise Fail(f"rank {r} raised Done without self.t.finish() after its last send: finish the sends before "
                   "stopping, so that the rank's part has gone when it ends")


def hung(out, ranks, waited):
    """What each rank that never saved was waiting for when the job was killed, and the first rule
    broken."""
    ev = {r: events(out, r) for r in range(ranks)}
    stuck = [r for r in range(ranks) if not any(e["ev"] == "saved" for e in ev[r])]
    parts = []
    for r in stuck:
        layer = next((e["layer"] for e in reversed(ev[r]) if e["ev"] == "update"), None)
        last = ev[r][-1] if ev[r] else {"ev": None}
        if layer is None:
            parts.append(f"rank {r} never reached its first layer")
        elif last["ev"] == "recv":
            src, tag = last["source"], last["tag"]
            sent = [e for e in ev.get(src, []) if e["ev"] == "isend"]
            to_me = [e["tag"] for e in sent if e["dest"] == r]
            if src not in ev:
                said = f"there is no rank {src}"
            elif not sent:
                said = f"rank {src} sent nothing at all"
            elif not to_me:
                dests = ", ".join(map(str, sorted({e["dest"] for e in sent})))
                said = f"rank {src} sent {len(sent)} messages, to rank {dests}, none to rank {r}"
            else:
                said = f"rank {src} sent it the tags {to_me}"
            parts.append(f"rank {r} waited in layer {layer} for recv(source={src}, tag={tag}), and {said}")
        elif last["ev"] == "finish":
            parts.append(f"rank {r} waited in finish() after layer {layer}, for its sends to complete")
        else:
            parts.append(f"rank {r} stopped after '{last['ev']}' in layer {layer}")
    rule = next((p for p in (protocol(r, ev[r], ranks) for r in range(ranks)) if p), None)
    who = f"rank {stuck[0]} had" if len(stuck) == 1 else f"ranks {', '.join(map(str, stuck))} had"
    return (f"the job hung: {who} saved nothing after {waited:.0f} s, so it was killed. "
            + "; ".join(parts) + ". " + (rule[0].upper() + rule[1:] if rule else f"The rule: {RULE}"))


# ------------------------------------------------------------------ against one process

def reference(tokens, c):
    """One process prefilling the chunks c in order through one KV cache, calling the model as
    runahead.prefill does on a rank: (last position's logits, cache)."""
    import cli
    import program
    from kvcache import KVCache
    args = cli.runahead().parse_args(load(RUNNER, "run_chain").OPTIONS)
    model = program.load(args, torch.device("cpu"))[1]
    C = tokens.shape[1]
    cache, S = KVCache(model.cfg, 1, C), 0
    with torch.no_grad():
        for n in c:
            logits = model(tokens[:, S:S + n], cache, S, last_only=True, rope_len=C)[0, -1]
            S += n
    return logits, cache


def same(a, b):
    return a.shape == b.shape and torch.equal(a, b)


def cached(r, d, ref, c):
    """Rank r's cache against the reference's first S[r] positions, in every layer."""
    S_prev, S = sum(c[:r]), sum(c[:r + 1])
    at = (f"rank {r} (its own positions [{S_prev}, {S}) after the prefix [0, {S_prev}) from rank {r - 1})" if r
          else f"rank 0 (positions [0, {S}), no prefix)")
    for layer, (kv, n) in enumerate(zip(d["kv"], d["n"])):
        want = ref.kv[layer][:, :S]
        if n == S and same(kv, want):
            continue
        if n < S:
            has = f"{at} holds {n} positions in layer {layer}, not {S}"
            if r and n == c[r]:
                raise Fail(f"{has}: only its own. Receive the prefix first: recv the K/V of [0, {S_prev}) from "
                           f"rank {r - 1} (tag=layer) and append it to the cache before the rank's own k, v")
            if n == S_prev:
                raise Fail(f"{has}: " + ("the prefix but not its own k, v" if r else "its own k, v are missing")
                           + ": own K/V not appended. Append the rank's own k, v to the cache"
                           + (" after the prefix" if r else ""))
            raise Fail(f"{has}: append the prefix received (rank 0 has none), then the rank's own k, v")
        if r and same(kv[:, c[r]:], ref.kv[layer][:, :S_prev]):
            raise Fail(f"{at}, layer {layer}: its own k, v come before the prefix in the cache (wrong order). "
                       f"Positions must be in order: append the prefix [0, {S_prev}) received from rank {r - 1} "
                       "first, then the rank's own")
        if r and not same(kv[:, :S_prev], ref.kv[layer][:, :S_prev]):
            raise Fail(f"{at}, layer {layer}: the prefix [0, {S_prev}) in the cache differs from one process's; "
                       f"append the K/V received from rank {r - 1} as they came (kvcache.split gives their K and V)")
        raise Fail(f"{at}, layer {layer}: its own positions [{S_prev}, {S}) differ from one process's (by up to "
                   f"{(kv - want).abs().max():.3g}) while the prefix is right: update must return the K and V of "
                   f"all {S} positions [0, {S}), prefix then own (what the cache's update returns)")


def check(path):
    written(load(path).ChainKV)
    torch.set_num_threads(1)                           # as every rank: the same ops, the same bits
    ranks = load(RUNNER, "run_chain").RANKS
    with tempfile.TemporaryDirectory() as out:
        t0 = time.monotonic()
        result = run(path, out, ranks)
        took = time.monotonic() - t0
        ev = {r: events(out, r) for r in range(ranks)}
        lingered = result is None and all(any(e["ev"] == "saved" for e in ev[r]) for r in range(ranks))
        if result is None and not lingered:
            raise Fail(hung(out, ranks, took))
        code, output = result or (0, "")
        if code != 0:
            rule = next((p for p in (protocol(r, ev[r], ranks) for r in range(ranks)) if p), None)
            if rule:                                   # a wrong send may be what failed its receiver
                raise Fail(f"{rule} (and `mpirun -n {ranks}` exited with status {code})")
            raise Fail(f"`mpirun -n {ranks}` exited with status {code}; its output ends:\n"
                       + "\n".join(output.splitlines()[-15:]))
        saved = {}
        for r in range(ranks):
            f = os.path.join(out, f"rank{r}.pt")
            if not os.path.exists(f):
                raise Fail(f"rank {r} saved nothing, yet the job ended; keep run_chain.py as it was. Output:\n"
                           + "\n".join(output.splitlines()[-15:]))
            saved[r] = torch.load(f)
    c, layers = saved[0]["c"], len(saved[0]["kv"])
    ref_logits, ref = reference(saved[0]["tokens"], c)
    for r in range(ranks):
        cached(r, saved[r], ref, c)
        rule = protocol(r, ev[r], ranks)
        if rule:
            raise Fail(rule)
        stopped(r, saved[r], ev[r], ranks)
    logits = saved[ranks - 1]["logits"]
    if logits is None or not same(logits, ref_logits):
        raise Fail(f"the last rank's logits differ from one process prefilling the chunks {c}"
                   + ("" if logits is None or logits.shape != ref_logits.shape
                      else f" by up to {(logits - ref_logits).abs().max():.3g}") + "; they should be identical")
    if lingered:
        raise Fail(f"every rank saved a right result, but the job did not end: it was killed after {took:.0f} s. "
                   "Is a message sent that nobody receives, or a receive nobody sends to?")
    return (f"{ranks} ranks, partition {c}, {layers} layers: every rank's cache and the last rank's logits "
            f"bitwise equal to one process's; mpirun took {took:.1f} s")
