"""`mixlocal pull` and hub-id resolution with no network.

- A hub cache laid out by hand in huggingface_hub's documented layout, read with HF_HUB_OFFLINE=1.
- The real download path of huggingface_hub against a hub-compatible HTTP server on loopback (HF_ENDPOINT).

The cache layout: models--{owner}--{name}/ with blobs/{etag}, refs/{revision} holding the commit hash, and
snapshots/{commit}/{path} as relative symlinks into blobs/.

The server answers the requests huggingface_hub 2.x makes for snapshot_download:
  GET  /api/models/{repo}/revision/{rev}           model info: its "sha" is the commit to download
  GET  /api/models/{repo}/tree/{rev}?recursive=... the file listing (one page, so no Link header)
  HEAD /{repo}/resolve/{rev}/{path}                 metadata: X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{path}                 the bytes
Unknown repositories get 404 with X-Error-Code: RepoNotFound, as the hub sends.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from mixlocal.engine.sources import hub as hubmod

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commit_for(files: dict[str, bytes]) -> str:
    h = hashlib.sha1()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
    return h.hexdigest()


def lay_out_cache(cache: Path, repo: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """Write files into a hub cache the way huggingface_hub does; return the snapshot folder."""
    commit = commit_for(files)
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snapshot = root / "snapshots" / commit
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest()
        (root / "blobs" / etag).write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "blobs" / etag, link.parent))
    return snapshot


class FakeHub:
    """Serve {repo: {path: bytes}} on 127.0.0.1; `requests` records (method, path) of every request."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.commits = {repo: commit_for(files) for repo, files in repos.items()}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub._handle(self, body=True)

            def do_HEAD(self):
                hub._handle(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _find_repo(self, parts: list[str]) -> str | None:
        repo = "/".join(parts[:2])
        return repo if repo in self.repos else None

    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((h.command, path))
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "models"] and len(parts) >= 5:
            repo = self._find_repo(parts[2:4])
            if repo is None:
                return self._send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"},
                                  body)
            files, commit = self.repos[repo], self.commits[repo]
            if parts[4] == "revision":
                info = {"id": repo, "modelId": repo, "sha": commit, "private": False,
                        "siblings": [{"rfilename": name} for name in sorted(files)]}
                return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
            if parts[4] == "tree":
                tree = [{"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
                        for name, data in sorted(files.items())]
                return self._send(h, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._find_repo(parts[:2])
            if repo is None:
                return self._send(h, 404, b"Repository not found", {"X-Error-Code": "RepoNotFound"}, body)
            name = "/".join(parts[4:])
            data = self.repos[repo].get(name)
            if data is None:
                return self._send(h, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, body)
            return self._send(h, 200, data, {"X-Repo-Commit": self.commits[repo],
                                             "ETag": f'"{git_blob_sha1(data)}"',
                                             "Content-Type": "application/octet-stream"}, body)
        return self._send(h, 404, b"not found", {}, body)

    @staticmethod
    def _send(h, status: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)


# ---------------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------------

def model_files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}


def run_cli(*args, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full.update(HF_HUB_DISABLE_TELEMETRY="1", **env)
    return subprocess.run([sys.executable, "-m", "mixlocal.engine.cli", *args], check=False, env=full, capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=timeout)


def assert_one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixlocal: error:"), r.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def hub_env(tmp_path: Path, **extra) -> dict:
    return {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "hub"), **extra}


@pytest.mark.parametrize("text, expected", [
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", hubmod.HubId("mistralai/Mixtral-8x7B-Instruct-v0.1")),
    ("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:Q4_K_M",
     hubmod.HubId("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF", None, "Q4_K_M")),
    ("acme/m@v1.0:q8_0", hubmod.HubId("acme/m", "v1.0", "q8_0")),
    ("mixtral", None), ("a/b/c", None), ("../x", None), ("/abs/path", None), ("acme/..", None),
])
def test_parse_hub_id(text, expected):
    assert hubmod.parse_hub_id(text) == expected


def test_existing_path_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert not hubmod.looks_like_hub_id("models/tiny")
    assert hubmod.looks_like_hub_id("models/other")


def test_offline_hub_id_reads_the_cache(hf_model_dir, tmp_path):
    """-m owner/name with HF_HUB_OFFLINE=1 finds the snapshot laid out in the documented cache layout."""
    lay_out_cache(tmp_path / "hub", "acme/tiny-mixtral", model_files(hf_model_dir))
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1")
    via_hub = run_cli("info", "acme/tiny-mixtral", "--json", env=env)
    assert via_hub.returncode == 0, via_hub.stderr
    via_dir = run_cli("info", str(hf_model_dir), "--json", env=env)
    assert via_dir.returncode == 0, via_dir.stderr
    a, b = json.loads(via_hub.stdout), json.loads(via_dir.stdout)
    assert a["source"] == "acme/tiny-mixtral"
    for key in ("source", "name"):
        a.pop(key), b.pop(key)
    a["config"].pop("name"), b["config"].pop("name")
    assert a == b


def test_offline_hub_id_not_cached_is_one_clear_line(tmp_path):
    r = run_cli("info", "acme/not-downloaded", env=hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert_one_error_line(r, "acme/not-downloaded", "mixlocal pull acme/not-downloaded")


GGUF_REPO = {"README.md": b"# fake GGUF repository\n", "tiny.Q4_K_M.gguf": b"GGUF" + b"\x01" * 3000,
             "tiny.Q8_0.gguf": b"GGUF" + b"\x02" * 5000}


def test_resolve_picks_a_gguf_by_tag(tmp_path):
    snapshot = lay_out_cache(tmp_path, "acme/tiny-GGUF", GGUF_REPO)
    assert hubmod.resolve("acme/tiny-GGUF:Q4_K_M", cache_dir=str(tmp_path)) == snapshot / "tiny.Q4_K_M.gguf"
    assert hubmod.resolve("acme/tiny-GGUF:q8_0", cache_dir=str(tmp_path)) == snapshot / "tiny.Q8_0.gguf"
    with pytest.raises(hubmod.HubError, match="several .gguf files.*acme/tiny-GGUF:"):
        hubmod.resolve("acme/tiny-GGUF", cache_dir=str(tmp_path))
    with pytest.raises(hubmod.HubError, match="no cached .gguf file matches 'Q2_K'.*--include"):
        hubmod.resolve("acme/tiny-GGUF:Q2_K", cache_dir=str(tmp_path))


def test_pull_downloads_through_the_hub_api(hf_model_dir, tmp_path):
    """The real huggingface_hub download path against a loopback hub; then the model runs from the cache offline."""
    files = model_files(hf_model_dir)
    with FakeHub({"acme/tiny-mixtral": files}) as hub:
        r = run_cli("pull", "acme/tiny-mixtral", env=hub_env(tmp_path, HF_ENDPOINT=hub.endpoint))
        assert r.returncode == 0, r.stderr
        commit = hub.commits["acme/tiny-mixtral"]
        gets = {path for method, path in hub.requests if method == "GET"}
    snapshot = Path(r.stdout.strip().splitlines()[-1])
    assert snapshot == tmp_path / "hub" / "models--acme--tiny-mixtral" / "snapshots" / commit
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == files
    assert "/api/models/acme/tiny-mixtral/revision/main" in gets
    assert {f"/acme/tiny-mixtral/resolve/{commit}/{name}" for name in files} <= gets

    # The hub is gone now: generation must come from the cache alone.
    r = run_cli("generate", "-m", "acme/tiny-mixtral", "-p", "Hello", "-n", "3", "--temp", "0",
                env=hub_env(tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT=hub.endpoint))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and "decode" in r.stderr


def test_pull_include_fetches_only_matching_files(tmp_path):
    with FakeHub({"acme/tiny-GGUF": GGUF_REPO}) as hub:
        r = run_cli("pull", "acme/tiny-GGUF", "--include", "*Q4_K_M.gguf",
                    env=hub_env(tmp_path, HF_ENDPOINT=hub.endpoint))
        assert r.returncode == 0, r.stderr
        fetched = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert [p.rsplit("/", 1)[1] for p in fetched] == ["tiny.Q4_K_M.gguf"]
    snapshot = Path(r.stdout.strip().splitlines()[-1])
    assert [p.name for p in snapshot.iterdir()] == ["tiny.Q4_K_M.gguf"]
    assert (snapshot / "tiny.Q4_K_M.gguf").read_bytes() == GGUF_REPO["tiny.Q4_K_M.gguf"]
    # A partial snapshot is a normal state: the pulled file resolves, the others say how to pull them.
    cache = str(tmp_path / "hub")
    assert hubmod.resolve("acme/tiny-GGUF:Q4_K_M", cache_dir=cache) == snapshot / "tiny.Q4_K_M.gguf"
    assert hubmod.resolve("acme/tiny-GGUF", cache_dir=cache) == snapshot / "tiny.Q4_K_M.gguf"
    with pytest.raises(hubmod.HubError, match="--include '\\*Q8_0\\*.gguf'"):
        hubmod.resolve("acme/tiny-GGUF:Q8_0", cache_dir=cache)


def test_pull_unknown_repository_is_one_clear_line(tmp_path):
    with FakeHub({}) as hub:
        r = run_cli("pull", "acme/no-such-model", env=hub_env(tmp_path, HF_ENDPOINT=hub.endpoint))
    assert_one_error_line(r, "acme/no-such-model", "no such repository")


def test_pull_help_names_the_three_layouts():
    from mixlocal.engine.cli import build_parser
    text = build_parser(["pull"])._subparsers._group_actions[0].choices["pull"].format_help()
    for repo in ("mistralai/Mixtral-8x7B-Instruct-v0.1", "TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF",
                 "--include '*Q4_K_M.gguf'", "mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit"):
        assert repo in text
