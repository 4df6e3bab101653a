"""jupyter_kernel_test's own suite, its assertions unmodified, against the microVM kernelspec.

The attribute values are those of jupyter_kernel_test's test_ipykernel.py. One adaptation,
to time and not to any assertion: the suite waits only 0.1 s for each iopub message after an
execute reply (a local kernel's iopub thread is microseconds behind its shell reply). An
emulated guest on a loaded CI machine can be a few hundred ms behind, so that wait gets a
floor of ``IOPUB_WAIT_FLOOR`` seconds; a missing message still fails the test."""

from __future__ import annotations

from typing import Any

import jupyter_kernel_test as jkt
import pytest

pytestmark = pytest.mark.vm

IOPUB_WAIT_FLOOR = 1.0


@pytest.mark.usefixtures("template")
class MicroVMKernelTests(jkt.KernelTests):
    kernel_name = "python3-microvm"
    language_name = "python"
    file_extension = ".py"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        channel = cls.kc.iopub_channel
        get_msg = channel.get_msg

        def patient_get_msg(timeout: float | None = None) -> Any:
            return get_msg(timeout=None if timeout is None else max(timeout, IOPUB_WAIT_FLOOR))

        channel.get_msg = patient_get_msg  # type: ignore[method-assign]

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
         "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
         "mime": "text/latex"},
    ]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"
