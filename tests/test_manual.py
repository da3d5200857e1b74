"""The documentation generated from the key table (spfpolicy.manual): every
key documented, the four generated files up to date, the man pages free of
warnings in man(1) and mandoc(1), and a built wheel installing them where
man(1) finds them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from spfpolicy import config, manual
from spfpolicy.config import DEFAULTS, Origin, documented_keys, parse_key

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "man" / "spfpolicy.8", ROOT / "man" / "spfpolicy.conf.5"]
KEYS = documented_keys()
REGENERATE = "run `python -m spfpolicy.manual` and commit the result"

# Numeric keys whose number is a code, a mode or a level, not a quantity.
UNITLESS_NUMBERS = {"debugLevel", "TestOnly", "defaultSeedOnly", "UMask", "Socket_Mode"}


def test_every_key_is_documented() -> None:
    undocumented = [key.name for key in KEYS if not key.doc.strip()]
    assert not undocumented, f"keys without a doc in config._KEYS: {undocumented}"


def test_every_quantity_has_a_unit() -> None:
    types = {f.name: str(f.type) for f in dataclasses.fields(config.Settings)}
    numeric = [k for k in KEYS if types[k.field].split(" ")[0] in ("int", "float")]
    missing = [k.name for k in numeric if not k.unit and k.name not in UNITLESS_NUMBERS]
    assert not missing, f"numeric keys without a unit in config._KEYS: {missing}"


@pytest.mark.parametrize("key", [pytest.param(k, id=k.name) for k in KEYS])
def test_documented_default_is_the_default(key: config.KeyDoc) -> None:
    # What the documentation shows, read back by the key's own parser, is
    # what Settings() holds: a default cannot be shown wrong.
    if key.name == "Per_User":  # its text names a file, read by load_settings
        assert key.default == "" and DEFAULTS.per_user is None
        return
    assert parse_key(key.name, key.default) == getattr(DEFAULTS, key.field)


def test_origins_follow_the_table_order() -> None:
    # policyd-spf's keys first, then ours: the sections of the example file
    # and the man page are in the table's order.
    theirs = [k.origin is not Origin.SPFPOLICY for k in KEYS]
    assert theirs == sorted(theirs, reverse=True)


def test_summaries_are_one_short_sentence() -> None:
    long = [k.name for k in KEYS if len(manual.summary(k.doc)) > 160]
    assert not long, f"first sentence too long for the README table: {long}"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in manual.expected_files(ROOT)])
def test_generated_file_is_up_to_date(path: Path) -> None:
    expected = manual.expected_files(ROOT)[path]
    assert path.exists(), f"{path} is missing: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == expected, f"{path} is stale: {REGENERATE}"


def test_every_key_is_in_every_file() -> None:
    conf = (ROOT / "conf" / "spfpolicy.conf").read_text(encoding="utf-8")
    page = (ROOT / "man" / "spfpolicy.conf.5").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    keys_list = readme[readme.index(manual.README_BEGIN) : readme.index(manual.README_END)]
    for key in KEYS:
        assert f"\n#{key.name} =" in conf, f"{key.name} missing from conf/spfpolicy.conf"
        roff_name = key.name.replace("-", "\\-")
        assert f'\n.B "{roff_name}"\n' in page, f"{key.name} missing from spfpolicy.conf.5"
        assert f"| `{key.name}` |" in keys_list, f"{key.name} missing from README's key list"


def test_example_conf_gives_the_defaults(tmp_path: Path) -> None:
    text = (ROOT / "conf" / "spfpolicy.conf").read_text(encoding="utf-8")
    as_is = config.load_settings(ROOT / "conf" / "spfpolicy.conf", hostname=lambda: "mx.example")
    assert as_is == DEFAULTS.replace(authserv_id="mx.example")
    # Every "#Key = default" line, uncommented, loads to the defaults too.
    names = {k.name for k in KEYS} - {"Per_User"}
    lines = [
        line[1:]
        for line in text.splitlines()
        if line.startswith("#") and line[1:].split(" =")[0] in names
    ]
    uncommented = tmp_path / "all.conf"
    uncommented.write_text("\n".join(lines) + "\n")
    got = config.load_settings(uncommented, hostname=lambda: "mx.example")
    assert got == DEFAULTS.replace(authserv_id="mx.example")


def test_manual_check_mode_reports_a_stale_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "README.md").write_text(f"x\n{manual.README_BEGIN}\n{manual.README_END}\ny\n")
    assert manual.main(["--check", str(tmp_path)]) == 1
    assert "stale" in capsys.readouterr().err
    assert manual.main([str(tmp_path)]) == 0
    assert manual.main(["--check", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("x\n") and readme.endswith("\ny\n")
    assert "| `Listen` |" in readme


# ------------------------------------------------------------------ rendering


def _man_warnings(page: Path) -> tuple[str, str]:
    man = shutil.which("man")
    if man is None:
        pytest.skip("man is not installed (Debian package: man-db)")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MANPAGER": "cat"}
    # --warnings=w: every groff warning, undefined macros included.
    done = subprocess.run(
        [man, "--warnings=w", "-E", "UTF-8", "-l", str(page)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def _mandoc_warnings(page: Path) -> tuple[str, str]:
    mandoc = shutil.which("mandoc")
    if mandoc is None:
        pytest.skip("mandoc is not installed (Debian package: mandoc)")
    lint = subprocess.run(
        [mandoc, "-T", "lint", "-W", "all", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    shown = subprocess.run(
        [mandoc, "-T", "utf8", str(page)], capture_output=True, text=True, timeout=60, check=True
    )
    plain = re.sub(".\x08", "", shown.stdout)  # without the overstrike of bold text
    return plain, lint.stdout + lint.stderr


Render = Callable[[Path], tuple[str, str]]  # page -> (text shown, warnings)
RENDERERS = [
    pytest.param(_man_warnings, id="man"),
    pytest.param(_mandoc_warnings, id="mandoc"),
]


@pytest.mark.parametrize("render", RENDERERS)
@pytest.mark.parametrize("page", [pytest.param(p, id=p.name) for p in PAGES])
def test_page_renders_without_warnings(render: Render, page: Path) -> None:
    shown, warnings = render(page)
    assert warnings == ""
    assert "NAME" in shown and "SEE ALSO" in shown


@pytest.mark.parametrize("render", RENDERERS)
def test_renderers_do_report_warnings(render: Render, tmp_path: Path) -> None:
    # The check above is only worth something if a bad page fails it.
    bad = tmp_path / "bad.8"
    bad.write_text('.TH BAD 8 2026-01-01 "x" "y"\n.SH NAME\nbad \\- x\n.SH SEE ALSO\n.foo\n')
    _, warnings = render(bad)
    assert "foo" in warnings


def test_conf_page_shows_every_default() -> None:
    rendered, _ = _man_warnings(PAGES[1])
    flat = " ".join(rendered.split())
    for key in KEYS:
        if key.default and " " not in key.default:
            assert f"Default: {key.default}" in flat, key.name


# ------------------------------------------------------------------ installing


@pytest.mark.slow
def test_wheel_installs_the_pages_where_man_finds_them(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("spfpolicy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        data = {n.split(".data/data/", 1)[1] for n in archive.namelist() if ".data/data/" in n}
        assert archive.read(next(n for n in archive.namelist() if n.endswith("/spfpolicy.8")))
    assert {"share/man/man8/spfpolicy.8", "share/man/man5/spfpolicy.conf.5"} <= data

    prefix = tmp_path / "prefix"
    # --ignore-installed: without it, pip would first uninstall the
    # spfpolicy this test runs from.
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed"]
    subprocess.run(
        [*install, "--prefix", str(prefix), str(wheel)],
        capture_output=True,
        timeout=300,
        check=True,
    )
    for page in PAGES:
        installed = prefix / "share" / "man" / f"man{page.suffix[1:]}" / page.name
        assert installed.read_bytes() == page.read_bytes()
    man = shutil.which("man")
    if man is None:
        pytest.skip("man is not installed (Debian package: man-db)")
    # man-db looks in <dir>/../share/man for each <dir> of PATH, as for a
    # virtualenv whose bin/ is on PATH.
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "MANOPT")}
    env["PATH"] = f"{prefix / 'bin'}:/usr/bin:/bin"
    found = subprocess.run(
        [man, "-w", "spfpolicy", "spfpolicy.conf"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert found.stdout.split() == [
        str(prefix / "share" / "man" / "man8" / "spfpolicy.8"),
        str(prefix / "share" / "man" / "man5" / "spfpolicy.conf.5"),
    ]
