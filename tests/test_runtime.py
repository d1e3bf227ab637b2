"""minidistill.runtime: profiles, device, seeding, data root, progress, banner, attempted."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from minidistill import runtime
from minidistill.runtime import (
    PROFILES,
    attempted,
    Profile,
    banner,
    data_root,
    device_name,
    get_device,
    get_profile,
    seed_everything,
    show_progress,
)

CPU = torch.device("cpu")


@pytest.fixture
def no_accelerator(monkeypatch):
    """Pretend neither CUDA nor MPS is present."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend a CUDA GPU is present (nothing is run on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_all_names_exist():
    for name in runtime.__all__:
        assert hasattr(runtime, name), name


def test_profiles_are_the_three_sizes():
    assert PROFILES == ("smoke", "course", "paper")


# --- device ---------------------------------------------------------------------------------

def test_get_device_explicit_argument_wins(fake_cuda):
    assert get_device("cpu") == CPU
    assert get_device(CPU) == CPU


def test_get_device_prefers_cuda_then_falls_back_to_cpu(monkeypatch, no_accelerator):
    assert get_device() == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device().type == "cuda"


def test_device_name_on_cpu_mentions_threads():
    name = device_name("cpu")
    assert name.startswith("CPU")
    assert f"{torch.get_num_threads()} threads" in name
    torch.set_num_threads(1)
    try:
        assert device_name("cpu") == "CPU (1 thread)"
    finally:
        torch.set_num_threads(2)


# --- profiles -------------------------------------------------------------------------------

def test_auto_profile_is_smoke_without_a_gpu(monkeypatch, no_accelerator):
    monkeypatch.delenv("MINIDISTILL_PROFILE", raising=False)
    for p in (get_profile(), get_profile("auto"), get_profile("AUTO")):
        assert p.name == "smoke"
        assert p.device == CPU
        assert p.dataset == "shapes"


def test_auto_profile_is_course_with_a_gpu(monkeypatch, fake_cuda):
    monkeypatch.delenv("MINIDISTILL_PROFILE", raising=False)
    p = get_profile()
    assert p.name == "course"
    assert p.device.type == "cuda"
    assert p.dataset == "cifar10"


def test_auto_profile_on_this_machine(monkeypatch):
    """On the CPU-only CI machine, ``auto`` must mean smoke; with a GPU, course."""
    monkeypatch.delenv("MINIDISTILL_PROFILE", raising=False)
    expected = "smoke" if get_device().type == "cpu" else "course"
    assert get_profile().name == expected


@pytest.mark.parametrize("value, expected", [("paper", "paper"), ("course", "course"),
                                             (" Smoke ", "smoke"), ("auto", "smoke")])
def test_profile_from_environment(monkeypatch, no_accelerator, value, expected):
    monkeypatch.setenv("MINIDISTILL_PROFILE", value)
    assert get_profile().name == expected


def test_profile_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("MINIDISTILL_PROFILE", "paper")
    assert get_profile("smoke").name == "smoke"
    assert get_profile("course", device="cpu") == Profile("course", CPU)


def test_empty_environment_value_means_auto(monkeypatch, no_accelerator):
    monkeypatch.setenv("MINIDISTILL_PROFILE", "")
    assert get_profile().name == "smoke"


def test_unknown_profile_argument_raises():
    with pytest.raises(ValueError, match=r"unknown profile 'huge'.*smoke.*course.*paper"):
        get_profile("huge")


def test_unknown_profile_in_environment_raises(monkeypatch):
    monkeypatch.setenv("MINIDISTILL_PROFILE", "tiny")
    with pytest.raises(ValueError, match="MINIDISTILL_PROFILE"):
        get_profile()


def test_profile_str_names_profile_and_device():
    s = str(Profile("course", CPU))
    assert "profile=course" in s
    assert device_name(CPU) in s


@pytest.mark.parametrize("name, expected", [("smoke", 2), ("course", 30), ("paper", 240)])
def test_pick_returns_this_profiles_value(name, expected):
    assert Profile(name, CPU).pick(smoke=2, course=30, paper=240) == expected


def test_pick_paper_falls_back_to_course():
    assert Profile("paper", CPU).pick(smoke=2, course=30) == 30


def test_pick_does_not_fall_back_for_other_profiles():
    """Only ``paper`` falls back (to ``course``); a missing smoke value is an error."""
    with pytest.raises(KeyError, match="smoke"):
        Profile("smoke", CPU).pick(course=30, paper=240)
    with pytest.raises(KeyError, match="course"):
        Profile("course", CPU).pick(smoke=2, paper=240)


def test_pick_unknown_profile_key_raises():
    with pytest.raises(ValueError, match="unknown profile"):
        Profile("smoke", CPU).pick(smoke=1, colab=2)


# --- seeding --------------------------------------------------------------------------------

def _draws():
    return random.random(), float(np.random.rand()), torch.rand(4)


def test_seed_everything_makes_python_numpy_torch_repeatable():
    seed_everything(123)
    a = _draws()
    seed_everything(123)
    b = _draws()
    seed_everything(124)
    c = _draws()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert a[0] != c[0] and a[1] != c[1] and not torch.equal(a[2], c[2])


def test_seed_everything_makes_model_init_repeatable():
    seed_everything(7)
    w1 = torch.nn.Linear(8, 8).weight.detach().clone()
    seed_everything(7)
    w2 = torch.nn.Linear(8, 8).weight.detach().clone()
    assert torch.equal(w1, w2)


def test_seed_everything_accepts_seeds_beyond_32_bits():
    seed_everything(2**40 + 5)  # numpy takes the seed mod 2**32


@pytest.mark.parametrize("bad", [-1, 1.5, "3", None])
def test_seed_everything_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(bad)


# --- data root, progress, banner ------------------------------------------------------------

def test_data_root_from_environment_is_created(data_dir):
    assert not data_dir.exists()
    assert data_root() == data_dir
    assert data_dir.is_dir()


def test_data_root_argument_overrides_environment(tmp_path, data_dir):
    explicit = tmp_path / "elsewhere" / "deeper"
    assert data_root(explicit) == explicit
    assert explicit.is_dir()
    assert data_root(str(explicit)) == explicit
    assert not data_dir.exists()


def test_data_root_default_is_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIDISTILL_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_root() == tmp_path / ".cache" / "minidistill"
    assert (tmp_path / ".cache" / "minidistill").is_dir()


@pytest.mark.parametrize("value, expected", [("0", False), ("false", False), ("No", False),
                                             (" FALSE ", False), ("1", True), ("yes", True)])
def test_show_progress_follows_environment(monkeypatch, value, expected):
    monkeypatch.setenv("MINIDISTILL_PROGRESS", value)
    assert show_progress() is expected


def test_show_progress_defaults_to_on(monkeypatch):
    monkeypatch.delenv("MINIDISTILL_PROGRESS")
    assert show_progress() is True


def _text(obj) -> str:
    return obj if isinstance(obj, str) else obj.data  # IPython Markdown keeps its text in .data


@pytest.mark.parametrize("name", PROFILES)
def test_banner_names_profile_device_and_torch(name):
    text = _text(banner(Profile(name, CPU)))
    assert f"**{name}**" in text
    assert device_name(CPU) in text
    assert torch.__version__ in text


def test_banner_defaults_to_current_profile(monkeypatch, no_accelerator):
    monkeypatch.setenv("MINIDISTILL_PROFILE", "paper")
    assert "**paper**" in _text(banner())


# --- attempted (the exercises' guard) --------------------------------------------------------

def _todo(x):
    raise NotImplementedError


def test_attempted_is_false_with_a_hint_for_the_placeholder(capsys):
    assert attempted(_todo, 1) is False
    assert "not attempted yet" in capsys.readouterr().out


def test_attempted_calls_the_function_with_the_arguments_and_is_quiet():
    calls = []
    assert attempted(lambda *a: calls.append(a), 1, "x") is True
    assert calls == [(1, "x")]


def test_attempted_lets_other_errors_through():
    def wrong(x):
        return x / 0

    with pytest.raises(ZeroDivisionError):
        attempted(wrong, 1)


def test_attempted_rejects_a_non_function():
    with pytest.raises(TypeError, match="exercise function"):
        attempted(3)


# --- CPU threads (MINIDISTILL_THREADS), set once when the profile is first read -------------

@pytest.fixture
def threads_untouched(monkeypatch):
    """A process in which no profile has been read yet; torch's thread count restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_threads_applied", False)
    monkeypatch.delenv("MINIDISTILL_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_smoke_on_cpu_uses_the_measured_default(threads_untouched, no_accelerator):
    torch.set_num_threads(2)
    assert runtime.cpu_threads(get_profile("smoke")) == runtime.SMOKE_THREADS
    assert torch.get_num_threads() == runtime.SMOKE_THREADS      # get_profile applied it


def test_threads_env_var_wins_in_every_profile(threads_untouched, monkeypatch, fake_cuda):
    monkeypatch.setenv("MINIDISTILL_THREADS", "2")
    assert runtime.cpu_threads(Profile("course", torch.device("cuda"))) == 2
    assert runtime.cpu_threads(Profile("smoke", CPU)) == 2
    monkeypatch.setenv("MINIDISTILL_THREADS", "auto")
    assert runtime.cpu_threads(Profile("smoke", CPU)) == runtime.SMOKE_THREADS


def test_threads_left_to_torch_on_a_gpu_or_when_omp_is_set(threads_untouched, monkeypatch):
    assert runtime.cpu_threads(Profile("course", torch.device("cuda"))) is None
    assert runtime.cpu_threads(Profile("smoke", torch.device("cuda"))) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.cpu_threads(Profile("smoke", CPU)) is None


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_bad_threads_value_names_the_variable(threads_untouched, monkeypatch, bad, no_accelerator):
    monkeypatch.setenv("MINIDISTILL_THREADS", bad)
    with pytest.raises(ValueError, match="MINIDISTILL_THREADS"):
        get_profile("smoke")
    assert runtime._threads_applied is False     # the next read tries again, and says it again


def test_threads_are_set_once_per_process(threads_untouched, monkeypatch, no_accelerator):
    monkeypatch.setenv("MINIDISTILL_THREADS", "1")
    get_profile("smoke")
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)                     # the user's own choice afterwards stays
    get_profile("smoke")
    assert torch.get_num_threads() == 2
    assert runtime.apply_threads(get_profile("smoke")) == 1    # unless applied explicitly


def test_a_fresh_smoke_process_runs_on_the_default_threads():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MINIDISTILL_THREADS", "OMP_NUM_THREADS")}
    env.update(MINIDISTILL_PROFILE="smoke", CUDA_VISIBLE_DEVICES="")
    code = ("import torch; from minidistill import runtime; p = runtime.get_profile(); "
            "print(p.device.type, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    device, threads = out.stdout.split()
    if device != "cpu":
        pytest.skip(f"the smoke profile runs on {device} here; the thread default is for the CPU")
    assert int(threads) == runtime.SMOKE_THREADS
