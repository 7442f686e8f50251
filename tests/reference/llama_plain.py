"""llama.cpp's plain CPU path for llama-cpp-python, on machines where its AMX path crashes.

A llama-cpp-python build compiles llama.cpp's AMX kernels when the CPU reports AMX, and loads
every model into AMX "extra buffer types" by default. Some of the virtual machines this project
runs on report AMX, yet llama.cpp's AMX path dies there on its first evaluation (SIGILL at
`tilezero` in some sessions, SIGSEGV in others); elsewhere nothing changes. Loading with `use_extra_bufts = False` (what `llama-server
--no-repack` does) runs the plain CPU kernels instead, which are also what the fixtures record.

    from llama_plain import plain_cpu_if_needed
    plain_cpu_if_needed(gguf_path)   # before constructing llama_cpp.Llama
"""
import os
import subprocess
import sys

_PROBE = """
import sys
from llama_cpp import Llama
Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False).eval([1, 2, 3])
"""


def extra_bufts_crash(gguf: str) -> bool:
    """Whether evaluating with the default (extra) buffer types kills the process here."""
    probe = subprocess.run([sys.executable, "-c", _PROBE, gguf], capture_output=True, timeout=300)
    return probe.returncode != 0


def use_plain_cpu() -> None:
    """Makes every later `Llama(...)` load without extra buffer types."""
    import llama_cpp
    import llama_cpp.llama as module

    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params


def plain_cpu_if_needed(gguf: str) -> bool:
    """Switches to the plain CPU path when told to (EMBER_LLAMA_NO_EXTRA_BUFTS=1) or when the
    default path crashes on this machine; returns whether it did."""
    if os.environ.get("EMBER_LLAMA_NO_EXTRA_BUFTS") == "1" or extra_bufts_crash(gguf):
        print("llama.cpp: loading without extra buffer types (plain CPU kernels)", file=sys.stderr)
        use_plain_cpu()
        return True
    return False


if __name__ == "__main__":
    # `python llama_plain.py GGUF`: exit status 1 when the default path crashes here.
    sys.exit(1 if extra_bufts_crash(sys.argv[1]) else 0)
