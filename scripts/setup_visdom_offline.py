"""Make `python -m visdom.server` start without internet access.

At start-up visdom downloads its JavaScript, CSS and fonts from CDNs into its own static folder
and refuses to run when that fails. The very same files are published as npm packages, so this
script fetches those packages with `npm pack` (npm reaches the package registry), copies each
file to the name visdom's downloader would have used, and writes `static/version.built` so that
visdom considers its static folder complete and skips the download.

    python scripts/setup_visdom_offline.py           # install the files (quick no-op when done)
    python scripts/setup_visdom_offline.py --check   # start a server on a free port, expect 200
    python scripts/setup_visdom_offline.py --force   # reinstall even when complete

With internet access none of this is needed: `python -m visdom.server` downloads the same files.
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from utils.visdom_server import VisdomServerError, free_port, start_server, stop_server, wait_for_index

# npm package -> {path inside the package: (visdom static sub-folder, file name visdom uses)}.
# The file names are those of visdom 0.2.4's download_scripts (visdom/server/build.py).
_NPM_FILES = {
    "jquery@3.1.1": {"dist/jquery.min.js": ("js", "jquery.min.js")},
    "bootstrap@3.3.7": {
        "dist/js/bootstrap.min.js": ("js", "bootstrap.min.js"),
        "dist/css/bootstrap.min.css": ("css", "bootstrap.min.css"),
        "dist/fonts/glyphicons-halflings-regular.eot": ("fonts", "glyphicons-halflings-regular.eot"),
        "dist/fonts/glyphicons-halflings-regular.woff2": ("fonts", "glyphicons-halflings-regular.woff2"),
        "dist/fonts/glyphicons-halflings-regular.woff": ("fonts", "glyphicons-halflings-regular.woff"),
        "dist/fonts/glyphicons-halflings-regular.ttf": ("fonts", "glyphicons-halflings-regular.ttf"),
        "dist/fonts/glyphicons-halflings-regular.svg":
            ("fonts", "glyphicons-halflings-regular.svg#glyphicons_halflingsregular"),
    },
    "react@16.2.0": {"umd/react.production.min.js": ("js", "react-react.min.js")},
    "react-dom@16.2.0": {"umd/react-dom.production.min.js": ("js", "react-dom.min.js")},
    "react-modal@3.1.10": {"dist/react-modal.min.js": ("js", "react-modal.min.js")},
    "plotly.js-dist-min@2.11.1": {"plotly.min.js": ("js", "plotly-plotly.min.js")},
    "sjcl@1.0.7": {"sjcl.js": ("js", "sjcl.js")},
    "layout-bin-packer@1.4.0": {
        "dist/layout-bin-packer.js.map": ("js", "layout-bin-packer.js.map"),
        "dist/layout-bin-packer.js": ("js", "layout_bin_packer.js"),
    },
    "d3@3.5.17": {"d3.min.js": ("js", "d3.v3.min.js")},
    "d3-selection-multi@1.0.1": {"build/d3-selection-multi.js": ("js", "d3-selection-multi.v1.js")},
    "save-svg-as-png@1.4.17": {"lib/saveSvgAsPng.js": ("js", "saveSvgAsPng.js")},
    "react-resizable@1.4.6": {"css/styles.css": ("css", "react-resizable-styles.css")},
    "react-grid-layout@0.16.3": {"css/styles.css": ("css", "react-grid-layout-styles.css")},
    # visdom saves the classnames bundle under fonts/ without an extension; keep its quirk.
    "classnames@2.2.5": {"index.js": ("fonts", "classnames")},
}

# MathJax files visdom fetches from cdnjs into static/js/mathjax/2.7.5/ (same relative paths).
_MATHJAX_PACKAGE = "mathjax@2.7.5"
_MATHJAX_DIR = os.path.join("js", "mathjax", "2.7.5")
_MATHJAX_FILES = (
    "config/Safe.js",
    "config/TeX-AMS-MML_HTMLorMML.js",
    "extensions/Safe.js",
    "jax/output/SVG/fonts/TeX/fontdata.js",
    "jax/output/SVG/jax.js",
    "jax/output/SVG/fonts/TeX/Size1/Regular/Main.js",
    "jax/output/SVG/config.js",
    "MathJax.js",
)


class SetupError(RuntimeError):
    """The static files could not be installed or the server check failed; the message says why."""


def visdom_static_dir():
    """The installed visdom package's static folder and version, without importing visdom."""
    # Importing visdom pulls in numpy and friends; finding the package is enough here.
    spec = importlib.util.find_spec("visdom")
    if spec is None or spec.origin is None:
        raise SetupError("visdom is not installed in this Python; install the requirements first "
                         "(pip install -r requirements.txt)")
    package_dir = os.path.dirname(spec.origin)
    with open(os.path.join(package_dir, "VERSION")) as handle:
        version = handle.read().strip()
    return os.path.join(package_dir, "static"), version


def _targets(static_dir):
    """{npm package: [(member path in the package, absolute destination)]}."""
    targets = {}
    for package, files in _NPM_FILES.items():
        targets[package] = [(member, os.path.join(static_dir, sub, name))
                            for member, (sub, name) in files.items()]
    targets[_MATHJAX_PACKAGE] = [(member, os.path.join(static_dir, _MATHJAX_DIR, member))
                                 for member in _MATHJAX_FILES]
    return targets


def is_complete(static_dir, version):
    """True when every file is present and version.built names this visdom version."""
    built = os.path.join(static_dir, "version.built")
    if not os.path.isfile(built):
        return False
    with open(built) as handle:
        if handle.read().strip() != version:
            return False
    return all(os.path.isfile(dest) for pairs in _targets(static_dir).values() for _, dest in pairs)


def _npm_pack(packages, workdir):
    """Download the package tarballs into ``workdir``; returns {package: tarball path}."""
    if shutil.which("npm") is None:
        raise SetupError("npm is not installed; install Node.js/npm (e.g. apt-get install npm), "
                         "or run `python -m visdom.server` once with internet access instead")
    cmd = ["npm", "pack", "--silent", *packages]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SetupError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                         f"{proc.stderr.strip()[-2000:]}")
    # npm pack prints one tarball name per package, in order.
    names = [line.strip() for line in proc.stdout.splitlines() if line.strip().endswith(".tgz")]
    if len(names) != len(packages):
        raise SetupError(f"npm pack returned {len(names)} tarballs for {len(packages)} packages: "
                         f"{proc.stdout.strip()}")
    return {pkg: os.path.join(workdir, name) for pkg, name in zip(packages, names)}


def _copy_member(tar, package, member, dest):
    # npm tarballs put every file under "package/"; read by name, so no path from the archive
    # decides where anything is written.
    try:
        source = tar.extractfile("package/" + member)
    except KeyError:
        source = None
    if source is None:
        raise SetupError(f"{package}: the tarball has no file {member}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".part"
    with source, open(tmp, "wb") as out:
        shutil.copyfileobj(source, out)
    os.replace(tmp, dest)


def install(force=False):
    """Install the static files into visdom's folder; returns the folder."""
    static_dir, version = visdom_static_dir()
    if not force and is_complete(static_dir, version):
        print(f"visdom static files already complete in {static_dir}; nothing to do.")
        return static_dir
    if not os.access(static_dir, os.W_OK):
        raise SetupError(f"cannot write to {static_dir}; run with a user that owns the "
                         f"Python environment")
    targets = _targets(static_dir)
    print(f"Fetching {len(targets)} npm packages for visdom {version} ...")
    with tempfile.TemporaryDirectory(prefix="visdom_npm_") as workdir:
        tarballs = _npm_pack(list(targets), workdir)
        for package, pairs in targets.items():
            with tarfile.open(tarballs[package], "r:gz") as tar:
                for member, dest in pairs:
                    _copy_member(tar, package, member, dest)
    # Written last: visdom trusts this marker and then downloads nothing.
    built = os.path.join(static_dir, "version.built")
    with open(built + ".part", "w") as handle:
        handle.write(version)
    os.replace(built + ".part", built)
    count = sum(len(pairs) for pairs in targets.values())
    print(f"Installed {count} files into {static_dir}; `python -m visdom.server` now starts offline.")
    return static_dir


def check():
    """Start a server on a free port, fetch its index page, expect 200."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="visdom_check_") as env_path, \
            tempfile.TemporaryFile(mode="w+") as log:
        proc = start_server(port, env_path, log)
        try:
            status = wait_for_index(port, proc)
        except VisdomServerError as err:
            log.seek(0)
            raise SetupError(f"{err}\nserver output:\n{log.read()[-3000:]}") from None
        finally:
            stop_server(proc)
    if status != 200:
        raise SetupError(f"the visdom index page answered HTTP {status}, expected 200 "
                         f"(tornado 6.6 gives 403: install tornado<6.6)")
    print(f"OK: visdom server on 127.0.0.1:{port} answered 200.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="after installing, start a server on a free port and expect HTTP 200")
    parser.add_argument("--force", action="store_true", help="reinstall even when complete")
    args = parser.parse_args(argv)
    try:
        install(force=args.force)
        if args.check:
            check()
    except (SetupError, VisdomServerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
