"""Hugging Face hub ids: find a model in the local hub cache, or pull one into it.

A hub id is `owner/name`, optionally `@revision` and `:TAG`. The tag picks one file among many in a GGUF repository
(`TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:Q4_K_M`), as llama.cpp's `-hf` does. Resolving never downloads: a model
is tens of gigabytes, so fetching it is an explicit `mixlocal pull`. huggingface_hub owns the cache layout, the
offline switch (HF_HUB_OFFLINE) and the endpoint (HF_ENDPOINT); this module only asks it questions.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HubError", "HubId", "looks_like_hub_id", "parse_hub_id", "pull", "resolve"]

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[\w./-]+?))?(?::(?P<tag>[\w.*-]+))?")


class HubError(ValueError):
    """A hub id that is malformed, not cached, or that the hub refused; the message says what to do."""


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None = None
    tag: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.tag}" if self.tag else "")


def parse_hub_id(text: str) -> HubId | None:
    m = _HUB_ID.fullmatch(text)
    if m is None or ".." in m["repo"] or m["repo"].endswith((".", "-")):
        return None
    return HubId(m["repo"], m["revision"], m["tag"])


def looks_like_hub_id(source) -> bool:
    """True for `owner/name[@rev][:tag]` strings that are not an existing local path."""
    if not isinstance(source, str) or Path(source).exists():
        return False
    return parse_hub_id(source) is not None


def _errors():
    from huggingface_hub import errors
    return errors


def _snapshot_folder(hub: HubId, cache_dir: str | None) -> Path:
    """The cached snapshot folder, complete or not: a partial pull (one GGUF of many) is a normal state."""
    from huggingface_hub import snapshot_download

    errors = _errors()
    incomplete = getattr(errors, "IncompleteSnapshotError", None)
    try:
        return Path(snapshot_download(hub.repo, revision=hub.revision, cache_dir=cache_dir, local_files_only=True))
    except Exception as e:  # only the two "not cached" kinds are handled here; the rest re-raise
        if incomplete is not None and isinstance(e, incomplete) and getattr(e, "snapshot_path", None):
            return Path(e.snapshot_path)
        if isinstance(e, errors.LocalEntryNotFoundError):
            raise HubError(f"{hub}: not a local path, and the hub repository {hub.repo} is not in the local "
                           f"cache; download it first with `mixlocal pull {hub.repo}`") from None
        raise


def _pick_model(folder: Path, hub: HubId) -> Path:
    """The loadable thing inside a snapshot: the folder itself (HF or MLX layout) or one .gguf file."""
    ggufs = sorted(p for p in folder.rglob("*.gguf") if p.is_file())
    if hub.tag:
        tag = hub.tag.lower()
        chosen = [p for p in ggufs if tag in p.name.lower() or fnmatch.fnmatch(p.name.lower(), tag)]
        # Split files (-00001-of-00003.gguf) load from their first part.
        firsts = [p for p in chosen if not re.search(r"-\d{5}-of-\d{5}\.gguf$", p.name)
                  or re.search(r"-00001-of-\d{5}\.gguf$", p.name)]
        if len(firsts) == 1:
            return firsts[0]
        have = ", ".join(p.name for p in ggufs) or "none"
        if not firsts:
            raise HubError(f"{hub}: no cached .gguf file matches {hub.tag!r} (cached: {have}); "
                           f"pull it with `mixlocal pull {hub.repo} --include '*{hub.tag}*.gguf'`")
        raise HubError(f"{hub}: {hub.tag!r} matches several files ({', '.join(p.name for p in firsts)}); "
                       f"give a longer tag")
    if (folder / "config.json").is_file() and (any(folder.glob("*.safetensors"))
                                               or any(folder.glob("*.npz"))):
        return folder
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise HubError(f"{hub}: the cached snapshot holds several .gguf files "
                       f"({', '.join(p.name for p in ggufs)}); choose one as {hub.repo}:TAG, e.g. "
                       f"{hub.repo}:{_quant_tag(ggufs[0].name)}")
    raise HubError(f"{hub}: the cached snapshot at {folder} holds no model files (config.json with *.safetensors, "
                   f"or a .gguf); pull them with `mixlocal pull {hub.repo}`")


def _quant_tag(filename: str) -> str:
    m = re.search(r"(I?Q\d\w*?|F16|BF16|F32)(?:[.-]|$)", filename, re.IGNORECASE)
    return m.group(1) if m else Path(filename).stem


def resolve(source: str, *, cache_dir: str | None = None) -> Path:
    """Hub id -> local path of the cached model (a directory or a .gguf file). Never downloads."""
    hub = parse_hub_id(source)
    if hub is None:
        raise HubError(f"{source!r} is not a hub id (owner/name[@revision][:TAG])")
    return _pick_model(_snapshot_folder(hub, cache_dir), hub)


def pull(repo: str, *, include: list[str] | None = None, revision: str | None = None,
         cache_dir: str | None = None, local_dir: str | None = None) -> Path:
    """Download a repository (or the files matching `include`) with a progress bar; return the local folder."""
    from huggingface_hub import snapshot_download

    hub = parse_hub_id(repo)
    if hub is None or hub.tag:
        raise HubError(f"{repo!r} is not a hub repository id (owner/name[@revision])")
    revision = revision or hub.revision
    errors = _errors()
    try:
        path = snapshot_download(hub.repo, revision=revision, allow_patterns=include or None,
                                 cache_dir=cache_dir, local_dir=local_dir)
    except errors.GatedRepoError:
        raise HubError(f"{hub.repo}: the repository is gated; accept its terms on the hub and log in "
                       f"(`hf auth login`)") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{hub.repo}: no such repository on the hub (or it is private and no token is set)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{hub.repo}: no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{hub.repo}: cannot download ({first})") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{hub.repo}: the hub refused the download ({str(e).splitlines()[0]})") from None
    folder = Path(path)
    if include and not any(fnmatch.fnmatch(p.relative_to(folder).as_posix(), pattern)
                           for p in folder.rglob("*") if p.is_file() for pattern in include):
        raise HubError(f"{hub.repo}: no file in the repository matches {' '.join(include)}")
    return folder
