"""A model's own error, as the client reads it: one line saying what went wrong, not the top of a
traceback cut off before that line (issue 20, part 3). TorchScript's interpreter puts its whole
stack in the exception's text; the error is the last line."""

from __future__ import annotations

import pytest

from mesh.runtime.loaders.base import last_meaningful_line, reason


def test_a_real_torchscript_error_becomes_its_last_line() -> None:
    import torch  # the runtimes extra, installed with the test dependencies
    model = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    with pytest.raises(RuntimeError) as caught:
        model(torch.zeros(1, 3))
    assert "Traceback of TorchScript" in str(caught.value)  # what the client used to get, cut at 1000 chars
    assert reason(caught.value) == "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 4x8)"


def test_one_line_errors_are_kept_whole() -> None:
    assert reason(ValueError("X has 3 features, but LogisticRegression is expecting 4 features as input")) == \
        "X has 3 features, but LogisticRegression is expecting 4 features as input"
    assert reason(KeyError(0)) == "KeyError: 0"


def test_a_python_traceback_in_a_message_keeps_the_exception_line() -> None:
    text = ('Traceback (most recent call last):\n  File "model.py", line 3, in predict\n    return 1 / 0\n'
            "ZeroDivisionError: division by zero\n")
    assert last_meaningful_line(text) == "ZeroDivisionError: division by zero"
