"""Third-party noise kept off the user's terminal: DeepSpeed stays unimported by commands that do not use it,
and library warnings that tell the user nothing are silenced (``LORAKIT_DEBUG=1`` shows them all again).

Importing DeepSpeed prints ``[WARNING] [real_accelerator.py] Setting accelerator to CPU`` on a machine
without a GPU. Nothing of lorakit imports it outside ``lorakit.training.zero``; Accelerate does, whenever
the package is installed, from ``extract_model_from_parallel`` (which ``save_pretrained`` and
``Accelerator.unwrap_model`` call): ``merge`` saving a model was enough. Accelerate and transformers ask
``importlib.util.find_spec("deepspeed")`` first, so a ``None`` in ``sys.modules`` (Python's documented way to
make a module unimportable) tells both that DeepSpeed is absent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence

# Commands that may train under DeepSpeed (train.distributed): they decide per run (lorakit.training.loop).
DEEPSPEED_COMMANDS = frozenset({"train", "sweep"})

# Warnings of libraries that say nothing a lorakit user can act on.
_QUIET_MODULES = (
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "peft",
    "huggingface_hub",
    "tensorboard",
    "google.protobuf",
    "pydantic",
    "mlflow",
    "wandb",
)


# Loggers that warn of nothing a user can act on: torchao (imported for model.quantize: nf4) reports the
# CUDA kernels it cannot load on a CPU machine, and torch's pytree a deprecation inside torchao.
_QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def debugging() -> bool:
    """Whether ``LORAKIT_DEBUG`` asks for tracebacks and every library warning."""
    return os.environ.get("LORAKIT_DEBUG", "") not in ("", "0")


def quiet_command(argv: Sequence[str]) -> None:
    """Set up a ``lorakit`` process for the command in ``argv``: library warnings silenced, and DeepSpeed made
    unimportable unless the command may use it. With ``LORAKIT_DEBUG=1``, nothing changes."""
    if debugging():
        return
    silence_library_warnings()
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in DEEPSPEED_COMMANDS:
        block_deepspeed()


def silence_library_warnings() -> None:
    """Python warnings raised from inside the libraries lorakit drives (deprecations, future changes of
    their defaults) are not shown; lorakit's own and the user's code's still are."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for module in _QUIET_MODULES:
        warnings.filterwarnings("ignore", module=re.escape(module) + r"(\.|$)")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def deepspeed_in_use() -> bool:
    """Whether this process was launched to train under DeepSpeed (``accelerate launch`` with its config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


def block_deepspeed() -> bool:
    """Make ``import deepspeed`` fail and ``find_spec`` say it is absent, unless it is imported already or
    this process trains under it; True when this call blocked it."""
    if "deepspeed" in sys.modules or deepspeed_in_use():
        return False
    sys.modules["deepspeed"] = None  # type: ignore[assignment]
    return True


def unblock_deepspeed() -> None:
    if "deepspeed" in sys.modules and sys.modules["deepspeed"] is None:
        del sys.modules["deepspeed"]


@contextlib.contextmanager
def without_deepspeed(needed: bool) -> Iterator[None]:
    """DeepSpeed blocked inside the block unless ``needed`` (and unblocked after it, if this blocked it), so
    that code running in the same process later (tests, a sweep's next point) finds it as before."""
    blocked = not needed and not debugging() and block_deepspeed()
    try:
        yield
    finally:
        if blocked:
            unblock_deepspeed()
