"""Which RoPE extension keeps SmolLM2-135M answering at 2K-64K: the dense quality table of issue 28.

Input: dense-only label stores (grid [0.0]) of one request plan, one per setting, each labeled with
the long config and that setting's `model.rope_scaling` (native: `model.name=smollm2-135m`, up to
its 8K window). Output: `long_context.json` (`rows`: one per setting and target length, with
`requests`, `accuracy` (mean task score of the dense greedy answer), `passkey` (niah_single
accuracy), `nll_gold` (mean NLL per token of the gold answer, teacher forced) and `n_tokens`) and
a markdown view beside it.

  for s in native yarn4 yarn6 yarn8; do python train.py --config configs/label_smollm2_64k.yaml \
      model.name=smollm2-135m "model.rope_scaling=..." "labeling.grid=[0.0]" labeling.null_share=0 \
      "data.lengths=[2000,8000,16000,32000,48000,64000]" data.samples_per_length=1 labeling.out=Q/$s; done
  python docs/results/long_context_study.py Q/native Q/yarn4 ... --how "card, versions" \
      --out docs/results/long_context.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.store import LabelStore, write_text_atomic  # noqa: E402


def setting_name(meta: dict) -> str:
    rope = meta["identity"]["model"].get("rope")
    return "native" if rope is None else f"{rope['type']} x{rope['factor']:g}"


def rows_of(root: str) -> list[dict]:
    store = LabelStore(root)
    meta, t = store.meta(), store.table()
    t = t[t["level"] == 0.0]
    name, out = setting_name(meta), []
    for length, g in t.groupby("target_length"):
        niah = g[g["task"] == "niah_single"]
        out.append({"setting": name, "model_id": meta["identity"]["model"]["id"], "target_length": int(length),
                    "requests": int(len(g)), "accuracy": float(g["score"].mean()),
                    "passkey": float(niah["score"].mean()) if len(niah) else None,
                    "passkey_requests": int(len(niah)),
                    "nll_gold": float(g["nll_gold"].mean()), "n_tokens": float(g["n_tokens"].mean())})
    return out


def markdown(doc: dict) -> str:
    lengths = sorted({r["target_length"] for r in doc["rows"]})
    settings = list(dict.fromkeys(r["setting"] for r in doc["rows"]))
    cell = {(r["setting"], r["target_length"]): r for r in doc["rows"]}
    lines = ["# SmolLM2-135M beyond its 8K window: dense quality by RoPE extension", "", doc["how"], ""]
    for field, title in (("accuracy", "accuracy (mean score, all families)"), ("passkey", "passkey (niah_single)"),
                         ("nll_gold", "gold-answer NLL (nats/token, lower is better)")):
        lines += [f"## {title}", "", "| setting | " + " | ".join(f"{n:,}" for n in lengths) + " |",
                  "|---" * (len(lengths) + 1) + "|"]
        for s in settings:
            vals = [cell.get((s, n), {}).get(field) for n in lengths]
            lines.append(f"| {s} | " + " | ".join("-" if v is None else f"{v:.3g}" for v in vals) + " |")
        lines.append("")
    lines.append(f"Requests per cell: {doc['requests_per_cell']}. Chosen for `smollm2-135m-64k`: {doc['chosen']}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stores", nargs="+")
    p.add_argument("--how", default="")
    p.add_argument("--chosen", default="", help="the setting the alias ships, and why")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = [r for root in args.stores for r in rows_of(root)]
    doc = {"rows": rows, "how": args.how, "chosen": args.chosen,
           "requests_per_cell": sorted({r["requests"] for r in rows}),
           "stores": {root: LabelStore(root).meta().get("device_name") for root in args.stores}}
    out = Path(args.out)
    write_text_atomic(out, json.dumps(doc, indent=1))
    write_text_atomic(out.with_suffix(".md"), markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
