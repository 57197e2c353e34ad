"""Which app a site runs: the FAB a run brings is *inspected*, never executed.

Flower installs the app bundle (FAB) that a ``flwr run`` submitter sends and imports *its*
ClientApp at every SuperNode (``flwr/supernode/runtime/run_clientapp.py``: ``install_from_fab``
then ``load_client_app_fn(run.fab_id, run.fab_version, fab.hash_str)``), so whoever reaches the
SuperLink's Control API runs code at every site.  A fedmm site never does that: its own process
(``deploy/trusted_clientapp.py``) reads the FAB's ``pyproject.toml`` from the zip bytes, checks it
here, and then runs **the fedmm ClientApp installed at the site**.  The FAB contributes its run
config (``[tool.flwr.app.config]``, which Flower's SuperNode already parses as TOML) and nothing
else.

A FAB is accepted when

* its ``pyproject.toml`` declares ``[project] name = "fedmm"``, a ``version`` equal to the fedmm
  installed at the site (``fedmm.__version__``) and ``[tool.flwr.app.components] clientapp =
  "fedmm.federation.clientapp:app"``;
* the site lists ``trusted-apps`` (``site.toml``), its **app hash** is one of them.

The app hash (``app_hash``) is a SHA-256 over the FAB's *uncompressed* members: for each member,
sorted by name, ``name NUL sha256(bytes) LF``.  It, not the SHA-256 of the FAB file (Flower's
"FAB hash"), is what a consortium pins: Flower's build is deterministic in its file order and
dates (``flwr/cli/build.py``: ``filtered_paths.sort()``, ``FAB_DATE``), but its bytes are
DEFLATE output, which differs between zlib and zlib-ng builds of the same files -- the same
release built on two distributions would have two FAB hashes and one app hash.
``fedmm app-hash DIR`` prints both for a project directory (``build_app``, Flower's own build).
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

CLIENTAPP = "fedmm.federation.clientapp:app"  # the only ClientApp a fedmm site runs
PROJECT = "fedmm"
MAX_PYPROJECT_BYTES = 1 << 20  # a pyproject.toml larger than 1 MiB is not a fedmm app
MAX_UNCOMPRESSED_BYTES = 256 << 20  # a FAB is at most 10 MB zipped (Flower's FAB_MAX_SIZE)


@dataclass(frozen=True)
class Verdict:
    """What a site decided about one FAB.

    ``fab_hash``: SHA-256 (hex) of the FAB bytes as received (Flower's FAB hash).
    ``app_hash``: the app hash (module docstring), "" when the zip could not be read.
    ``reason``: "" when accepted, else one sentence saying what is wrong and what to do."""

    accepted: bool
    reason: str
    fab_hash: str
    app_hash: str
    name: str = ""
    version: str = ""
    clientapp: str = ""


def fab_hash(content: bytes) -> str:
    """SHA-256 (hex) of the FAB bytes: what Flower calls the FAB hash."""
    return hashlib.sha256(content).hexdigest()


def app_hash(content: bytes) -> str:
    """The app hash of a FAB (module docstring): independent of the compressor.

    Raises ``ValueError`` for a FAB that is not a zip, holds a member name twice (which copy an
    installer would take is not defined), unpacks to more than ``MAX_UNCOMPRESSED_BYTES`` or
    cannot be unpacked at all (an unknown compression method, an encrypted member, ...)."""
    try:
        return _app_hash(content)
    except ValueError:
        raise
    except Exception as exc:  # zipfile raises NotImplementedError, RuntimeError, ... on tricks
        raise ValueError(f"a member cannot be unpacked ({type(exc).__name__}: {exc})") from None


def _app_hash(content: bytes) -> str:
    """The app hash of a FAB (module docstring): independent of the compressor.

    Raises ``ValueError`` for a FAB that is not a zip, holds a member name twice (which copy an
    installer would take is not defined), or unpacks to more than ``MAX_UNCOMPRESSED_BYTES``."""
    lines, total = [], 0
    with _open_zip(content) as fab:
        names = [info.filename for info in fab.infolist() if not info.is_dir()]
        if len(names) != len(set(names)):
            raise ValueError("the FAB holds a member name twice")
        for name in sorted(names):
            digest = hashlib.sha256()
            with fab.open(name) as member:
                while chunk := member.read(1 << 20):
                    total += len(chunk)
                    if total > MAX_UNCOMPRESSED_BYTES:
                        raise ValueError(
                            f"the FAB unpacks to more than {MAX_UNCOMPRESSED_BYTES >> 20} MiB"
                        )
                    digest.update(chunk)
            lines.append(f"{name}\0{digest.hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def inspect_fab(
    content: bytes, trusted_apps: tuple[str, ...] | list[str] = (), version: str | None = None
) -> Verdict:
    """Decide whether a site runs its own fedmm ClientApp for a run that brought ``content``.

    Reads the zip and TOML only: nothing of the FAB is imported, installed or executed.
    ``trusted_apps``: the site's ``trusted-apps`` (app hashes, hex); empty = any FAB that
    declares fedmm's ClientApp at the site's version.  ``version``: the fedmm version installed at
    the site (default ``fedmm.__version__``).  Never raises for a bad FAB: that is a refusal."""
    if version is None:
        from fedmm import __version__ as version
    fhash = fab_hash(content)
    try:
        ahash = app_hash(content)
        config = _pyproject(content)
    except ValueError as exc:
        return Verdict(False, f"the FAB cannot be read: {exc}", fhash, "")
    project = _table(config, "project")
    name, ver = str(project.get("name", "")), str(project.get("version", ""))
    clientapp = str(_table(config, "tool", "flwr", "app", "components").get("clientapp", ""))
    verdict = Verdict(True, "", fhash, ahash, name, ver, clientapp)
    if clientapp != CLIENTAPP or name != PROJECT:
        why = (f"the run's app declares ClientApp {clientapp or '(none)'!r} of project "
               f"{name or '(none)'!r}; this site runs only fedmm's own ClientApp ({CLIENTAPP!r}, "
               f"project {PROJECT!r})")  # fmt: skip
    elif ver != version:
        why = (f"the run's app is fedmm {ver or '(no version)'}; this site has fedmm {version}: "
               "submit the run from a fedmm checkout of the site's version")  # fmt: skip
    elif trusted_apps and ahash not in trusted_apps:
        why = (f"the run's app hash {ahash} is not in this site's trusted-apps; the consortium "
               "pins its app with `fedmm app-hash DIR`, the site lists that hash")  # fmt: skip
    else:
        return verdict
    return Verdict(False, why, fhash, ahash, name, ver, clientapp)


def build_app(app_dir: str | Path) -> bytes:
    """The FAB that ``flwr run APP_DIR`` would send (Flower's own ``build_fab_from_disk``).

    Raises ``ValueError`` naming the directory when it is not a Flower app."""
    from flwr.cli.build import build_fab_from_disk

    app_dir = Path(app_dir)
    if not (app_dir / "pyproject.toml").is_file():
        raise ValueError(f"{app_dir}: no pyproject.toml; give the fedmm project directory")
    try:
        return build_fab_from_disk(app_dir)
    except Exception as exc:  # Flower raises ValueError and its own path errors
        raise ValueError(f"{app_dir}: Flower cannot build this app: {exc}") from None


def describe_app(app_dir: str | Path) -> str:
    """``fedmm app-hash DIR``: the app hash (what a site lists in ``trusted-apps``), the FAB
    hash, and what a fedmm site would decide about the app.  ``ConfigError`` naming the
    directory when Flower cannot build it."""
    from fedmm.config import ConfigError

    try:
        fab = build_app(app_dir)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    verdict = inspect_fab(fab)
    lines = [f"app hash: {verdict.app_hash}", f"FAB hash: {verdict.fab_hash}",
             f"app: {verdict.name} {verdict.version}, ClientApp {verdict.clientapp}"]  # fmt: skip
    if verdict.accepted:
        lines.append(f'a fedmm site pins it with: trusted-apps = ["{verdict.app_hash}"]')
    else:
        lines.append(f"a fedmm site refuses it: {verdict.reason}")
    return "\n".join(lines)


def _open_zip(content: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise ValueError(f"not a zip archive ({exc})") from None


def _table(config: dict, *keys: str) -> dict:
    """``config[k1][k2]...``, or {} where a key is missing or not a table."""
    for key in keys:
        config = config.get(key) if isinstance(config, dict) else None
    return config if isinstance(config, dict) else {}


def _pyproject(content: bytes) -> dict:
    """The FAB's ``pyproject.toml`` as TOML (``ValueError`` when missing or not TOML)."""
    with _open_zip(content) as fab:
        try:
            info = fab.getinfo("pyproject.toml")
        except KeyError:
            raise ValueError("it has no pyproject.toml") from None
        if info.file_size > MAX_PYPROJECT_BYTES:
            raise ValueError(f"its pyproject.toml is larger than {MAX_PYPROJECT_BYTES} bytes")
        try:
            return tomllib.loads(fab.read(info).decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, zipfile.BadZipFile) as exc:
            raise ValueError(f"its pyproject.toml is not valid TOML ({exc})") from None
        except Exception as exc:  # an unknown compression method, an encrypted member, ...
            raise ValueError(
                f"its pyproject.toml cannot be unpacked ({type(exc).__name__})"
            ) from None
