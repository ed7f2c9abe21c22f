"""README.md shows real output: its tour, pipeline report, CLI example, diffs and `>>>` examples are re-run and compared."""

from __future__ import annotations

import contextlib
import doctest
import io
import re
from pathlib import Path

import pytest
import torch
import torchvision

import fxtune
from fxtune.cli import main
from fxtune.passes import fold_bn

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)


def block_after(start: str) -> tuple[str, str]:
    """(code, the plain block right after it) for the python block beginning with `start`."""
    for index, (lang, text) in enumerate(BLOCKS):
        if lang == "python" and text.startswith(start):
            return text, BLOCKS[index + 1][1] if index + 1 < len(BLOCKS) and not BLOCKS[index + 1][0] else ""
    raise AssertionError(f"README has no python block starting with {start!r}")


def plain_block(start: str) -> str:
    found = [text for lang, text in BLOCKS if not lang and text.startswith(start)]
    assert found, f"README has no output block starting with {start!r}"
    return found[0]


def run(code: str, namespace: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    return out.getvalue()


def without_last_column(table: str) -> list[str]:
    """A tabulate table's lines with the final column (seconds, which vary) cut off."""
    return [line.rsplit(None, 1)[0] if line.strip() else line for line in table.strip().splitlines()]


@pytest.fixture(scope="module")
def tour() -> dict:
    torch.manual_seed(0)
    namespace: dict = {}
    code, shown = block_after("import torch, torchvision, fxtune")
    assert run(code, namespace).strip() == shown.strip()
    return namespace


def test_the_tour_prints_what_the_readme_shows_and_trains_and_fuses(tour):
    diff = fxtune.diff(fxtune.trace(tour["model"]), tour["gm"]).splitlines()
    shown = plain_block("--- before\n+++ after\n@@ -50,19 +50,39 @@").splitlines()
    assert [line for line in shown[3:] if line not in diff] == []
    namespace = dict(tour, images=torch.randn(2, 3, 64, 64), labels=torch.tensor([1, 7]))
    code, _ = block_after("opt = torch.optim.AdamW(fxtune.trainable_parameters(gm)")
    run(code, namespace)  # its own assert: fused.code == fxtune.trace(model).code


def test_the_pipeline_report_is_the_readme_table(tour):
    code, shown = block_after("import functools\npipe = fxtune.Pipeline(")
    printed = run(code, dict(tour, lora=fxtune.passes.lora, fuse=fxtune.passes.fuse))
    assert without_last_column(printed) == without_last_column(shown)


def test_the_cli_example_prints_the_readme_table(capsys):
    shown = plain_block("$ fxtune apply torchvision:resnet18 --pass fold_bn")
    command, table = shown.split("\n", 1)
    assert main(command.split()[2:]) == 0
    assert without_last_column(capsys.readouterr().out) == without_last_column(table)


def test_the_fold_bn_diff_excerpt_is_real():
    model = torchvision.models.resnet18().eval()
    gm = fxtune.trace(model)
    diff = fxtune.diff(gm, fold_bn(gm)).splitlines()
    shown = plain_block("--- before\n+++ after\n@@ -1,69 +1,49 @@").splitlines()
    assert shown[2] in diff and [line for line in shown[3:] if line not in diff] == []


class TwoLayers(torch.nn.Module):
    """The model of the README's Passes section."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def shown_diff_is_real(start: str, before: torch.fx.GraphModule, after: torch.fx.GraphModule) -> None:
    """The README's diff equals the real one, up to the traced signature's type annotations."""
    shown = plain_block(start).strip().splitlines()
    real = fxtune.diff(before, after).replace("x : torch.Tensor) -> torch.Tensor:", "x):").strip().splitlines()
    assert shown == [line.rstrip() for line in real]


def test_the_pass_diffs_are_real_output():
    from fxtune.passes import dora, ia3, low_rank

    gm = fxtune.trace(TwoLayers())
    both = ia3(ia3(gm, targets="fc1"), targets="fc2", position="input", adapter="ff")
    shown_diff_is_real("--- before\n+++ after\n@@ -1,6 +1,10 @@", gm, both)
    shown_diff_is_real("--- before\n+++ after\n@@ -1,5 +1,6 @@", gm, low_rank(gm, "fc1", rank=0.5))
    shown_diff_is_real("--- before\n+++ after\n@@ -1,6 +1,17 @@", gm, dora(gm, targets="fc1", r=4))


def test_the_interactive_examples_are_real_output(tmp_path, monkeypatch):
    """Every `>>>` block, run as a doctest on the Passes section's model."""
    import safetensors.torch

    import fxtune.passes

    monkeypatch.chdir(tmp_path)  # save_adapters(g, "out") writes here
    examples = [text for lang, text in BLOCKS if not lang and text.startswith(">>> ")]
    assert len(examples) >= 4
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for index, text in enumerate(examples):
        torch.manual_seed(0)
        names = {"gm": fxtune.trace(TwoLayers()), "torch": torch, "fxtune": fxtune, "safetensors": safetensors}
        names.update((name, getattr(fxtune.passes, name)) for name in fxtune.passes.__all__)
        test = parser.get_doctest(text, names, f"README example {index}", "README.md", 0)
        out = io.StringIO()
        result = runner.run(test, out=out.write)
        assert result.failed == 0, out.getvalue()


def test_the_hugging_face_example_prints_what_the_readme_shows():
    code, shown = block_after("import re, torch, transformers, fxtune")
    assert run(code, {}).strip() == shown.strip()
