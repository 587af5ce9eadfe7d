"""The README's transcript of a dry run is what the code prints, numbers and elided lines aside."""

import re

import fine_tuning as ft
from conftest import ROOT, run


def transcript():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What a run prints") :]
    return section.split("```\n")[1].splitlines()


def shape(line):
    """A line without what depends on floating point: its numbers (and the widths they take), the
    class names (the most confused pairs differ between CPUs) and the best-epoch mark."""
    line = re.sub("|".join(ft.CIFAR10_CLASSES), "CLASS", line.replace("* best", ""))
    return " ".join(re.sub(r"\d+(?:[.,:]\d+)*", "#", line).split())


def test_the_readme_transcript_is_what_a_dry_run_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the transcript shows the default, relative runs/ folder
    code, out, err = run(capsys, "--dry-run")
    assert code == 0, err
    printed = [shape(line) for line in out.splitlines()]
    at = 0
    chunks = "\n".join(transcript()).split("\n...\n")
    assert len(chunks) >= 2 and len(transcript()) > 20
    for chunk in chunks:
        wanted = [shape(line) for line in chunk.splitlines()]
        starts = [i for i in range(at, len(printed)) if printed[i : i + len(wanted)] == wanted]
        assert starts, f"not printed, in this order and together:\n{chunk}\n--- printed:\n{out}"
        at = starts[0] + len(wanted)


def test_the_readmes_lessons_follow_the_quick_start_and_are_the_codes_sections():
    readme = (ROOT / "README.md").read_text()
    sections = re.findall(r"^## (.+)$", readme, re.MULTILINE)
    assert sections[:2] == ["Quick start", "The lessons, in the order of the code"]
    lessons = readme[readme.index("## The lessons") :].split("\n## ")[0]
    code = (ROOT / "fine_tuning.py").read_text()
    in_code = re.findall(r"^# === (\d+\. .+?) =+$", code, re.MULTILINE)
    assert re.findall(r"^### (.+)$", lessons, re.MULTILINE) == in_code
    assert len(in_code) == 8


def test_the_quick_start_installs_the_right_torch_on_windows_with_an_nvidia_gpu():
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start") : readme.index("## The lessons")]
    assert "index-url https://download.pytorch.org/whl/cpu     # no NVIDIA GPU" in quick
    assert re.search(
        r"index-url https://download.pytorch.org/whl/cu\d+ +# Windows \+ NVIDIA", quick
    )
    assert "PyPI's torch for Windows is CPU-only" in quick
