"""course_lib.checks: the student-facing checks and ``forbidden``."""

import sys
import types

import numpy as np
import pytest
import torch

from course_lib import checks
from course_lib.checks import (
    CheckFailed,
    ForbiddenCall,
    check_close,
    check_dtype,
    check_equal,
    check_finite,
    check_shape,
    check_true,
    check_type,
    forbidden,
)
from course_lib.optimizers import optimizer_trajectory


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(CheckFailed) as info:
        call(*args, **kwargs)
    return str(info.value)


def test_check_failed_is_an_assertion_error():
    assert issubclass(CheckFailed, AssertionError)
    assert issubclass(ForbiddenCall, RuntimeError)


# --- check_type ---------------------------------------------------------------------------------


def test_check_type():
    check_type(torch.zeros(2), torch.Tensor)
    check_type(3, (int, float))
    message = _message(check_type, [1, 2], torch.Tensor, name="logits")
    assert message.startswith("logits: expected a Tensor, got list")
    assert "an int" in _message(check_type, 2.5, int)
    assert "int or float" in _message(check_type, "x", (int, float))


def test_check_type_none_mentions_return():
    assert "`return`" in _message(check_type, None, torch.Tensor)


# --- check_shape --------------------------------------------------------------------------------


def test_check_shape_passes():
    check_shape(torch.zeros(3, 4), (3, 4))
    check_shape(np.zeros((2,)), [2])
    check_shape(torch.tensor(1.0), ())
    check_shape(torch.zeros(3, 4), torch.Size([3, 4]))


def test_check_shape_message_has_both_shapes():
    message = _message(check_shape, torch.zeros(3, 5), (3, 4), name="h")
    assert message.startswith("h: ")
    assert "(3, 4)" in message and "(3, 5)" in message
    assert "Hint" not in message


def test_check_shape_transposed_hint():
    assert "transpose" in _message(check_shape, torch.zeros(4, 3), (3, 4))


def test_check_shape_dimension_hint():
    message = _message(check_shape, torch.zeros(3, 1), (3,))
    assert "keepdim" in message
    assert "(3,)" in message and "(3, 1)" in message


def test_check_shape_none_mentions_return():
    message = _message(check_shape, None, (3,))
    assert "NoneType" in message and "`return`" in message


# --- check_dtype / check_finite / check_true ----------------------------------------------------


def test_check_dtype():
    check_dtype(torch.zeros(2, dtype=torch.int64), torch.int64)
    message = _message(check_dtype, torch.zeros(2), torch.int64)
    assert "torch.int64" in message and "torch.float32" in message
    assert "Tensor" in _message(check_dtype, np.zeros(2), torch.float32)


def test_check_finite():
    check_finite(torch.tensor([1.0, -2.0]))
    check_finite(torch.tensor([1, 2]))
    check_finite([0.5, 1.5])
    message = _message(check_finite, torch.tensor([[1.0, 2.0], [float("nan"), 3.0]]))
    assert "nan" in message and "(1, 0)" in message
    assert "inf" in _message(check_finite, np.array([1.0, np.inf]))
    assert "nan" in _message(check_finite, torch.tensor(float("nan")))  # 0-d


def test_check_true():
    check_true(True, "never shown")
    check_true(torch.tensor(True), "never shown")
    message = _message(check_true, 1 > 2, "one is not above two", hint="swap them", name="order")
    assert message == "order: one is not above two\nHint: swap them"


# --- check_close --------------------------------------------------------------------------------


def test_check_close_passes_on_equal_values():
    check_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    check_close(np.array([0.1, 0.2]), np.array([0.1, 0.2]))
    check_close(0.3, 0.1 + 0.2)
    check_close(torch.tensor([[True, False]]), torch.tensor([[True, False]]))
    check_close(torch.zeros(0, 3), torch.zeros(0, 3))


def test_check_close_tolerance_boundary():
    expected = torch.tensor([100.0], dtype=torch.float64)
    limit = 1e-3 + 1e-2 * 100  # atol + rtol * |expected| = 1.001
    check_close(expected + 0.999 * limit, expected, atol=1e-3, rtol=1e-2)
    check_close(expected - 0.999 * limit, expected, atol=1e-3, rtol=1e-2)
    with pytest.raises(CheckFailed, match="atol=0.001, rtol=0.01"):
        check_close(expected + 1.001 * limit, expected, atol=1e-3, rtol=1e-2)
    with pytest.raises(CheckFailed):
        check_close(expected - 1.001 * limit, expected, atol=1e-3, rtol=1e-2)


def test_check_close_default_tolerance():
    check_close(1.0 + 5e-6, 1.0)  # 1e-6 + 1e-5 * 1
    with pytest.raises(CheckFailed):
        check_close(1.0 + 2e-5, 1.0)


def test_check_close_names_worst_element():
    expected = torch.zeros(2, 3)
    actual = expected.clone()
    actual[0, 1] = 0.5
    actual[1, 2] = 2.0
    message = _message(check_close, actual, expected, name="grad")
    assert message.startswith("grad: values differ")
    assert "in 2 of 6 element(s)" in message
    assert "at index (1, 2)" in message
    assert "expected 0, got 2" in message


def test_check_close_scalars_and_zero_d_tensors():
    check_close(torch.tensor(2.0), 2.0)
    check_close(torch.tensor([2.0]), 2.0)  # one element either way
    check_close(torch.tensor(2.0), np.float64(2.0))
    check_close(np.float32(2.0), 2)
    assert "expected 2, got 3" in _message(check_close, torch.tensor(3.0), 2.0)


def test_check_close_tensor_expected_needs_a_tensor():
    message = _message(check_close, 2.0, torch.tensor(2.0))
    assert "expected a Tensor, got float" in message


def test_check_close_shape_mismatch():
    message = _message(check_close, torch.zeros(2, 3), torch.zeros(3, 2))
    assert "(3, 2)" in message and "(2, 3)" in message and "transpose" in message
    with pytest.raises(CheckFailed):
        check_close(torch.zeros(2), torch.zeros(1, 2))


def test_check_close_wrong_sign_hint():
    expected = torch.tensor([1.0, -2.0, 3.0])
    assert "wrong sign" in _message(check_close, -expected, expected)
    assert "Hint" not in _message(check_close, expected + 1, expected)


def test_check_close_transpose_hint():
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert "transpose" in _message(check_close, expected.T, expected)


def test_check_close_nan_detection():
    message = _message(check_close, torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    assert "nan" in message and "(1,)" in message and "Hint" in message


def test_check_close_nonfinite_expected():
    inf = float("inf")
    check_close(torch.tensor([inf, 1.0]), torch.tensor([inf, 1.0]))
    check_close(torch.tensor([-inf]), torch.tensor([-inf]))
    check_close(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    with pytest.raises(CheckFailed):
        check_close(torch.tensor([-inf]), torch.tensor([inf]))
    with pytest.raises(CheckFailed):
        check_close(torch.tensor([1.0]), torch.tensor([inf]))
    with pytest.raises(CheckFailed):
        check_close(torch.tensor([1.0]), torch.tensor([float("nan")]))


def test_check_close_dtype():
    check_close(torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0]))
    message = _message(check_close, torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0]),
                       check_dtype_too=True)
    assert "dtype" in message


def test_check_close_none_and_junk():
    assert "`return`" in _message(check_close, None, torch.tensor(1.0))
    assert "`return`" in _message(check_close, None, 1.0)
    assert "could not read" in _message(check_close, ["a", "b"], [1.0, 2.0])


def test_check_close_ignores_autograd_and_dtype():
    actual = torch.tensor([1.0, 2.0], requires_grad=True) * 1
    check_close(actual, torch.tensor([1.0, 2.0]))
    check_close(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))


# --- check_equal --------------------------------------------------------------------------------


def test_check_equal_passes():
    check_equal(3, 3)
    check_equal(torch.tensor(3), 3)
    check_equal(np.int64(3), 3)
    check_equal(3.0, 3)  # an integral float is accepted for an int
    check_equal("abc", "abc")
    check_equal((1, 2), (1, 2))
    check_equal(True, True)
    check_equal(torch.tensor([[7]]), 7)


def test_check_equal_ratio_hint():
    message = _message(check_equal, 24, 12, name="params")
    assert message.startswith("params: expected 12, got 24")
    assert "exactly 2x too large" in message
    assert "3x too large" in _message(check_equal, 36, 12)
    assert "Hint" not in _message(check_equal, 13, 12)
    assert "Hint" not in _message(check_equal, 6, 12)


def test_check_equal_type_errors():
    assert "expected an int, got float" in _message(check_equal, 2.5, 2)
    assert "tuple" in _message(check_equal, [1, 2], (1, 2))
    assert "bool" in _message(check_equal, 1, True)
    assert "`return`" in _message(check_equal, None, 12)
    assert "'abc'" in _message(check_equal, "abd", "abc")


def test_check_equal_array_for_a_number():
    for expected in (3, 0.5):
        message = _message(check_equal, torch.tensor([1.0, 2.0]), expected)
        assert "(2,)" in message
    assert "(2, 2)" in _message(check_equal, np.zeros((2, 2)), 1.5)


# --- forbidden ----------------------------------------------------------------------------------


@pytest.fixture
def fake_module():
    """A throw-away module ``fake_ref`` with a function, a class and an alias-able object."""
    module = types.ModuleType("fake_ref")

    def softmax(x):
        return "reference softmax"

    class Tools:
        @staticmethod
        def helper(x):
            return x + 1

        def method(self):
            return "method"

    module.softmax = softmax
    module.Tools = Tools
    sys.modules["fake_ref"] = module
    yield module
    del sys.modules["fake_ref"]


def test_forbidden_blocks_inside_and_restores_after(fake_module):
    original = fake_module.softmax
    with forbidden("fake_ref.softmax", reason="write it yourself"):
        with pytest.raises(ForbiddenCall, match="fake_ref.softmax may not be used here: write it"):
            fake_module.softmax(1)
    assert fake_module.softmax is original
    assert fake_module.softmax(1) == "reference softmax"


def test_forbidden_torch_function():
    original = torch.nn.functional.softmax
    x = torch.zeros(3)
    with forbidden("torch.nn.functional.softmax", "torch.softmax"):
        with pytest.raises(ForbiddenCall):
            torch.nn.functional.softmax(x, dim=0)
        with pytest.raises(ForbiddenCall):
            torch.softmax(x, dim=0)
        assert torch.exp(x).sum().item() == 3.0  # other functions still work
    assert torch.nn.functional.softmax is original
    assert torch.allclose(torch.softmax(x, dim=0), torch.full((3,), 1 / 3))


def test_forbidden_tensor_method_restores_class_state():
    had_own = "softmax" in vars(torch.Tensor)
    with forbidden("torch.Tensor.softmax"):
        with pytest.raises(ForbiddenCall):
            torch.zeros(2).softmax(dim=0)
    assert ("softmax" in vars(torch.Tensor)) == had_own
    assert torch.allclose(torch.zeros(2).softmax(dim=0), torch.tensor([0.5, 0.5]))


def test_forbidden_static_and_instance_methods(fake_module):
    tools = fake_module.Tools
    with forbidden("fake_ref.Tools.helper", "fake_ref.Tools.method"):
        with pytest.raises(ForbiddenCall):
            tools.helper(1)
        with pytest.raises(ForbiddenCall):
            tools().helper(1)
        with pytest.raises(ForbiddenCall):
            tools().method()
    assert tools.helper(1) == 2
    assert tools().helper(1) == 2  # still a staticmethod
    assert isinstance(vars(tools)["helper"], staticmethod)
    assert tools().method() == "method"


def test_forbidden_blocks_aliases_in_namespace(fake_module):
    from_import = fake_module.softmax
    namespace = {"sm": from_import, "other": len, "F_softmax": torch.nn.functional.softmax}
    with forbidden("fake_ref.softmax", "torch.nn.functional.softmax", namespace=namespace):
        with pytest.raises(ForbiddenCall, match="fake_ref.softmax"):
            namespace["sm"](1)
        with pytest.raises(ForbiddenCall, match="torch.nn.functional.softmax"):
            namespace["F_softmax"](torch.zeros(2), dim=0)
        assert namespace["other"] is len
    assert namespace["sm"] is from_import
    assert namespace["F_softmax"] is torch.nn.functional.softmax
    assert namespace["sm"](1) == "reference softmax"


def test_forbidden_alias_in_real_globals(fake_module):
    glb = {}
    exec("from fake_ref import softmax\ndef student(x):\n    return softmax(x)\n", glb)
    assert glb["student"](1) == "reference softmax"
    with forbidden("fake_ref.softmax", namespace=glb):
        with pytest.raises(ForbiddenCall):
            glb["student"](1)
    assert glb["student"](1) == "reference softmax"


def test_forbidden_restores_after_exception(fake_module):
    original = fake_module.softmax
    namespace = {"sm": original}
    with pytest.raises(ZeroDivisionError):
        with forbidden("fake_ref.softmax", namespace=namespace):
            raise ZeroDivisionError("inside the block")
    assert fake_module.softmax is original
    assert namespace["sm"] is original


def test_forbidden_restores_after_forbidden_call_escapes(fake_module):
    original = fake_module.softmax
    with pytest.raises(ForbiddenCall):
        with forbidden("fake_ref.softmax"):
            fake_module.softmax(0)
    assert fake_module.softmax is original


def test_forbidden_nonexistent_attribute_raises(fake_module):
    original = fake_module.softmax
    with pytest.raises(AttributeError, match="does not exist"):
        with forbidden("fake_ref.softmax", "fake_ref.no_such_function"):
            pass  # pragma: no cover
    assert fake_module.softmax is original  # the first target was put back
    with pytest.raises(AttributeError):
        with forbidden("torch.nn.no_such_module.thing"):
            pass  # pragma: no cover
    with pytest.raises(ImportError):
        with forbidden("no_such_package_xyz.f"):
            pass  # pragma: no cover


def test_forbidden_builtin():
    import builtins

    original = builtins.sum
    with forbidden("builtins.sum"):
        with pytest.raises(ForbiddenCall):
            sum([1, 2])
    assert builtins.sum is original and sum([1, 2]) == 3


def test_forbidden_same_target_twice(fake_module):
    original = fake_module.softmax
    with forbidden("fake_ref.softmax", "fake_ref.softmax"):
        with pytest.raises(ForbiddenCall):
            fake_module.softmax(1)
    assert fake_module.softmax is original


def test_resolve_splits_module_and_attribute():
    owner, attr = checks.resolve("torch.nn.functional.cross_entropy")
    assert owner is torch.nn.functional and attr == "cross_entropy"
    owner, attr = checks.resolve("torch.Tensor.sum")
    assert owner is torch.Tensor and attr == "sum"


# -- check_trajectory: chapter 4's step-by-step comparison of two optimizers ----------------------


def test_check_trajectory_names_the_first_step_that_differs():
    expected = optimizer_trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 12)
    checks.check_trajectory(expected.clone(), expected, atol=0, rtol=0, name="same")
    wrong = expected.clone()
    wrong[7:, 3] += 1e-6
    with pytest.raises(CheckFailed, match="after step 7"):
        checks.check_trajectory(wrong, expected, atol=1e-10, rtol=1e-10, name="SGD")
    with pytest.raises(CheckFailed, match="shape"):
        checks.check_trajectory(expected[:5], expected, atol=1e-10, rtol=1e-10, name="SGD")
