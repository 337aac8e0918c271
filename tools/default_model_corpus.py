"""Fetch and clean the English corpus the embedded default model is trained on.

The text comes from Debian packages, fetched with the ordinary apt client (`apt-get download`, then
`dpkg-deb -x`), so that the corpus is reachable from every machine this project builds on:

- `fortunes`, `fortunes-min`: the BSD fortune cookie files (quotations, jokes, short poems), under the
  BSD licence of the University of California (see /usr/share/doc/fortunes/copyright in the package).
- `python3.11-doc` (what the `python3-doc` metapackage installs): the reStructuredText sources of the
  Python 3.11 documentation, under the PSF Licence Version 2 (see /usr/share/doc/python3.11-doc/copyright).

Everything is cached under tools/.cache/, which holds a `.gitignore` of `*` so that nothing fetched is
ever committed. The held-out split is decided per document by a hash of its identity, so it does not
move when the training recipe changes.

Used by tools/train_default_model.py; run alone (`python tools/default_model_corpus.py`) it fetches,
cleans and prints the corpus statistics.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(__file__).resolve().parent / ".cache"

# Package name -> the licence its copyright file states, recorded beside the figures.
PACKAGES = {
    "fortunes-min": "BSD-3-Clause (University of California; fortune-mod), see usr/share/doc/fortunes-min/copyright",
    "fortunes": "BSD-3-Clause (University of California; fortune-mod), see usr/share/doc/fortunes/copyright",
    "python3.11-doc": "PSF-2.0 (Python Software Foundation License Version 2), see usr/share/doc/python3.11-doc/copyright",
}

# Fortune files that are not English prose.
SKIPPED_FORTUNE_FILES = {"ascii-art", "translate-me"}

HELD_OUT_ONE_IN = 20  # about 5% of documents are held out


@dataclass(frozen=True)
class Document:
    source: str  # package name
    ident: str  # stable identity inside the package (file, or file plus entry hash)
    text: str

    @property
    def held_out(self) -> bool:
        digest = hashlib.sha1(f"{self.source}:{self.ident}".encode()).digest()
        return int.from_bytes(digest[:4], "little") % HELD_OUT_ONE_IN == 0


def _cache_dir() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    ignore = CACHE_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return CACHE_DIR


def fetch_packages() -> dict[str, dict]:
    """Download and unpack each package once; return name -> {version, deb, sha256, licence}."""
    cache = _cache_dir()
    debs, root = cache / "debs", cache / "root"
    debs.mkdir(exist_ok=True)
    info = {}
    for name, licence in PACKAGES.items():
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", name], cwd=debs, check=True, capture_output=True)
            found = sorted(debs.glob(f"{name}_*.deb"))
            if not found:
                raise RuntimeError(f"apt-get download {name} produced no .deb in {debs}")
        deb = found[-1]
        unpacked = root / name  # one tree per package, so each document knows its package
        marker = unpacked / f".unpacked-{deb.name}"
        if not marker.exists():
            unpacked.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
            marker.touch()
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        info[name] = {"version": version, "deb": deb.name,
                      "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(), "licence": licence}
    return info


# ----------------------------------------------------------------------------------------------------
# fortunes: entries separated by a line holding only "%"

def fortune_documents(root: Path, package: str, seen: set[str]) -> list[Document]:
    docs = []
    for path in sorted((root / "usr/share/games/fortunes").iterdir()):
        if path.is_symlink() or path.suffix == ".dat" or path.is_dir() or path.name in SKIPPED_FORTUNE_FILES:
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
            lines = [line.strip() for line in entry.replace("\t", " ").splitlines()]
            text = "\n".join(re.sub(r" {2,}", " ", line) for line in lines).strip()
            if len(text.split()) < 3 or text in seen:  # the same cookie appears in several files
                continue
            seen.add(text)
            entry_id = hashlib.sha1(text.encode()).hexdigest()[:12]
            docs.append(Document(package, f"{path.name}/{entry_id}", text))
    return docs


# ----------------------------------------------------------------------------------------------------
# Python documentation: reStructuredText reduced to its running English prose

# Directives whose body is code, tables or navigation, not prose: the whole block goes.
_DROPPED_DIRECTIVES = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "testsetup", "testcleanup",
    "toctree", "literalinclude", "index", "highlight", "productionlist", "csv-table", "table", "list-table",
    "image", "figure", "raw", "only", "include", "sectionauthor", "moduleauthor", "module", "currentmodule",
    "program", "option", "cmdoption", "envvar", "opcode", "audit-event", "audit-event-table", "impl-detail",
    "availability", "c:macro", "c:var", "c:type", "c:member", "c:function", "limited-api-list", "pep-list",
    "rubric", "tabularcolumns", "seealso", "extension-table", "digraph", "graphviz", "math",
}

_ROLE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*(?:<[^>]*>)?`_{1,2}")
_LITERAL = re.compile(r"``([^`]*)``")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")


def _role_text(match: re.Match) -> str:
    inner = match.group(1)
    target = re.match(r"(.*?)\s*<[^>]*>\s*$", inner)
    if target and target.group(1):
        return target.group(1)
    inner = inner.lstrip("!~")
    return inner


def _inline(text: str) -> str:
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = re.sub(r"\|(\w[\w ]*)\|", r"\1", text)  # substitutions
    text = re.sub(r"\s*\[#?[\w-]*\]_", "", text)  # footnote references
    return re.sub(r"\s+", " ", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_to_prose(source: str) -> str:
    """Keep the paragraphs of running text; drop code, tables, markup-only lines and directive heads."""
    # a signature continued with a trailing backslash is one logical line
    lines = re.sub(r"\\\n\s*", " ", source.replace("\t", "    ")).splitlines()
    paragraphs: list[str] = []
    current: list[str] = []
    skip_deeper_than: int | None = None  # skip a block: lines indented more than this (or blank)
    literal_follows = False

    def close() -> None:
        nonlocal literal_follows
        if current:
            text = " ".join(current)
            literal_follows = text.rstrip().endswith("::")
            if literal_follows:
                text = text.rstrip()[:-1]  # "example::" reads "example:" in the rendered page
            text = _inline(text)
            words = text.split()
            letters = sum(ch.isalpha() for ch in text)
            if len(words) >= 4 and letters >= 0.6 * len(text) and text not in (":",):
                paragraphs.append(text)
            current.clear()

    for line in lines:
        stripped = line.strip()
        if skip_deeper_than is not None:
            if not stripped or _indent(line) > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not stripped:
            close()
            continue
        if literal_follows and not current:
            literal_follows = False
            if _indent(line) > 0 or stripped.startswith(">>>"):
                skip_deeper_than = _indent(line) - 1
                continue
        directive = re.match(r"\.\.\s+([\w:.-]+)::", stripped)
        if directive:
            close()
            if directive.group(1) in _DROPPED_DIRECTIVES:
                skip_deeper_than = _indent(line)
            # kept directives (note, warning, versionadded, function, class ...): drop the head line, keep the body
            continue
        if stripped.startswith(".."):  # comment, label or footnote target
            close()
            skip_deeper_than = _indent(line)
            continue
        if (_UNDERLINE.match(stripped) or stripped.startswith(("+", "|", ">>>", "...", "=="))
                or stripped == "::"):
            close()
            continue
        if stripped.startswith((":param", ":type", ":return", ":rtype", ":raises", ":synopsis", ":platform",
                                ":deprecated", ":noindex", ":no-", ":nosubgrouping", ":canonical", ":async",
                                ":abstractmethod", ":classmethod", ":staticmethod", ":value", ":annotation")):
            continue
        current.append(stripped.lstrip("*-#0123456789.) ") if re.match(r"^([*-]|#\.|\d+\.)\s", stripped)
                       else stripped)
    close()
    return "\n".join(paragraphs)


def python_doc_documents(root: Path) -> list[Document]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    if not base.exists():
        raise RuntimeError(f"{base} is missing: is python3.11-doc unpacked in {root}?")
    docs = []
    for path in sorted(base.rglob("*.rst.txt")):
        text = rst_to_prose(path.read_text(encoding="utf-8", errors="replace"))
        if len(text.split()) >= 20:
            docs.append(Document("python3.11-doc", str(path.relative_to(base)), text))
    return docs


def load_corpus() -> tuple[list[Document], dict[str, dict]]:
    info = fetch_packages()
    root = CACHE_DIR / "root"
    seen: set[str] = set()
    documents = fortune_documents(root / "fortunes-min", "fortunes-min", seen)
    documents += fortune_documents(root / "fortunes", "fortunes", seen)
    return documents + python_doc_documents(root / "python3.11-doc"), info


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Fetch and clean the default model's corpus; print its statistics.")
    parser.add_argument("--held-out", metavar="FILE",
                        help="also write the held-out documents, which the model never trained on, as plain text: "
                             "calibration text for `mixlocal imatrix` that is not the perplexity text")
    args = parser.parse_args()
    documents, packages = load_corpus()
    if args.held_out:
        Path(args.held_out).write_text("\n\n".join(d.text for d in documents if d.held_out) + "\n", encoding="utf-8")
    for name, meta in packages.items():
        docs = [d for d in documents if d.source == name]
        chars = sum(len(d.text) for d in docs)
        held = sum(d.held_out for d in docs)
        print(f"{name} {meta['version']}: {len(docs)} documents, {chars} characters, {held} held out")
