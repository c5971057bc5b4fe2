"""What the terminal shows around a command: no third-party noise (DeepSpeed stays unimported by commands
that do not use it; LORAKIT_DEBUG=1 shows it all again), and shell completion (Typer's protocol)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

# Runs the real entry point and, as the process leaves, says whether DeepSpeed was imported.
_ENTRY = (
    "import os, sys\n"
    "leave = os._exit\n"
    "def report(status):\n"
    "    ds = sys.modules.get('deepspeed') is not None\n"
    "    sys.stderr.write(f'DEEPSPEED_IMPORTED={ds}\\n'); sys.stderr.flush(); leave(status)\n"
    "os._exit = report\n"
    "sys.argv = ['lorakit', *sys.argv[1:]]\n"
    "from lorakit.__main__ import run\n"
    "run()\n"
)


def _lorakit(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "LORAKIT_DEBUG"}
    environ.update(LORAKIT_HOME=str(tmp_path / "home"), **env)
    return subprocess.run(
        [sys.executable, "-c", _ENTRY, *args], capture_output=True, text=True, env=environ, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path) -> Path:
    """A run directory as training leaves it (recipe, adapter in PEFT's format), without the training."""
    from conftest import write_recipe

    from lorakit.models import prepare_model
    from lorakit.recipe import load_recipe, save_recipe
    from lorakit.tasks import build_task
    from lorakit.training.saving import save_trained

    root = tmp_path_factory.mktemp("noise")
    run = root / "run"
    glue = SHARED_DATA / "glue" / "SST-2"
    recipe = load_recipe(write_recipe(root / "r.yaml", tiny_roberta_dir, "sst2", glue, run))
    task = build_task(recipe.task)
    prepared = prepare_model(recipe, task)
    run.mkdir()
    save_trained(prepared, prepared.model, recipe, task, run)
    save_recipe(recipe, run / "recipe.yaml")
    return run


def test_merge_prints_no_library_noise(trained: Path, tmp_path: Path) -> None:
    done = _lorakit(["merge", str(trained), "--out", str(tmp_path / "merged")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "DEEPSPEED_IMPORTED=False", done.stderr
    assert "".join(done.stdout.split()) == f"mergedmodelwrittento{tmp_path / 'merged'}"  # rich wraps


def test_lorakit_debug_shows_what_was_silenced(trained: Path, tmp_path: Path) -> None:
    """The check above can fail: with LORAKIT_DEBUG=1 the same merge imports DeepSpeed, which says so."""
    pytest.importorskip("deepspeed")
    done = _lorakit(["merge", str(trained), "--out", str(tmp_path / "m")], tmp_path, LORAKIT_DEBUG="1")
    assert done.returncode == 0, done.stderr
    assert "DEEPSPEED_IMPORTED=True" in done.stderr
    assert "real_accelerator" in done.stdout + done.stderr  # DeepSpeed's logger writes to stdout


def test_the_nf4_backend_loads_quietly() -> None:
    """torchao (model.quantize: nf4) logs the CUDA kernels it cannot load and a torch deprecation when it
    is imported on a CPU machine; a lorakit command shows neither."""
    pytest.importorskip("torchao")
    code = "from lorakit.noise import quiet_command; quiet_command(['train']); import torchao.quantization"
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_DEBUG"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stderr == "" and done.stdout == ""


def test_the_deepspeed_block_is_scoped() -> None:
    """In-process training blocks DeepSpeed only while it runs, so a later DeepSpeed run still finds it."""
    from lorakit.noise import without_deepspeed

    before = sys.modules.get("deepspeed", "absent")
    with without_deepspeed(needed=False):
        if before == "absent":
            assert sys.modules["deepspeed"] is None
            import importlib.util

            assert importlib.util.find_spec("deepspeed") is None
    assert sys.modules.get("deepspeed", "absent") is before


def _complete(words: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Ask the command for completions as the zsh script Typer installs does."""
    env = {**os.environ, "_LORAKIT_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": words}
    script = Path(sys.executable).parent / "lorakit"
    return subprocess.run([str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_shell_completion_offers_commands_and_completes_paths_as_files(tmp_path: Path) -> None:
    done = _complete("lorakit me", tmp_path)
    assert done.returncode == 0 and "merge" in done.stdout and "train" not in done.stdout
    # A recipe or run directory argument: no candidates of its own, so the shell completes file names.
    for words in ("lorakit train conf", "lorakit merge ru", "lorakit eval ", "lorakit merge --out me"):
        done = _complete(words, tmp_path)
        assert done.returncode == 0 and done.stdout.strip() == "_files", (words, done.stdout)


def test_completion_can_be_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "lorakit"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert "--install-completion" in done.stdout and "--show-completion" in done.stdout
    # Typer's own switch for naming the shell: without it, Typer 0.16 (our floor) takes the shell from the
    # parent process (`sh` under make, which it does not support) and refuses a value.
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    done = subprocess.run(
        [str(script), "--show-completion", "bash"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0 and "_LORAKIT_COMPLETE=complete_bash" in done.stdout
    assert "complete -o default" in done.stdout  # no candidates: bash completes file names
