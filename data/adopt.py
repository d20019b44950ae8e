"""Start a label store from the rows of an older one whose samples it plans, without relabeling.

A store whose config lists `data.forms: [classic, varied]` plans, for every (task, length, index),
the classic sample of a classic-only store with the same tasks, lengths and seed (same id, same
text) plus a varied one. Labels depend only on the model, sparse settings, grid and prompt, so the
classic rows of such a store are valid rows of the new one. `adopt_store` creates the new store
(its identity: the source's, with the new config's data section), copies the source's shards under
names no labeling rank writes (`part-from-<source>-...`) and records the adoption in the metadata;
labeling the new config then resumes it and labels only the samples it lacks.

  python -m data.adopt --source data/labels/smollm2-135m/v1 --config configs/label_smollm2_gpu_v2.yaml

Refuses (one line, nothing written) when anything but the data section differs, when the data
sections differ in more than the form sets, or when the target exists. Imports lower `data`
modules; never `controller`.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from .config import LabelJobConfig, data_identity, load_config, stored_data_identity
from .errors import ArgumentParser, UserError
from .store import LabelStore, write_json_atomic


def _check_source(src_meta: dict, data: dict, job: LabelJobConfig) -> None:
    ident = src_meta["identity"]
    src_data = stored_data_identity(ident["data"])
    if tuple(src_data.pop("forms", ["classic"])) != ("classic",) or "classic" not in data.get("forms", ["classic"]):
        raise UserError("the source store must be classic-only and the config must list the classic form set")
    differ = sorted(k for k in set(src_data) | set(data) if k != "forms" and src_data.get(k) != data.get(k))
    if differ:
        raise UserError(f"the source store's data differ from the config's in {', '.join(differ)}; "
                        "adopt only from a store with the same tasks, lengths, seed and template setting")
    want = {"sparse": asdict(job.sparse), "levels": list(job.labeling.levels)}
    if json.loads(json.dumps(want)) != {"sparse": ident["sparse"], "levels": ident["levels"]}:
        raise UserError("the source store was made with other sparse settings or grid than the config")
    if src_meta.get("model_name") != job.model.name:
        raise UserError(f"the source store is for model {src_meta.get('model_name')!r}, the config names {job.model.name!r}")


def adopt_store(source: str | Path, job: LabelJobConfig) -> LabelStore:
    """Create `job.labeling.out` from the rows of `source` (see the module text)."""
    src = LabelStore(source)
    src_meta = src.meta()
    target = Path(job.labeling.out)
    if target.exists():
        raise UserError(f"{target} exists; adopt into a new folder (labeling.out=NEW_DIR)")
    data = data_identity(job.data)
    _check_source(src_meta, data, job)
    rows = len(src.table())
    tmp = target.with_name(target.name + ".adopt.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "shards").mkdir(parents=True)
    for shard in src.shards():
        shutil.copyfile(shard, tmp / "shards" / f"part-from-{Path(source).name}-{shard.name.removeprefix('part-')}")
    meta = json.loads(json.dumps(src_meta))
    meta["identity"]["data"] = data
    meta["adopted"] = [{"from": str(source), "rows": rows, "shards": len(src.shards()),
                        "source_created": src_meta.get("created"), "source_versions": src_meta.get("versions"),
                        "at": datetime.datetime.now(datetime.timezone.utc).isoformat()}]
    write_json_atomic(tmp / "meta.json", meta)
    if (Path(source) / "runs.jsonl").is_file():
        shutil.copyfile(Path(source) / "runs.jsonl", tmp / "runs.jsonl")
    os.replace(tmp, target)
    return LabelStore(target)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m data.adopt", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="the classic-only store whose rows are adopted")
    p.add_argument("--config", required=True, help="the labeling config of the new store (its labeling.out is created)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. labeling.out=DIR")
    args = p.parse_args(argv)
    try:
        store = adopt_store(args.source, load_config(LabelJobConfig, args.config, args.overrides, only_known=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"adopted {store.meta()['adopted'][0]['rows']} rows of {args.source} into {store.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
