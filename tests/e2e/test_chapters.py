"""Every chapter's solution notebook, run in JupyterLab in a real browser, as a student runs it.

For each chapter found in ``solutions/`` (new chapters are picked up without editing this file):
open the notebook in a fresh kernel, Run All, and check that no cell raised, every plot the kernel
sent is drawn as an image, and every widget is drawn as a widget (not as its text fallback). Then
move every control of every widget once — a slider by its smallest step that shows, a dropdown
to the next option, a click for a checkbox or button — and check that what it drives (an output
widget's text or plot, an HTML or label widget) changed, with no traceback in it.

Conventions this relies on, for chapter authors:
- a control must visibly change its outputs when moved one step from its default value (a slider
  up, or down when it starts at its maximum; a dropdown to the next option);
- widgets draw into ``widgets.Output`` / ``interact`` outputs, HTML or Label widgets in the same cell;
- controls the suite cannot move generically (Play, pickers, upload, ...) fail the test loudly:
  teach with sliders, dropdowns, toggles, checkboxes, radio buttons, text boxes or buttons.
"""

from __future__ import annotations

import time

import nbformat
import pytest

from grader.course import list_chapters
from tests.e2e.lab import REPO
from tests.e2e.notebook import FIGURE_REPR, IMAGE_MIMES, TRACEBACK, WIDGET_MIME, LabNotebook

CHAPTERS = list_chapters(REPO)
# Ceilings, far above normal, for a small and busy CI machine: the chapter format allows 2 minutes
# per chapter in quick mode on 2 idle cores.
RUN_ALL_TIMEOUT_S = 900
RENDER_TIMEOUT_S = 60
REACTION_TIMEOUT_S = 120


def widget_not_drawn(output: dict) -> bool:
    """A widget the kernel still holds that shows no widget view or an error instead."""
    if WIDGET_MIME not in output["mimes"] or output["closed"]:
        return False
    return output["widgetViews"] == 0 or "Error displaying widget" in output["text"]


def plot_not_drawn(output: dict) -> bool:
    return any(m in output["mimes"] for m in IMAGE_MIMES) and output["images"] == 0


def output_problems(cells: list[dict]) -> list[tuple[int, str]]:
    """What a student would see go wrong, as (cell index, message): cells not run, errors,
    plots or widgets not drawn."""
    problems = []
    for cell in cells:
        source = cell["source"].strip()
        if cell["type"] != "code":
            continue
        where = f"cell {cell['index']}" + (f" ({source.splitlines()[0][:60]!r})" if source else "")
        found = []
        if source and cell["executionCount"] is None:
            found.append(f"{where} did not run")
        for output in cell["outputs"]:
            if output["error"]:
                found.append(f"{where} raised {output['error']}")
            elif widget_not_drawn(output):
                found.append(f"{where}: a widget was not drawn (shown: {output['text'][:200]!r})")
            elif plot_not_drawn(output):
                found.append(f"{where}: a plot was not drawn as an image")
            if FIGURE_REPR in output["text"]:
                found.append(f"{where}: a figure shown as text, not drawn: {output['text'][:100]!r}")
        problems += [(cell["index"], message) for message in found]
    return problems


def wait_for_rendering(notebook: LabNotebook, timeout_s: float) -> list[dict]:
    """The cells once every plot and widget the kernel sent is drawn (widget views draw
    asynchronously after the cell finished), or as they are at the time limit."""
    deadline = time.monotonic() + timeout_s
    while True:
        cells = notebook.cells()
        pending = [o for c in cells for o in c["outputs"] if widget_not_drawn(o) or plot_not_drawn(o)]
        if not pending or time.monotonic() > deadline:
            return cells
        time.sleep(0.5)


def widget_cells(cells: list[dict]) -> list[int]:
    return [c["index"] for c in cells
            if any(WIDGET_MIME in o["mimes"] and not o["closed"] for o in c["outputs"])]


def interaction_problems(notebook: LabNotebook, index: int,
                         timeout_s: float = REACTION_TIMEOUT_S) -> tuple[list[str], int]:
    """Move every control in cell ``index`` once; (problems, number of controls moved)."""
    problems = []
    notebook.wait_until_settled(index, timeout_s)  # interact's first drawing
    controls = notebook.controls(index)
    for control in controls:
        before = notebook.driven_state(index)
        value = notebook.move(control)
        if not notebook.wait_until_changed(index, before, timeout_s):
            problems.append(f"cell {index}: moving {control.label} to {value!r} changed nothing "
                            f"it drives within {timeout_s:g} s")
            continue
        after = notebook.driven_state(index)
        if TRACEBACK in after:
            problems.append(f"cell {index}: after moving {control.label} to {value!r} it shows "
                            f"an error:\n{after[after.index(TRACEBACK) - 100:][:1500]}")
        if FIGURE_REPR in after:
            problems.append(f"cell {index}: after moving {control.label} a figure is shown as text")
        if notebook.broken_images(index):
            problems.append(f"cell {index}: after moving {control.label} an image did not load")
    return problems, len(controls)


BROKEN_CELLS = [
    "import ipywidgets as widgets\nimport matplotlib.pyplot as plt\nfrom IPython.display import display",
    # 1: a slider that drives nothing
    "widgets.interact(lambda n: print('always the same'),\n"
    "                 n=widgets.IntSlider(value=1, min=0, max=3, description='dead'));",
    # 2: a dropdown whose callback raises on any value but the first
    "def show(choice):\n    assert choice == 'a', f'cannot handle {choice}'\n    print(choice)\n\n\n"
    "widgets.interact(show, choice=widgets.Dropdown(options=['a', 'b'], description='crash'));",
    # 3: controls of five more kinds that do drive their output; the slider has no readout,
    # so its value is read from the slider itself
    "widgets.interact(lambda on, up, n, word, eps: print(on, up, n, word, f'{eps:.2f}'),\n"
    "                 on=widgets.Checkbox(description='on'), up=widgets.ToggleButton(description='up'),\n"
    "                 n=widgets.IntText(value=1, description='n'),\n"
    "                 word=widgets.Text(value='a', description='word'),\n"
    "                 eps=widgets.FloatSlider(value=0.1, min=0.01, max=0.9, step=0.01,\n"
    "                                         readout=False, continuous_update=False,\n"
    "                                         description='eps'));",
    # 4: a figure shown as its text, as with a non-inline backend
    "print(plt.figure(figsize=(2, 2)))",
    # 5: a plot that is drawn
    "plt.plot([1, 2, 3])\nplt.show()",
    # 6: a progress bar the kernel closes when done: rightly not drawn, no failure
    "from tqdm.auto import tqdm\n\nfor _ in tqdm(range(3), leave=False):\n    pass",
    # 7: an error
    "1 / 0",
]


def test_checks_catch_what_a_student_would_see_broken(page, lab_server):
    """The checks above fail on a notebook with the faults they look for, and on nothing else."""
    path = "selftest/broken.ipynb"
    notebook_file = lab_server.root / path
    notebook_file.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in BROKEN_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebook_file)
    notebook = LabNotebook(page)
    notebook.open(lab_server.lab_url(path, workspace="e2e-selftest"), path)

    assert notebook.run_all(RUN_ALL_TIMEOUT_S) is False  # the last cell raised
    cells = wait_for_rendering(notebook, RENDER_TIMEOUT_S)
    found = output_problems(cells)
    assert [index for index, _ in found] == [4, 7], found
    assert "a figure shown as text" in found[0][1] and "ZeroDivisionError" in found[1][1]
    assert widget_cells(cells) == [1, 2, 3]
    assert any(output["closed"] for output in cells[6]["outputs"]), cells[6]  # the closed bar

    dead, n_dead = interaction_problems(notebook, 1, timeout_s=5)
    assert n_dead == 1 and len(dead) == 1 and "moving slider 'dead'" in dead[0], dead
    crash, _ = interaction_problems(notebook, 2, timeout_s=60)
    assert len(crash) == 1 and "cannot handle b" in crash[0], crash
    working, n_working = interaction_problems(notebook, 3, timeout_s=60)
    assert (working, n_working) == ([], 5)


def test_chapters_found():
    assert len(CHAPTERS) >= 2, f"expected chapters 0 and 1 at least, found {CHAPTERS}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_solution_runs_and_widgets_respond(chapter, page, lab_server):
    path = f"solutions/{chapter}/{chapter}.ipynb"
    notebook = LabNotebook(page)
    notebook.open(lab_server.lab_url(path, workspace=f"e2e-{chapter}"), path)

    finished = notebook.run_all(RUN_ALL_TIMEOUT_S)
    cells = wait_for_rendering(notebook, RENDER_TIMEOUT_S)
    found = output_problems(cells)
    if found:
        notebook.show(found[0][0])
    problems = [message for _, message in found]
    if finished == "timeout":
        problems.insert(0, f"Run All did not finish in {RUN_ALL_TIMEOUT_S} s")
    elif finished is not True and not problems:
        problems.append(f"Run All reported failure ({finished!r}) but no cell shows an error")
    assert not problems, f"{chapter}:\n" + "\n".join(problems)

    moved = 0
    for index in widget_cells(cells):
        notebook.show(index)
        cell_problems, n_controls = interaction_problems(notebook, index)
        moved += n_controls
        problems += cell_problems
        if cell_problems:
            break  # keep the failing cell on screen for the screenshot
    assert not problems, f"{chapter}:\n" + "\n".join(problems)
    if widget_cells(cells):
        assert moved > 0, f"{chapter} shows widgets but none has a control that can be moved"
    print(f"{chapter}: {len(widget_cells(cells))} widget cells, {moved} controls moved")
