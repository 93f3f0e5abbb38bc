"""Driving one notebook in JupyterLab from Playwright: open, run, inspect, move widgets.

The lab runs with ``expose_app_in_browser``, so the notebook's model (its cells, outputs and
kernel) is read from ``window.jupyterapp``; what the student sees is read from the DOM. Comparing
the two is how a test knows that every plot and widget the kernel sent was actually drawn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from playwright.sync_api import Locator, Page

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")
TRACEBACK = "Traceback (most recent call last)"
# What a figure looks like when the kernel could not draw it inline (e.g. MPLBACKEND=Agg).
FIGURE_REPR = "<Figure size"

CURRENT_PANEL_JS = "window.jupyterapp.shell.currentWidget"

OPENED_JS = """(path) => {
    const app = window.jupyterapp;
    const panel = app && app.shell.currentWidget;
    return !!(panel && panel.context && panel.context.path === path && panel.context.isReady);
}"""

# Resolves when the kernel has started: "Run All" before that silently does nothing. (A page
# script has no time limit of its own: a kernel that never starts must not hang the suite.)
KERNEL_READY_JS = f"""async (timeoutMs) => {{
    const panel = {CURRENT_PANEL_JS};
    const timeout = new Promise(resolve => setTimeout(() => resolve("timeout"), timeoutMs));
    const ready = panel.sessionContext.ready.then(() => panel.sessionContext.session.kernel.status);
    return await Promise.race([ready, timeout]);
}}"""

KERNEL_STATUS_JS = f"""() => {{
    const session = {CURRENT_PANEL_JS}.sessionContext.session;
    return session && session.kernel ? session.kernel.status : "none";
}}"""

# The same command as Run > Run All Cells; it resolves to false when a cell raised.
RUN_ALL_JS = """async (timeoutMs) => {
    const app = window.jupyterapp;
    const timeout = new Promise(resolve => setTimeout(() => resolve("timeout"), timeoutMs));
    return await Promise.race([app.commands.execute("notebook:run-all-cells"), timeout]);
}"""

# One entry per cell: its model (type, execution count, outputs) beside what the DOM shows for
# each top-level output (JupyterLab renders output k of the model as the k-th output child).
CELLS_JS = f"""() => {{
    const panel = {CURRENT_PANEL_JS};
    return panel.content.widgets.map((cell, index) => {{
        const model = cell.model;
        const info = {{index, type: model.type, source: model.sharedModel.getSource(),
                       executionCount: null, outputs: []}};
        if (model.type !== "code") return info;
        info.executionCount = model.executionCount;
        const area = cell.node.querySelector(".jp-Cell-outputArea");
        const children = area ? Array.from(area.children).filter(
            node => node.classList.contains("jp-OutputArea-child")) : [];
        info.outputs = model.outputs.toJSON().map((output, k) => {{
            const node = children[k];
            const images = node ? Array.from(node.querySelectorAll("img, svg")) : [];
            const widget = output.data && output.data["{WIDGET_MIME}"];
            return {{
                outputType: output.output_type,
                widgetModel: widget ? widget.model_id : null,
                mimes: output.data ? Object.keys(output.data) : [],
                error: output.output_type === "error" ? `${{output.ename}}: ${{output.evalue}}` : null,
                rendered: !!node,
                widgetViews: node ? node.querySelectorAll(".jupyter-widgets").length : 0,
                images: images.filter(img => img.tagName.toLowerCase() === "svg"
                                      || (img.complete && img.naturalWidth > 0)).length,
                text: node ? node.innerText : "",
            }};
        }});
        return info;
    }});
}}"""

SOURCE_JS = f"(index) => {CURRENT_PANEL_JS}.content.widgets[index].model.sharedModel.getSource()"

# The ids of the widgets that exist in the kernel now. A widget the kernel closed (a tqdm bar
# with leave=False, widget.close()) legitimately shows nothing: its output is no failure.
OPEN_WIDGETS_JS = f"""async () => {{
    const kernel = {CURRENT_PANEL_JS}.sessionContext.session.kernel;
    const reply = await kernel.requestCommInfo({{target_name: "jupyter.widget"}});
    return Object.keys(reply.content.comms || {{}});
}}"""

# Everything in a cell's outputs that a widget could drive: output widgets (text and plots),
# HTML and label widgets, images. Not the controls' own readouts, which change with the control.
DRIVEN_JS = f"""(index) => {{
    const cell = {CURRENT_PANEL_JS}.content.widgets[index];
    const hash = text => {{
        let h = 0;
        for (let i = 0; i < text.length; i++) h = (h * 31 + text.charCodeAt(i)) | 0;
        return `${{text.length}}:${{h}}`;
    }};
    const parts = [];
    const driven = cell.node.querySelectorAll(
        ".widget-output, .widget-html-content, .widget-htmlmath-content, .widget-label-basic");
    for (const node of driven) {{
        parts.push(node.innerText);
        for (const img of node.querySelectorAll("img")) parts.push("img " + hash(img.src));
    }}
    for (const img of cell.node.querySelectorAll(".widget-image")) parts.push("img " + hash(img.src));
    return parts.join("\\n");
}}"""

# Images in a cell's widget outputs that failed to load (a broken PNG shows as an empty box).
BROKEN_IMAGES_JS = f"""(index) => {{
    const cell = {CURRENT_PANEL_JS}.content.widgets[index];
    return Array.from(cell.node.querySelectorAll(".jp-Cell-outputArea img"))
        .filter(img => !(img.complete && img.naturalWidth > 0)).length;
}}"""


@dataclass
class Control:
    """One interactive widget found in a cell's output, and how to move it."""

    kind: str
    locator: Locator
    label: str


# ipywidgets' CSS classes for the controls this suite knows how to move, in the order tried.
CONTROL_SELECTORS = {
    "slider": ".widget-slider",
    "dropdown": ".widget-dropdown",
    "select": ".widget-select, .widget-select-multiple",
    "checkbox": ".widget-checkbox",
    # ToggleButtons draws its options as toggle buttons too: those are moved with their group.
    "toggle button": ".widget-toggle-button:not(.widget-toggle-buttons *)",
    "toggle buttons": ".widget-toggle-buttons",
    "radio buttons": ".widget-radio",
    "text": ".widget-text, .widget-textarea",
    "button": ".widget-button",
}
# Controls a student can use that the suite cannot move generically: a chapter using one fails
# loudly rather than leaving the widget untested.
DISABLED_JS = "node => node.matches('[disabled]') || !!node.querySelector('[disabled]')"
UNSUPPORTED_SELECTORS = (".widget-play, .widget-colorpicker, .widget-datepicker, "
                         ".widget-datetimepicker, .widget-timepicker, .widget-upload, "
                         ".widget-controller, .widget-tagsinput")


class LabNotebook:
    """A notebook open in JupyterLab in ``page``."""

    def __init__(self, page: Page):
        self.page = page

    # --- opening and running -------------------------------------------------------------
    def open(self, lab_url: str, path: str, timeout_s: float = 180) -> None:
        self.page.goto(lab_url)
        self.page.wait_for_function(OPENED_JS, arg=path, timeout=timeout_s * 1000)
        status = self.page.evaluate(KERNEL_READY_JS, timeout_s * 1000)
        assert status not in ("timeout", "dead"), f"the kernel of {path} did not start ({status})"
        self.wait_for_kernel_idle(timeout_s)

    def kernel_status(self) -> str:
        return self.page.evaluate(KERNEL_STATUS_JS)

    def wait_for_kernel_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (status := self.kernel_status()) != "idle":
            assert status not in ("dead", "none"), f"kernel is {status}"
            assert time.monotonic() < deadline, f"kernel still {status} after {timeout_s:.0f} s"
            time.sleep(0.2)

    def run_all(self, timeout_s: float) -> bool | str:
        """Run > Run All Cells; True when every cell ran without raising."""
        return self.page.evaluate(RUN_ALL_JS, timeout_s * 1000)

    # --- reading ---------------------------------------------------------------------------
    def cells(self) -> list[dict]:
        """Each cell's model and rendering; widget outputs get ``closed``: the kernel closed
        that widget (so it is rightly not drawn)."""
        cells = self.page.evaluate(CELLS_JS)
        open_widgets = set(self.page.evaluate(OPEN_WIDGETS_JS))
        for cell in cells:
            for output in cell["outputs"]:
                output["closed"] = bool(output["widgetModel"]) and output["widgetModel"] not in open_widgets
        return cells

    def cell(self, index: int) -> Locator:
        # windowingMode "none": every cell is in the DOM, in the model's order.
        return self.page.locator(".jp-Notebook .jp-Cell").nth(index)

    def show(self, index: int) -> None:
        """Scroll cell ``index`` into view, so a failure screenshot shows it."""
        try:
            self.cell(index).scroll_into_view_if_needed(timeout=5000)
        except Exception:  # a screenshot of the wrong place is no reason to hide the failure
            pass

    def driven_state(self, index: int) -> str:
        return self.page.evaluate(DRIVEN_JS, index)

    def broken_images(self, index: int) -> int:
        return self.page.evaluate(BROKEN_IMAGES_JS, index)

    def source(self, index: int) -> str:
        return self.page.evaluate(SOURCE_JS, index)

    def type_source(self, index: int, text: str) -> None:
        """Replace cell ``index``'s code as a student does: click in it, select all, type.

        ``insert_text`` types the whole text as one input, as a paste does, so the editor's
        auto-indent and bracket closing do not rewrite it.
        """
        editor = self.cell(index).locator(".cm-content")
        editor.scroll_into_view_if_needed()
        editor.click()
        self.page.keyboard.press("ControlOrMeta+a")
        self.page.keyboard.insert_text(text)
        typed = self.source(index)
        assert typed == text, f"cell {index} holds {typed!r} after typing {text!r}"

    # --- widgets ---------------------------------------------------------------------------
    def controls(self, index: int) -> list[Control]:
        area = self.cell(index).locator(".jp-Cell-outputArea")
        unsupported = area.locator(UNSUPPORTED_SELECTORS)
        assert unsupported.count() == 0, (
            f"cell {index} has a widget the e2e suite cannot move generically "
            f"({unsupported.first.get_attribute('class')}); see tests/e2e/test_chapters.py")
        found = []
        for kind, selector in CONTROL_SELECTORS.items():
            matches = area.locator(selector)
            for k in range(matches.count()):
                control = matches.nth(k)
                if control.evaluate(DISABLED_JS):
                    continue  # a student cannot move it either
                found.append(Control(kind, control, self._label(kind, control)))
        return found

    @staticmethod
    def _label(kind: str, control: Locator) -> str:
        label = control.locator(".widget-label")
        text = label.first.inner_text().strip() if label.count() else ""
        if not text and kind in ("button", "toggle button"):
            text = control.inner_text().strip()
        return f"{kind} {text!r}" if text else kind

    def move(self, control: Control) -> str:
        """Change the control's value the way a student would; return what it was set to."""
        target = control.locator
        if control.kind == "slider":
            return self._step_slider(target)
        if control.kind in ("dropdown", "select"):
            select = target.locator("select")
            options = select.locator("option")
            values = [options.nth(k).get_attribute("value") for k in range(options.count())]
            current = values.index(select.input_value()) if select.input_value() in values else 0
            choice = (current + 1) % len(values)
            select.select_option(index=choice)
            return options.nth(choice).inner_text()
        if control.kind in ("checkbox",):
            target.locator("input").click()
            return str(target.locator("input").is_checked())
        if control.kind in ("toggle button", "button"):
            target.click()
            return "clicked"
        if control.kind == "toggle buttons":
            other = target.locator("button:not(.mod-active)").first
            text = other.inner_text()
            other.click()
            return text
        if control.kind == "radio buttons":
            other = target.locator("input[type=radio]:not(:checked)").first
            other.check()
            return "another option"
        if control.kind == "text":
            box = target.locator("input, textarea").first
            if box.get_attribute("type") == "number":
                box.press("ArrowUp")
            else:
                box.press("End")
                box.press_sequentially(" x")
            # Text widgets send their value on Enter or when they lose focus.
            box.press("Enter")
            box.blur()
            return box.input_value()
        raise AssertionError(f"no way to move a {control.kind}")

    @staticmethod
    def _step_slider(slider: Locator, max_presses: int = 25) -> str:
        """Move a slider until its value changes, with the arrow keys (noUiSlider fires
        "change" for a key as for the release of a drag): up, or down when it is at its maximum.

        The value is read from the readout (what the student sees), else from the slider
        itself: the handle's ``aria-valuenow`` is not updated by a key press, so comparing it
        once sent the slider one step up and straight back down. The loop covers a step too
        small to show in the readout's format.
        """
        readout = slider.locator(".widget-readout")
        target = slider.locator(".noUi-target").first
        handle = slider.locator(".noUi-handle").first

        def value() -> str:
            if readout.count() and readout.first.is_visible():
                return readout.first.inner_text()
            return target.evaluate("node => String(node.noUiSlider.get())")

        start = value()
        for key in ("ArrowRight", "ArrowLeft"):
            for _ in range(max_presses):
                handle.press(key)
                if value() != start:
                    return value()
        raise AssertionError(f"the slider stays at {start} whatever key is pressed")

    def wait_until_changed(self, index: int, before: str, timeout_s: float) -> bool:
        """Wait until the cell's driven outputs differ from ``before``, then until they settle
        (kernel idle and the same for half a second); False if nothing changed in time."""
        deadline = time.monotonic() + timeout_s
        while self.driven_state(index) == before:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        self.wait_until_settled(index, max(deadline - time.monotonic(), 30))
        return self.driven_state(index) != before

    def wait_until_settled(self, index: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last, stable_since = self.driven_state(index), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.driven_state(index)
            if now != last or self.kernel_status() != "idle":
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= 0.5:
                return
        raise AssertionError(f"the outputs of cell {index} kept changing for {timeout_s:.0f} s")
