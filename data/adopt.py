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
sections differ in more than the form sets, when the target exists (a rerun after a finished
adoption from the same source just reports it), or while a labeling run holds the source's LOCK. Imports lower `data`
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
from .errors import ArgumentParser, UserError, error_line, doc_summary
from .outputs import check_disjoint, fresh_sibling, remove_stale_siblings, unmark
from .store import LabelStore, StoreLock, finish_swap, write_json_atomic


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


def _already_adopted(target: Path, source: str | Path) -> bool:
    """`target` is the store an earlier run adopted from `source` (a rerun after it finished)."""
    if not (target / "meta.json").is_file():
        return False
    adopted = LabelStore(target).meta().get("adopted") or [{}]
    return Path(str(adopted[0].get("from"))).resolve() == Path(source).resolve()


def adopt_store(source: str | Path, job: LabelJobConfig) -> LabelStore:
    """Create `job.labeling.out` from the rows of `source` (see the module text). Holds the source's
    lock while copying (a labeling run on it is refused, and cannot start meanwhile); builds the new
    store in a marked temporary folder renamed into place at the end, so a kill at any point leaves
    the source untouched and the target absent or complete; a rerun after completion says so."""
    src = LabelStore(source)
    src_meta = src.meta()
    target = Path(job.labeling.out)
    if _already_adopted(target, source):
        return LabelStore(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} exists; adopt into a new folder (labeling.out=NEW_DIR)")
    check_disjoint(target, f"labeling.out={target}", {"the source store": source})
    data = data_identity(job.data)
    _check_source(src_meta, data, job)
    with StoreLock(source):
        finish_swap(source)   # a backfill of the source killed mid-swap: finish it first
        remove_stale_siblings(target, "adopt")
        tmp = fresh_sibling(target, "adopt")
        rows, shards = _copy_rows(src, Path(source), tmp)
    meta = json.loads(json.dumps(src_meta))
    meta["identity"]["data"] = data
    meta["adopted"] = [{"from": str(source), "rows": rows, "shards": shards,
                        "source_created": src_meta.get("created"), "source_versions": src_meta.get("versions"),
                        "at": datetime.datetime.now(datetime.timezone.utc).isoformat()}]
    write_json_atomic(tmp / "meta.json", meta)
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{target} appeared while adopting; adopt into a new folder (labeling.out=NEW_DIR)") from None
    unmark(target)
    return LabelStore(target)


def _copy_rows(src: LabelStore, source: Path, tmp: Path) -> tuple[int, int]:
    """Copy the source's shards (and runs log) into `tmp`; (rows, shards)."""
    rows = len(src.table())
    (tmp / "shards").mkdir()
    shards = src.shards()
    for shard in shards:
        shutil.copyfile(shard, tmp / "shards" / f"part-from-{source.name}-{shard.name.removeprefix('part-')}")
    if (source / "runs.jsonl").is_file():
        shutil.copyfile(source / "runs.jsonl", tmp / "runs.jsonl")
    return rows, len(shards)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m data.adopt", description=doc_summary(__doc__))
    p.add_argument("--source", required=True, help="the classic-only store whose rows are adopted")
    p.add_argument("--config", required=True, help="the labeling config of the new store (its labeling.out is created)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. labeling.out=DIR")
    args = p.parse_args(argv)
    try:
        store = adopt_store(args.source, load_config(LabelJobConfig, args.config, args.overrides, only_known=True))
    except (UserError, OSError) as e:   # bad input, or a file-system fault met on the way: one line
        print(error_line(e), file=sys.stderr)
        return 2
    print(f"adopted {store.meta()['adopted'][0]['rows']} rows of {args.source} into {store.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
