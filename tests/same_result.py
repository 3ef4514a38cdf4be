"""Are two --save files of runahead.py or tsp.py the same result, bit for bit? For runs that should do
identical arithmetic and differ only in how bytes travel (the direct and the staged transport):

    python tests/same_result.py direct.pt staged.pt

Prints the largest difference in the logits and the cache, and exits 1 unless both are torch.equal.
"""
import sys

import torch

a, b = (torch.load(p, weights_only=True) for p in sys.argv[1:3])
assert len(a["past_key_values"]) == len(b["past_key_values"]), "different numbers of layers"
kv = [(x, y) for la, lb in zip(a["past_key_values"], b["past_key_values"]) for x, y in zip(la, lb)]
same = torch.equal(a["logits"], b["logits"]) and all(torch.equal(x, y) for x, y in kv)
diff = max([(a["logits"] - b["logits"]).abs().max().item()] + [(x - y).abs().max().item() for x, y in kv])
print(f"{sys.argv[1]} vs {sys.argv[2]}: {'torch.equal' if same else 'DIFFERENT'} (logits and {len(kv)} cache "
      f"tensors; max difference {diff:.3g}); tokens {'equal' if a['generated_ids'] == b['generated_ids'] else 'differ'}")
sys.exit(0 if same and a["generated_ids"] == b["generated_ids"] else 1)
