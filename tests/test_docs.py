"""The documentation does what it says: the README's Python snippets run as pasted against a real
server, ``GET /healthz`` answers as docs/service-api.md says, the bash completion line of
docs/cli.md completes in a real bash, and the docs' relative links and anchors resolve."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests._server import RunningServer, start_server

ROOT = Path(__file__).parent.parent


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}


def _fenced(text: str, language: str) -> list[str]:
    """The code blocks of ``language`` in a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def _promised_output(block: str) -> list[str]:
    """What a snippet says it prints: the trailing comment of each ``print(...)`` line."""
    return [line.split("  # ", 1)[1] for line in block.splitlines() if "print(" in line and "  # " in line]


def test_the_readme_python_snippets_run_as_pasted(tmp_path: Path) -> None:
    """Run from the directory holding ``data`` (what ``make run`` uses), after the README's shell
    step that enrolls my-first-device; each snippet prints what its comments say."""
    blocks = _fenced((ROOT / "README.md").read_text(), "python")
    assert len(blocks) >= 2
    running = start_server(tmp_path / "data")
    try:
        with running.client() as admin:  # `provisiond enrollment create my-first-device`
            admin.put(
                "/enrollments/my-first-device",
                {"registrationId": "my-first-device", "attestation": {"type": "symmetricKey"}},
            )
        for block in blocks:
            done = subprocess.run(
                [sys.executable, "-c", block],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                env=_env(),
                timeout=120,
            )
            assert done.returncode == 0, (block, done.stderr)
            promised = _promised_output(block)
            assert promised, block  # every snippet shows what it prints
            assert done.stdout.splitlines() == promised, block
    finally:
        running.stop()


def test_healthz_answers_as_documented(server: RunningServer) -> None:
    doc = (ROOT / "docs" / "service-api.md").read_text()
    found = re.search(r"`GET /healthz` answers `(\d{3})` with `(\{.*?\})`", doc)
    assert found, "docs/service-api.md documents GET /healthz"
    with server.http() as http:  # no Authorization, no api-version
        answer = http.get("/healthz")
    assert answer.status_code == int(found.group(1))
    assert answer.text == found.group(2)


def test_bash_completion_as_documented(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash, "bash is needed for this test"
    doc = (ROOT / "docs" / "cli.md").read_text()
    lines = [line for block in _fenced(doc, "sh") for line in block.splitlines() if "=bash_source" in line]
    assert len(lines) == 1, "docs/cli.md shows how to enable bash completion"
    setup = lines[0].split("  #", 1)[0].strip()
    # `provisiond` on the PATH, as the docs require: this interpreter with this checkout
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "provisiond"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m provisiond "$@"\n')
    wrapper.chmod(0o755)
    script = f"""{setup}
try_complete() {{ COMPREPLY=(); COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); _provisiond_completion provisiond; echo "${{COMPREPLY[*]}}"; }}
try_complete provisiond enr
try_complete provisiond hub sh
try_complete provisiond serve --https
"""
    env = {**_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([bash, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["enrollment", "show", "--https-port"], done.stderr


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, inline code marks and punctuation
    other than ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_anchor(heading) for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_relative_links_and_anchors_resolve() -> None:
    """Every relative link of the README, docs/ and samples/README.md names a file that exists,
    and its ``#anchor``, if any, a heading of that file."""
    pages = [ROOT / "README.md", ROOT / "samples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    checked = 0
    for page in pages:
        text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            name, _, anchor = target.partition("#")
            linked = (page.parent / name).resolve() if name else page
            checked += 1
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 100 and not broken, "\n".join(broken)
