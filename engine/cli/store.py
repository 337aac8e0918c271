"""`mixlocal ls`, `mixlocal rm` and `mixlocal cache prune`: what mixlocal keeps on disk, and removing it.

Four kinds of thing: models pulled into the Hugging Face cache (huggingface_hub owns that folder, and its
scan_cache_dir / delete_revisions do the work), local model paths the command line has loaded (remembered in
<cache>/models.json, never deleted: they are the user's files), packed-weight files (<cache>/packed/*.mixpack, one per
model and kernel layout, each naming the source files it was made from), and compiled kernels (<cache>/numba).
Nothing outside mixlocal's cache folder and the hub's is ever removed, whatever a file's header or the list says.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

from mixlocal.paths import cache_root, numba_cache_dir

from .common import JSON_HELP, UsageError, check_json_dest, human_bytes, json_output

__all__ = ["add_parsers", "remember_model"]

_PACK_MAGIC = b"MIXLPACK"  # engine/backends/numba/packed_cache.py's file layout: magic, u64 header length, JSON
_MAX_HEADER = 64 << 20


# ---------------------------------------------------------------------------------------------------------------------
# What is there
# ---------------------------------------------------------------------------------------------------------------------

def _models_file() -> Path:
    return cache_root() / "models.json"


def _local_models() -> dict[str, float]:
    try:
        data = json.loads(_models_file().read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def remember_model(source) -> None:
    """Note a local model path the command line loaded, for `mixlocal ls` (hub ids are listed from the hub cache)."""
    if source is None or not Path(source).exists():
        return
    models = _local_models()
    models[str(Path(source).resolve())] = time.time()
    try:
        _models_file().parent.mkdir(parents=True, exist_ok=True)
        tmp = _models_file().with_name(f"models.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(models, indent=1, sort_keys=True))
        os.replace(tmp, _models_file())
    except OSError:
        pass  # a read-only home must not stop a model from running


def _forget_model(path: str) -> None:
    models = _local_models()
    models.pop(path, None)
    _models_file().write_text(json.dumps(models, indent=1, sort_keys=True))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _hub_repos() -> list:
    """huggingface_hub's view of its cache; [] when there is none yet."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound
    try:
        return sorted((r for r in scan_cache_dir().repos if r.repo_type == "model"), key=lambda r: r.repo_id)
    except CacheNotFound:
        return []


def _pack_sources(path: Path) -> list[list] | None:
    """The [path, size, mtime_ns] of the files a packed-weight file was made from; None if it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != _PACK_MAGIC:
                return None
            (n,) = struct.unpack("<Q", head[8:])
            if n > _MAX_HEADER:
                return None
            return list(json.loads(f.read(n)).get("sources") or [])
    except (OSError, ValueError, AttributeError):
        return None


def _source_intact(entry: list) -> bool:
    try:
        st = os.stat(entry[0])
    except (OSError, TypeError, IndexError):
        return False
    return st.st_size == entry[1] and st.st_mtime_ns == entry[2]


def _packs(repos: list | None = None) -> list[dict]:
    """The packed-weight files, each with the model it was made from: a hub id when its source lies in a hub repo
    (the header names the resolved blob), else the source file. Stale: a source is gone or changed."""
    folder = cache_root() / "packed"
    out = []
    for p in sorted(folder.glob("*.mixpack*")) if folder.is_dir() else []:
        sources = _pack_sources(p) if p.suffix == ".mixpack" else None
        model = sources[0][0] if sources else None
        for r in repos or []:
            if model and _inside(model, r.repo_path):
                model = r.repo_id
        out.append({"path": str(p), "size_bytes": p.stat().st_size, "model": model,
                    "stale": not sources or not all(_source_intact(s) for s in sources), "sources": sources or []})
    return out


def _kernels() -> dict:
    folder = numba_cache_dir()
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return {"path": str(folder), "files": len(files), "size_bytes": sum(p.stat().st_size for p in files),
            "inside_cache": _inside(folder, cache_root())}


def _inventory() -> dict:
    repos = _hub_repos()
    hub = [{"id": r.repo_id, "path": str(r.repo_path), "size_bytes": r.size_on_disk, "files": r.nb_files,
            "last_used": r.last_accessed} for r in repos]
    local = [{"path": p, "exists": Path(p).exists(), "size_bytes": _size(Path(p)) if Path(p).exists() else 0,
              "last_used": t} for p, t in sorted(_local_models().items())]
    return {"cache_dir": str(cache_root()), "hub_models": hub, "local_models": local, "packed": _packs(repos),
            "kernels": _kernels()}


# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------

def _ls(args) -> int:
    check_json_dest(args.json)
    inv = _inventory()
    if json_output(inv, args.json):
        return 0
    print(f"{'MODEL':<60} {'SIZE':>10}  WHERE")
    for m in inv["hub_models"]:
        print(f"{m['id']:<60} {human_bytes(m['size_bytes']):>10}  hub cache")
    for m in inv["local_models"]:
        print(f"{m['path']:<60} {human_bytes(m['size_bytes']) if m['exists'] else '(gone)':>10}  local path")
    if not inv["hub_models"] and not inv["local_models"]:
        print("(no models yet: the embedded model is always there; mixlocal pull fetches others)")
    print()
    print(f"packed weights in {Path(inv['cache_dir']) / 'packed'}:")
    for p in inv["packed"]:
        state = "stale: its model is gone or changed" if p["stale"] else f"for {p['model']}"
        print(f"  {Path(p['path']).name:<58} {human_bytes(p['size_bytes']):>10}  {state}")
    if not inv["packed"]:
        print("  (none)")
    k = inv["kernels"]
    print(f"compiled kernels in {k['path']}: {k['files']} files, {human_bytes(k['size_bytes'])}")
    return 0


def _confirm(what: list[tuple[str, int]], yes: bool) -> bool:
    """List what would go and ask (stdin may be a pipe: its next line is the answer; none is a no)."""
    for name, size in what:
        print(f"  {name} ({human_bytes(size)})", file=sys.stderr)
    print(f"total {human_bytes(sum(s for _, s in what))}", file=sys.stderr)
    if yes:
        return True
    print("remove these? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        print("nothing removed", file=sys.stderr)
        return False
    return True


def _inside(path: Path, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except OSError:
        return False


def _remove(path: Path, allowed: list[Path]) -> None:
    if not any(_inside(path, a) for a in allowed):  # the one gate every deletion passes
        raise RuntimeError(f"refusing to remove {path}: it is outside {' and '.join(map(str, allowed))}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _rm(args) -> int:
    target = args.model
    packs = _packs()
    repos = [r for r in _hub_repos() if r.repo_id == target.split(":")[0]]
    local = str(Path(target).resolve()) if Path(target).exists() or str(Path(target).resolve()) in _local_models() \
        else None
    if repos:
        repo = repos[0]
        made_from = [p for p in packs if any(_inside(s[0], repo.repo_path) for s in p["sources"])]
        what = [(f"{repo.repo_id} in the hub cache ({repo.repo_path})", repo.size_on_disk)]
    elif local is not None and local in _local_models():
        made_from = [p for p in packs if any(_inside(s[0], local) for s in p["sources"])]
        what = [(f"{local} from the list (the file itself stays: it is not in a cache)", 0)]
    else:
        raise UsageError(f"mixlocal rm: {target} is neither a model in the hub cache nor a local path mixlocal has "
                         "used (see mixlocal ls)")
    what += [(p["path"], p["size_bytes"]) for p in made_from]
    print(f"mixlocal rm {target} removes:", file=sys.stderr)
    if not _confirm(what, args.yes):
        return 1
    for p in made_from:
        _remove(Path(p["path"]), [cache_root()])
    if repos:
        from huggingface_hub import scan_cache_dir
        if not _inside(repo.repo_path, scan_cache_dir().cache_dir):
            raise RuntimeError(f"refusing to remove {repo.repo_path}: it is outside the hub cache")
        scan_cache_dir().delete_revisions(*(r.commit_hash for r in repo.revisions)).execute()
        if repo.repo_path.exists():  # refs and lock files the strategy leaves behind
            _remove(repo.repo_path, [scan_cache_dir().cache_dir])
    else:
        _forget_model(local)
    print(f"removed {target}", file=sys.stderr)
    return 0


def _prune(args) -> int:
    stale = [p for p in _packs() if p["stale"]]
    gone = [p for p in _local_models() if not Path(p).exists()]  # list entries only: nothing on disk to delete
    what = [(p["path"], p["size_bytes"]) for p in stale] + [(f"{p} from the list (the path is gone)", 0) for p in gone]
    kernels = _kernels()
    if not args.keep_kernels and kernels["files"]:
        if kernels["inside_cache"]:
            what.append((f"{kernels['path']} (compiled kernels; the next run compiles them again, once)",
                         kernels["size_bytes"]))
        else:
            print(f"compiled kernels in {kernels['path']} stay: NUMBA_CACHE_DIR points outside {cache_root()}",
                  file=sys.stderr)
    if not what:
        print("nothing to prune", file=sys.stderr)
        return 0
    print("mixlocal cache prune removes:", file=sys.stderr)
    if not _confirm(what, args.yes):
        return 1
    for p in stale:
        _remove(Path(p["path"]), [cache_root()])
    for p in gone:
        _forget_model(p)
    if not args.keep_kernels and kernels["files"] and kernels["inside_cache"]:
        _remove(Path(kernels["path"]), [cache_root()])
    print(f"freed {human_bytes(sum(s for _, s in what))}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    ls = sub.add_parser("ls", help="list models, packed-weight caches and compiled kernels on this machine",
                        description="Models in the Hugging Face cache and local model paths mixlocal has loaded, "
                                    "with sizes; packed-weight files and compiled kernels in mixlocal's cache.")
    ls.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE", help=JSON_HELP)
    ls.set_defaults(func=_ls)

    rm = sub.add_parser("rm", help="remove a model from the hub cache, with its packed weights",
                        description="Remove a model pulled into the Hugging Face cache and the packed-weight files "
                                    "made from it. A local path is only forgotten (with its packed weights): mixlocal "
                                    "never deletes files outside its cache and the hub's.")
    rm.add_argument("model", metavar="MODEL", help="a hub id owner/name, or a local path listed by mixlocal ls")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    rm.set_defaults(func=_rm)

    cache = sub.add_parser("cache", help="manage mixlocal's cache folder",
                           description=f"mixlocal's cache folder: {cache_root()}")
    cs = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    pr = cs.add_parser("prune", help="remove packed weights whose model is gone or changed, and compiled kernels",
                       description="Remove packed-weight files whose source model is gone or changed, and the "
                                   "compiled kernels (they are compiled again, once, on the next run); forget local "
                                   "model paths that no longer exist.")
    pr.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    pr.add_argument("--keep-kernels", action="store_true", help="leave the compiled kernels")
    pr.set_defaults(func=_prune)
