"""Model versions as Triton lays them out: ``<repo>/<model>/<version>/`` numbered folders.

A ``.onnx`` file whose folder's name is a positive integer is that version of its model; any
other file is version 1, so a flat folder of ``.onnx`` files, or a zoo build (one folder per
model), is a repository of version-1 models as it is.

``<model>/config.pbtxt`` (Triton's model configuration, text format) may set the model's
``version_policy``: ``latest { num_versions: N }`` (the default, N = 1), ``all {}`` or
``specific { versions: [...] }``. Only ``version_policy`` is read: inputs, outputs, states and
batching come from the model's contract. A version that fails to load is not counted: with
``latest``, the newest versions that load are served, so a broken new version leaves the one
before it serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rnnzoo.errors import InvalidArgument

KEY_SEP = "@"  # a version's key in the repository: "NAME@VERSION"


def key_of(name: str, version: int) -> str:
    return f"{name}{KEY_SEP}{version}"


def version_of_file(root: Path, f: Path) -> int:
    """The version a model file belongs to: its folder's number, else 1."""
    parent = f.parent
    if parent != root and parent.name.isdigit() and int(parent.name) > 0:
        return int(parent.name)
    return 1


def model_folder(root: Path, f: Path) -> Path:
    """The folder that holds a model's ``config.pbtxt``: the version folder's parent, or the
    file's own folder for an unversioned file."""
    parent = f.parent
    if parent != root and parent.name.isdigit():
        return parent.parent
    return parent


def version_files(root: Path, f: Path) -> Path:
    """The folder whose files make up ``f``'s version (what a change is detected in)."""
    return f.parent


@dataclass(frozen=True)
class VersionPolicy:
    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {{ num_versions: {self.num_versions} }}"
        if self.kind == "specific":
            return f"specific {{ versions: {list(self.versions)} }}"
        return "all"

    def wants(self, version: int) -> bool:
        """Could this version be served at all (``latest`` decides by what loads)?"""
        return self.kind != "specific" or version in self.versions

    def enough(self, ready: int) -> bool:
        """Loading newest first: are ``ready`` loaded versions all this policy serves?"""
        return self.kind == "latest" and ready >= self.num_versions


def read_policy(folder: Path) -> VersionPolicy:
    """``folder/config.pbtxt``'s version_policy (the default without one). A config that does
    not parse is InvalidArgument naming the file and the fix."""
    path = folder / "config.pbtxt"
    if not path.is_file():
        return VersionPolicy()
    from google.protobuf import text_format

    from rnnzoo.proto.inference.v2 import model_config_pb2 as mc

    try:
        config = text_format.Parse(path.read_text(), mc.ModelConfig(), allow_unknown_field=True)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"{path}: not a Triton model configuration in text format ({exc}); fix it or remove "
            "it (only version_policy is read from it)"
        ) from None
    if not config.HasField("version_policy"):
        return VersionPolicy()
    vp = config.version_policy
    which = vp.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy("all")
    if which == "specific":
        versions = tuple(sorted(int(v) for v in vp.specific.versions))
        if not versions or min(versions) < 1:
            raise InvalidArgument(
                f"{path}: version_policy specific lists {list(versions)}; list version "
                "numbers >= 1 (the numbered folders to serve)"
            )
        return VersionPolicy("specific", versions=versions)
    n = vp.latest.num_versions
    if n < 1:
        raise InvalidArgument(
            f"{path}: version_policy latest has num_versions {n}; set num_versions >= 1"
        )
    return VersionPolicy("latest", num_versions=n)


def fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What a version folder holds: (name, size, mtime) of each plain file in it, so a change
    on disk is seen without reading the files."""
    out = []
    try:
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                out.append((p.name, st.st_size, st.st_mtime_ns))
    except OSError:
        return ()
    return tuple(out)
