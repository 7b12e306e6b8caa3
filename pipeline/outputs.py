"""Safe outputs, shared by every job: a mistake of the user's (``UserError``), where a job may
write (never onto or around its own input), what ``overwrite`` may remove (only the files an
earlier run of the same job wrote, as its manifest records them) and files that appear whole
(written beside under a hidden name, then renamed).

Every output folder a job writes holds ``_manifest.json``: the job, the name patterns of the
files it writes there, and the arguments that decide what the folder holds. A folder without
one, or with files its manifest does not own, is not ours: nothing in it is deleted.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST = "_manifest.json"
# the hidden temporary names of write_file (.NAME.tmp-XXXXXXXX, 8 hex digits), at any depth: a
# run that died mid-write leaves them
TEMPORARY = re.compile(r"(.*/)?\.[^/]+\.tmp-[0-9a-f]{8}")


class UserError(ValueError):
    """A mistake of the user's (an argument, an input, an output): the jobs print it as one
    line, ``jobs.NAME: error: ...``, and exit with status 2. Any other exception is a bug."""


class MissingFile(UserError, FileNotFoundError):
    """A user's path that does not exist or lacks a file it must have."""


@dataclass
class Manifest:
    """What a job wrote into an output folder (``_manifest.json``)."""

    job: str  # the job that owns the folder: "jobs.score", "jobs.train", ...
    # patterns, relative to the folder, of every file the job writes there: * and ? within one
    # name, ** across folders ("_ray/**": everything below _ray)
    owns: list[str]
    arguments: dict[str, Any] = field(default_factory=dict)  # what decides the folder's contents

    def owned(self, name: str) -> bool:
        return name == MANIFEST or bool(TEMPORARY.fullmatch(name)) or any(_glob(p).fullmatch(name) for p in self.owns)


def _glob(pattern: str) -> re.Pattern:
    """A path pattern as a regular expression: ``*`` and ``?`` stay within one name (fnmatch's
    would cross ``/`` and own a user's ``part-x/mine.parquet``), ``**`` crosses folders."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wild.get(part, re.escape(part)) for part in parts))


# -- files that appear whole ----------------------------------------------------------------------


def _temporary(fs, path: str) -> str:
    """The hidden name beside ``path`` that a file is written under before it is renamed."""
    folder, name = path.rstrip("/").rsplit("/", 1) if "/" in path else ("", path)
    if folder:
        fs.makedirs(folder, exist_ok=True)
    return f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}" if folder else f".{name}.tmp-{uuid.uuid4().hex[:8]}"


def write_file(fs, path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` on the fsspec filesystem ``fs`` atomically: under a hidden
    name beside it, then renamed (readers see the old file or the new one, never half of one)."""
    temporary = _temporary(fs, path)
    with fs.open(temporary, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    fs.mv(temporary, path)


def write_json(fs, path: str, value: Any) -> None:
    write_file(fs, path, json.dumps(value, indent=2))


def put_file(fs, local: str, path: str) -> None:
    """Copy the local file ``local`` to ``path`` on ``fs`` atomically (see ``write_file``)."""
    temporary = _temporary(fs, path)
    fs.put_file(local, temporary)
    fs.mv(temporary, path)


def absolute(path: str) -> str:
    """A local path made absolute (Ray's workers do not run in the driver's working folder);
    a URI as it is."""
    return path if "://" in path else os.path.abspath(path)


# -- where a job may write ------------------------------------------------------------------------


def _key(uri: str) -> tuple[str, str]:
    """(protocol, normalised path) of a local path or URI, for comparing locations."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return "file", os.path.realpath(os.path.abspath(path))
    return protocol, "/" + path.strip("/")


def _inside(path: tuple[str, str], folder: tuple[str, str]) -> bool:
    return path[0] == folder[0] and (path[1] == folder[1] or path[1].startswith(folder[1].rstrip("/") + "/"))


def same_or_inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (local paths resolved, URIs compared)."""
    return _inside(_key(path), _key(folder))


def refuse_unsafe_output(output: str, inputs: list[tuple[str, str | None]], flag: str = "--output") -> None:
    """Refuse, with a ``UserError``, an ``output`` that is an existing file, is one of the
    ``inputs`` ((flag, path, URI or glob) pairs; a None path is skipped), holds one, or lies
    inside an input folder: a job must never write onto or around what it reads."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    path = path.rstrip("/")
    if fs.isfile(path):
        raise UserError(f"{flag} {output} is an existing file; the output is a folder: choose a new folder name")
    parent = path
    while "/" in parent.strip("/") and not fs.exists(parent):  # the nearest existing folder above must be one
        parent = parent.rsplit("/", 1)[0]
        if fs.isfile(parent):
            raise UserError(f"{flag} {output} lies inside the file {parent}: choose an output folder elsewhere")
    out = _key(output)
    for name, spec in inputs:
        if not spec:
            continue
        try:
            in_fs, in_path = fsspec.core.url_to_fs(spec)
        except Exception:  # an unknown protocol: the input check names it
            continue
        magic = any(c in in_path for c in "*?[")
        # a folder input is read recursively; a glob's fixed part is one only when it recurses (**)
        folders = [spec] if not magic and in_fs.isdir(in_path) else []
        if magic and "**" in in_path:
            folders.append(spec.split("**", 1)[0])
        files = in_fs.glob(in_path) if magic else [in_path]
        protocol = spec.split("://", 1)[0] + "://" if "://" in spec else ""
        for item in [*folders, *(protocol + f for f in files)]:
            where = _key(item)
            if where == out:
                raise UserError(f"{flag} {output} is the input {name} {spec}: write the output to a new folder "
                                "(a job never writes onto what it reads)")
            if _inside(where, out):
                raise UserError(f"{flag} {output} holds the input {name} {spec}: choose an output folder "
                                "outside it (a job never writes around what it reads)")
        for item in folders:
            if _inside(out, _key(item)):
                raise UserError(f"{flag} {output} lies inside the input folder {name} {spec}, which is read "
                                "recursively: choose an output folder outside it")


# -- what overwrite may remove ---------------------------------------------------------------------


def _files(fs, root: str) -> list[str]:
    """Every file under ``root``, relative to it."""
    return sorted(p[len(root) + 1:] for p in fs.find(root) if p.startswith(root + "/"))


def read_manifest(fs, root: str) -> Manifest | None:
    if not fs.isfile(f"{root}/{MANIFEST}"):
        return None
    with fs.open(f"{root}/{MANIFEST}") as f:
        raw = json.load(f)
    return Manifest(job=raw.get("job", "?"), owns=list(raw.get("owns", [])), arguments=raw.get("arguments", {}))


def inspect_output(output: str, job: str, flag: str = "--output", adopt: Manifest | None = None) -> Manifest | None:
    """The manifest of an earlier run of ``job`` in ``output``; None when the folder is new or
    empty. Refused with a ``UserError`` naming what is in the way: an existing file, a folder
    without a manifest, another job's folder, files its manifest does not own. ``adopt``: the
    manifest to assume for a folder without one (one written before manifests existed, which
    the caller recognised). Reads only."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    if fs.isfile(root):
        raise UserError(f"{flag} {output} is an existing file; the output is a folder: choose a new folder name")
    files = _files(fs, root) if fs.isdir(root) else []
    if not files:
        return None
    previous = read_manifest(fs, root) or adopt
    if previous is None:
        raise UserError(f"{flag} {output} already holds files that {job} did not write ({_names(files)}); "
                        "nothing was deleted: choose a new or empty folder")
    if previous.job != job:
        raise UserError(f"{flag} {output} holds the output of {previous.job}, not of {job}; nothing was deleted: "
                        "choose another folder")
    foreign = [name for name in files if not previous.owned(name)]
    if foreign:
        raise UserError(f"{flag} {output} holds files that {job} did not write ({_names(foreign)}); nothing was "
                        "deleted: move them out or choose another folder")
    return previous


def claim_output(output: str, manifest: Manifest, overwrite: bool, flag: str = "--output",
                 adopt: Manifest | None = None) -> Manifest | None:
    """Make ``output`` this job's folder (``inspect_output`` refuses anything else, before
    anything is deleted). A new or empty folder gets ``manifest`` and None is returned. A
    folder of an earlier run of the same job returns that run's manifest (the caller compares
    its arguments), or with ``overwrite`` loses that run's files, and only those, and gets
    ``manifest``."""
    import fsspec

    previous = inspect_output(output, manifest.job, flag, adopt)
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    if previous is not None and not overwrite:
        if not fs.isfile(f"{root}/{MANIFEST}"):  # adopted: recorded from now on
            write_json(fs, f"{root}/{MANIFEST}", asdict(previous))
        return previous
    if previous is not None:
        remove_owned(fs, root, previous)
    write_json(fs, f"{root}/{MANIFEST}", asdict(manifest))
    return None


def remove_owned(fs, root: str, manifest: Manifest, files: list[str] | None = None) -> None:
    """Delete the files under ``root`` that ``manifest`` owns, the manifest last; others stay."""
    files = _files(fs, root) if files is None else files
    emptied = set()
    for name in files:
        if name != MANIFEST and manifest.owned(name):
            fs.rm(f"{root}/{name}")
            while "/" in name:  # the folders it was in (_pieces/, _ray/...), removed below once empty
                name = name.rsplit("/", 1)[0]
                emptied.add(name)
    for name in sorted(emptied, key=lambda n: -n.count("/")):  # deepest first
        if fs.isdir(f"{root}/{name}") and not fs.ls(f"{root}/{name}"):
            fs.rmdir(f"{root}/{name}")
    if MANIFEST in files:
        fs.rm(f"{root}/{MANIFEST}")


def update_manifest(output: str, manifest: Manifest) -> None:
    """Record more owned names (files whose names are known only when they are written)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    write_json(fs, f"{root.rstrip('/')}/{MANIFEST}", asdict(manifest))


def _names(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
