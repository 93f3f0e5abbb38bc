"""The trusted checks' process: a student's answers called on secret inputs, with what the exercise
forbids blocked, in a fresh process that the notebook's kernel never touched.

The grader starts ``python trusted_runner.py`` in a new sandbox (grader/sandbox.py) while the
notebook runs. Only this file, the Python packages and a copy of course_lib whose
reference answers for the chapter are withheld (grader/trusted.py) are mounted: not the grader,
not probes.py, not the notebook. The two exchange messages (an 8-byte length, then JSON; see
``Channel``) over stdin/stdout for data and a separate control pipe for which probe is running::

    grader (outside)                               this process (inside the sandbox)
    1. the job: the release's setup cell, each ->  imports; runs the setup cell (release code)
       probe's call (pickled) and what it        (started while the notebook still runs)
       forbids
       then the student's answer cells, taken  ->
       from the submitted file
                                                   for each probe i, a forked child:
                                                   2. blocks what probe i forbids (below)
                                                   3. runs the answer cells     -> {"loaded": i}
    4. probe i's secret inputs                 ->
                                                   5. calls the probe           -> {"outputs": ...}
                                                   a forbidden call, when it happens -> {"forbidden": ...}

So the student's code is loaded before the secret inputs exist anywhere it could read them, the
expected outputs are never here, and the verdict is made by the grader from plain tensors
(safetensors: data, no code).

**What "blocked" means** (installed in the child before any student code loads, for the rest of
that child's life):

- every Python name bound to a forbidden object, in every loaded module, in torch's private C
  namespaces and on ``torch.Tensor``, is replaced by a stub that reports the call and raises
  :class:`ForbiddenCall`; aliases, default arguments, closures, containers, ``functools.partial``
  and copies made by the student's code can only capture the stub;
- for torch operators, the dispatcher's kernels of the matching ATen operators are replaced by
  ones that report and raise, so ``torch.ops.aten``, private bindings and the C methods of
  ``torch._C.TensorBase`` reach them too; the handle that could undo this is kept alive from C
  and is unreachable from Python;
- an audit hook (which Python cannot remove) refuses re-running or reading the source file of a
  module that holds a forbidden Python function (``importlib.reload``, ``exec(open(...))``) and
  the garbage collector's object enumeration (how a stub's original could be found again).

The stubs and kernels write their report to the grader *before* raising, so catching the
exception does not hide the call.
"""

from __future__ import annotations

import base64
import builtins
import json
import os
import sys
from typing import Any

MAX_MESSAGE = 64 << 20  # bytes; probe outputs are small, a longer message ends the checks


class ForbiddenCall(RuntimeError):
    """Raised by a blocked function (the course's hidden tests raise course_lib.checks' own)."""


# -- plain tensors in and out (also used by the grader: grader/probes.py) --------------------------


def as_tensors(value: Any) -> dict:
    """A probe's result as named, contiguous CPU tensors (numbers become float64 scalars)."""
    import torch

    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (tuple, list)):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        items = [("out", value)]
    out = {}
    for key, item in items:
        if isinstance(item, torch.Tensor):
            tensor = item.detach().to("cpu").clone().contiguous()
        elif isinstance(item, (bool, int, float)):
            tensor = torch.tensor(float(item), dtype=torch.float64)
        else:
            import numpy as np

            tensor = torch.from_numpy(np.array(item, dtype=np.float64)).contiguous()
        if type(tensor) is not torch.Tensor:  # a subclass could carry behaviour; keep plain data
            tensor = tensor.as_subclass(torch.Tensor)
        out[str(key)] = tensor
    return out


def encode(named: dict[str, dict]) -> str:
    from safetensors.torch import save

    flat = {f"{i}/{k}": v for i, group in named.items() for k, v in group.items()}
    return base64.b64encode(save(flat)).decode("ascii")


def decode(text: str) -> dict[str, dict]:
    """Inverse of :func:`encode`; safetensors holds only data, so decoding runs no code."""
    from safetensors.torch import load

    grouped: dict[str, dict] = {}
    for key, value in load(base64.b64decode(text.encode("ascii"), validate=True)).items():
        group, _, name = key.partition("/")
        grouped.setdefault(group, {})[name] = value
    return grouped


# -- running notebook cells ------------------------------------------------------------------------


def cell_code(source: str, name: str):
    """A notebook cell compiled as the kernel would run it (IPython syntax such as ``%magic``
    becomes the Python it stands for)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        source = TransformerManager().transform_cell(source)
    except ImportError:
        pass
    return compile(source, f"<{name}>", "exec")


class _NoShell:
    """What ``get_ipython()`` returns here: there is no kernel, so every attribute and call is a
    no-op (a ``%magic`` line in an answer cell, an IPython hook, a display call do nothing)."""

    def __getattr__(self, name: str) -> _NoShell:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _NoShell:
        return self


def new_namespace() -> dict:
    """A notebook's globals before its first cell (``display`` and ``get_ipython`` are a kernel's
    builtins)."""
    namespace: dict = {"__name__": "__main__", "__builtins__": builtins, "get_ipython": _NoShell()}
    try:
        from IPython.display import display

        namespace["display"] = display
    except ImportError:
        pass
    return namespace


# -- blocking ---------------------------------------------------------------------------------------


def _resolve(target: str) -> tuple[Any, str] | None:
    """``'torch.nn.functional.softmax'`` -> (the module torch.nn.functional, "softmax"); None when
    it does not exist in this installation."""
    from course_lib.checks import resolve  # the hidden tests' forbidden() reads names the same way

    try:
        return resolve(target)
    except (AttributeError, ImportError):
        return None


# Other names of the same computation in ATen: the private kernels a public operator dispatches to.
_ATEN_ALIASES = {
    "cross_entropy": ["cross_entropy_loss"],
    "nll_loss": ["nll_loss_nd", "nll_loss_forward", "nll_loss2d", "nll_loss2d_forward"],
    "logsigmoid": ["log_sigmoid", "log_sigmoid_forward"],
    "expit": ["sigmoid"],
    "lstm_cell": ["_thnn_fused_lstm_cell", "lstm"],
    "scaled_dot_product_attention": ["_scaled_dot_product_"],  # a prefix: every fused kernel
    "conv2d": ["_convolution", "convolution", "thnn_conv2d", "_slow_conv2d_forward", "mkldnn_convolution",
               "_nnpack_spatial_convolution", "slow_conv_dilated2d", "_convolution_mode"],
    "max_pool2d": ["max_pool2d_with_indices", "mkldnn_max_pool2d"],
    "dropout": ["native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"],
}


def _aten_names(target: str, obj: Any) -> list[str]:
    """The ATen operators (with overloads, as ``torch.library`` names them) a torch target runs.

    Only for torch's built-ins: a C function or method (``torch.softmax``, ``Tensor.softmax``), or a
    Python wrapper with a C function of the same name beside it (``F.softmax``,
    ``F.cross_entropy``). Matched by name: ``name`` and ``_name`` (``softmax`` -> aten::softmax.int,
    aten::_softmax) and the private kernels in :data:`_ATEN_ALIASES`. A Python function built
    from general operators (``nn.init.normal_`` fills with aten::normal_, as ``torch.randn`` does)
    is blocked by its names only, or an honest answer would be blocked too.
    """
    import types

    import torch

    if not target.startswith("torch."):
        return []
    base = target.rsplit(".", 1)[-1]
    aliases = _ATEN_ALIASES.get(base, [])
    if isinstance(obj, (types.FunctionType, types.MethodType, type)):
        c_namespaces = [getattr(torch._C, n, None) for n in ("_VariableFunctions", "_nn", "_special")]
        if not any(hasattr(ns, name) for ns in c_namespaces if ns is not None for name in [base, *aliases]):
            return []
    names = {base, f"_{base}"}
    for alias in aliases:
        if alias.endswith("_"):
            names |= {n for n in dir(torch.ops.aten) if n.startswith(alias)}
        else:
            names.add(alias)
    found = []
    for name in sorted(names):
        if name.startswith("__") or not name.strip("_"):
            continue
        try:
            packet = getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):
            continue
        for overload in packet.overloads():
            found.append(name if overload == "default" else f"{name}.{overload}")
    return found


def _source_file(obj: Any) -> str | None:
    """The ``.py`` file that defines ``obj`` (its code's, else its module's), resolved; None for
    what is not Python source (a C function)."""
    path = getattr(getattr(obj, "__code__", None), "co_filename", None) or \
        getattr(sys.modules.get(getattr(obj, "__module__", "") or ""), "__file__", None)
    return os.path.realpath(path) if path and path.endswith(".py") else None


def _namespaces(torch: Any) -> list[dict]:
    """The dicts a forbidden object may be bound in: every loaded module's, and torch's private
    C namespaces (``torch._C._VariableFunctions``, ..., ``torch._VF``)."""
    holders = [m.__dict__ for m in list(sys.modules.values()) if hasattr(m, "__dict__")]
    for name in ("_VariableFunctions", "_nn", "_special", "_linalg", "_fft"):
        namespace_object = getattr(torch._C, name, None)
        if namespace_object is not None and hasattr(namespace_object, "__dict__"):
            holders.append(namespace_object.__dict__)
    if hasattr(getattr(torch, "_VF", None), "__dict__"):
        holders.append(torch._VF.__dict__)
    return holders


def _target_of(originals: dict[int, tuple[str, Any]], value: Any) -> str | None:
    """The target whose original object ``value`` is (by identity), or None."""
    entry = originals.get(id(value))
    return entry[0] if entry is not None and entry[1] is value else None


class Blocker:
    """Blocks forbidden targets in this process for good, reporting each use through ``report``."""

    def __init__(self, report) -> None:
        self.report = report  # report(target, how) -> None; called before raising
        self.files: set[str] = set()  # source files of the modules that hold blocked functions
        self.ops: set[str] = set()  # the ATen operators of the blocked torch built-ins

    def stub(self, target: str):
        """A function that reports and raises. Its name is a constant of its own code and its helpers
        live in its globals (no closure), so a copy made from its code object reports too."""
        namespace = {"_report": self.report, "_ForbiddenCall": ForbiddenCall}
        message = f"{target} may not be used in this exercise: write it yourself."
        exec(f"def {target.rsplit('.', 1)[-1]}(*args, **kwargs):\n"  # noqa: S102 - our own text
             f"    _report({target!r}, 'called')\n"
             f"    raise _ForbiddenCall({message!r})\n", namespace)
        return namespace[target.rsplit(".", 1)[-1]]

    def python_names(self, targets: list[str]) -> None:
        """Replace every binding of each target's object by a stub (module attributes, class
        attributes, torch's C namespaces)."""
        import torch  # first: its modules are among those searched for other bindings

        originals = self._stub_definitions(targets)
        if originals:
            self._stub_other_bindings(originals, torch)

    def _stub_definitions(self, targets: list[str]) -> dict[int, tuple[str, Any]]:
        """Stub each target where its name resolves (an attribute of its module or class), and
        note its ATen operators and its source file. Returns id(original) -> (target, original)."""
        originals = {}
        for target in targets:
            resolved = _resolve(target)
            if resolved is None:
                continue
            owner, attr = resolved
            original = getattr(owner, attr)
            originals[id(original)] = (target, original)
            self.ops |= set(_aten_names(target, original))
            stub = self.stub(target)
            try:
                setattr(owner, attr, stub)
            except (AttributeError, TypeError):
                pass  # a C type's method: the dispatcher block catches its calls
            source = _source_file(original)
            if source:
                self.files.add(source)
        return originals

    def _stub_other_bindings(self, originals: dict[int, tuple[str, Any]], torch: Any) -> None:
        """Every other name bound to an original: in any loaded module, torch's C namespaces and
        ``torch.Tensor``'s attributes."""
        for holder in _namespaces(torch):
            try:
                items = list(holder.items())
            except Exception:  # noqa: BLE001 - a module whose dict misbehaves is skipped
                continue
            for key, value in items:
                target = _target_of(originals, value)
                if target is not None:
                    try:
                        holder[key] = self.stub(target)
                    except TypeError:  # a read-only mapping proxy
                        pass
        for key, value in list(vars(torch.Tensor).items()):
            target = _target_of(originals, value)
            if target is not None:
                setattr(torch.Tensor, key, self.stub(target))

    def dispatcher(self) -> None:
        """Replace the kernels of the ATen operators found by :meth:`python_names` by ones that
        report and raise."""
        import ctypes
        import warnings

        import torch

        ops = sorted(self.ops)
        if not ops:
            return
        report = self.report
        module = torch._C._dispatch_library("IMPL", "aten", "", "trusted_runner", 0)
        keys = ["CPU", "CompositeImplicitAutograd", "CompositeExplicitAutograd"]
        if torch.cuda.is_available():
            keys.append("CUDA")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": we mean it
            for op in ops:
                def kernel(*args: Any, _op: str = op, **kwargs: Any) -> Any:
                    report(f"aten::{_op}", "reached through the dispatcher")
                    raise ForbiddenCall(f"aten::{_op} may not be used in this exercise: write it yourself.")

                for key in keys:
                    try:
                        module.impl(op, getattr(torch._C.DispatchKey, key), kernel, False)
                    except RuntimeError:
                        pass  # e.g. no kernel may be registered for this key on this operator
        # The registrations live as long as ``module``: keep it alive from C and drop every Python
        # reference (it is not tracked by the garbage collector, so nothing can find it again).
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(module))
        del module

    def audit(self) -> None:
        """An audit hook: no re-running or reading the files of blocked functions, no gc walks."""
        files, report = frozenset(self.files), self.report

        def hook(event: str, args: tuple) -> None:
            if event in ("gc.get_objects", "gc.get_referrers", "gc.get_referents"):
                report(event, "called while blocked functions exist")
                raise RuntimeError(f"{event} is not available while grading")
            if event == "exec" and args and getattr(args[0], "co_filename", None) in files:
                report(args[0].co_filename, "re-ran the file of a forbidden function")
                raise ForbiddenCall("re-running a module that holds a forbidden function is not allowed")
            if event == "open" and args and isinstance(args[0], str) and files and \
                    os.path.realpath(args[0]) in files:
                report(args[0], "read the file of a forbidden function")
                raise ForbiddenCall("reading the source of a forbidden function is not allowed")

        sys.addaudithook(hook)

    def block(self, targets: list[str]) -> None:
        self.python_names(targets)
        self.dispatcher()
        self.audit()


# -- the protocol -------------------------------------------------------------------------------------



class Channel:
    """Messages (a length, then JSON) over file descriptors, unbuffered: a fork inherits nothing
    unread, and a student's rebinding of ``os.write`` or ``json`` changes nothing here."""

    def __init__(self, read_fd: int | None, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self._write, self._read, self._dumps, self._loads = os.write, os.read, json.dumps, json.loads

    def send(self, message: dict) -> None:
        body = self._dumps(message).encode()
        data = len(body).to_bytes(8, "big") + body
        while data:
            data = data[self._write(self.write_fd, data):]

    def _exactly(self, count: int) -> bytes:
        chunks, left = [], count
        while left:
            chunk = self._read(self.read_fd, min(left, 1 << 20))
            if not chunk:
                raise EOFError("the grader closed the channel")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> dict:
        size = int.from_bytes(self._exactly(8), "big")
        if size > MAX_MESSAGE:
            raise ValueError("message too long")
        return self._loads(self._exactly(size))


def _import_package_from(name: str, folder: str) -> None:
    """Import package ``name`` from ``folder`` (the copy with withheld answers), whatever else an
    installation (e.g. an editable install's import hook) would have found."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _read_all(fd: int) -> bytes:
    """Everything left in a pipe whose writers are gone (a leftover grandchild may still hold it:
    read what is there without waiting)."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    os.close(fd)
    return b"".join(chunks)


def _wait(pid: int, timeout: float) -> int | str:
    """The child's exit status, or "timed out" after killing it at ``timeout`` seconds (an answer
    cell that sleeps or loops must not hold the other exercises' checks)."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timed out"
        time.sleep(0.02)


def _kill_others() -> None:
    """Kill every process of this sandbox but this one and its ancestors (what a finished child
    may have left behind must not talk during the next probe). Inside the sandbox's own pid
    namespace, /proc lists exactly those processes."""
    import signal

    keep, pid = {os.getpid()}, os.getpid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        keep.add(pid)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in keep and int(entry) != 1:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
    try:  # as the sandbox's pid 1, orphans are ours to reap
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def run_probe(namespace: dict, probe: dict, answers: list, report, receive_inputs,
              loading=lambda cell: None) -> dict:
    """Block what ``probe`` forbids, run the answer cells, then call the probe on the inputs
    ``receive_inputs(answer_errors)`` returns: the message with its outputs or its error.
    ``report(target, how, answer_cell)`` is told of each forbidden call, with the answer cell
    that was loading (None: during the probe's call); ``loading(answer_cell)`` of each cell
    before it runs ("" once all are loaded)."""
    current = {"cell": None}  # the answer cell being loaded: a forbidden call there is that cell's
    Blocker(lambda target, how: report(target, how, current["cell"])).block(list(probe["forbid"]))
    errors = {}
    for grade_id, source in answers:
        current["cell"] = grade_id
        loading(grade_id)
        try:
            exec(cell_code(source, grade_id), namespace)  # noqa: S102 - the student's answer, sandboxed
        except BaseException as error:  # noqa: BLE001 - an answer that raises leaves its names undefined
            errors[grade_id] = f"{type(error).__name__}: {error}"[:300]
    current["cell"] = None
    loading("")
    inputs = receive_inputs(errors)
    try:
        return {"outputs": encode({"0": as_tensors(probe["run"](namespace, inputs))})}
    except BaseException as error:  # noqa: BLE001 - the student's error is a verdict
        return {"error": f"{type(error).__name__}: {error}"[:500]}


def _child(data: Channel, namespace: dict, job: dict, index: int, answers: list, progress_fd: int) -> None:
    """One probe in a forked child, talking to the grader: inputs only once the answers are loaded.
    Which answer cell is loading goes to the parent through ``progress_fd``."""
    def receive_inputs(errors: dict) -> dict:
        data.send({"index": index, "loaded": index, "answer_errors": errors})
        return decode(data.receive()["inputs"]).get("0", {})

    def report(target: str, how: str, cell: str | None) -> None:
        data.send({"index": index, "forbidden": target, "how": how, "cell": cell})

    write = os.write
    result = run_probe(namespace, job["probes"][index], answers, report, receive_inputs,
                       lambda cell: write(progress_fd, f"{cell}\n".encode()))
    data.send({"index": index, **result})


def in_process(namespace: dict, probes: list[dict], answers: list, inputs: dict[str, dict]) -> dict:
    """The same checks without a grader on the other side (the test suite's answer harness): one
    forked child per probe from ``namespace``; returns ``{"payload": {"outputs", "errors"},
    "forbidden": {probe index, or the answer cell that was loading: [calls]}}``."""
    outputs, errors, forbidden = {}, {}, {}
    for index, probe in enumerate(probes):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            out = Channel(None, write_fd)
            try:
                out.send(run_probe(namespace, probe, answers,
                                   lambda target, how, cell, _out=out: _out.send({"forbidden": target,
                                                                                  "cell": cell}),
                                   lambda _errors, _i=str(index): inputs.get(_i, {})))
            finally:
                os._exit(0)
        os.close(write_fd)
        channel, key = Channel(read_fd, -1), str(index)
        while True:
            try:
                message = channel.receive()
            except EOFError:
                break
            if "forbidden" in message:
                where = message.get("cell") or key  # an answer cell's name, or this probe's index
                if message["forbidden"] not in forbidden.setdefault(where, []):
                    forbidden[where].append(message["forbidden"])
            elif "outputs" in message:
                outputs[key] = decode(message["outputs"])["0"]
            elif "error" in message:
                errors[key] = message["error"]
        os.close(read_fd)
        os.waitpid(pid, 0)
        if key not in outputs and key not in errors:
            errors[key] = "the answer's process ended without a result"
    return {"payload": {"outputs": encode(outputs), "errors": errors}, "forbidden": forbidden}


def serve(data: Channel, control: Channel, job: dict, isolated: bool) -> None:
    """Run the job (see the module docstring): the setup cell once, then one child per probe.
    ``isolated``: this is a sandbox of its own, so leftovers of each child are killed."""
    import pickle

    import torch

    torch.set_num_threads(int(job.get("threads", 1)))
    if job.get("course_lib"):
        _import_package_from("course_lib", job["course_lib"])
    for probe in job["probes"]:
        probe["run"] = pickle.loads(base64.b64decode(probe["run"]))  # noqa: S301 - the instructor's code
    namespace = new_namespace()
    if job.get("setup"):
        exec(cell_code(job["setup"], "setup"), namespace)  # noqa: S102 - the release's own cell
    # torch.optim imports torch._dynamo on an optimizer's first use (about 1.4 s). Imported here,
    # while the notebook may still be running, every probe's child inherits it instead.
    import torch._dynamo  # noqa: F401
    # Ready: the grader may have started this process while the notebook still runs. The
    # student's answer cells come only now.
    job["answers"] = data.receive()["answers"]
    slow: list[str] = []  # answer cells that ran past the limit while loading: skipped from then on
    index = 0
    while index < len(job["probes"]):
        control.send({"probe": index, "skipped": slow})
        answers = [(cell, source) for cell, source in job["answers"] if cell not in slow]
        status, loading = _fork_child(data, control, namespace, job, index, answers)
        if isolated:
            _kill_others()
        if status == "timed out" and loading in dict(answers):
            slow.append(loading)  # that cell, not this exercise, took the time: again without it
            continue
        control.send({"done": index, "status": status})
        index += 1


def _fork_child(data: Channel, control: Channel, namespace: dict, job: dict, index: int,
                answers: list) -> tuple[int | str, str]:
    """Run probe ``index`` in a child: its exit status (or "timed out") and the answer cell it
    was loading when it ended ("" when all had loaded)."""
    progress_read, progress_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(control.write_fd)  # the child (and the student's code) cannot forge these
            os.close(progress_read)
            _child(data, namespace, job, index, answers, progress_write)
        except BaseException:  # noqa: BLE001 - the child must never return into the loop
            code = 1
        os._exit(code)
    os.close(progress_write)
    status = _wait(pid, float(job.get("child_timeout", 600)))
    progress = _read_all(progress_read).decode(errors="replace").splitlines()
    return status, progress[-1] if progress else ""


def main() -> None:
    # The protocol gets its own descriptors; whatever the cells print goes nowhere.
    read_fd, write_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    control_fd = int(sys.argv[1])  # the control pipe's write end, passed by the grader
    data, control = Channel(read_fd, write_fd), Channel(None, control_fd)
    try:
        job = data.receive()
        serve(data, control, job, isolated=bool(job.get("isolated")))
    except BaseException as error:  # noqa: BLE001 - e.g. the setup cell failed: say so, then stop
        control.send({"fatal": f"{type(error).__name__}: {error}"[:2000]})
        raise SystemExit(1) from None
    control.send({"finished": True})


if __name__ == "__main__":
    main()
