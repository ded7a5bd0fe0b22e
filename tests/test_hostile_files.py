"""Hostile file systems: saves killed mid-way, FIFOs where files should be, umasks, files where folders go.

The crash tests run one subprocess (imports cost seconds) that forks a writer per kill: the writer saves
adapters B over a folder holding adapters A and dies by SIGKILL, at random moments and right before and
after each rename, exchange, link and removal. After every kill the folder must load as A or as B,
exactly (torch.equal), never a mix, and the user's own files in it must survive.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import AdapterFileError, PeftError

# ---- a save killed at any moment ---------------------------------------------------------------------

CRASH_SERVER = r'''
import copy, json, os, random, shutil, signal, sys, time
import torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
import peftkit.io
from peftkit import LoraConfig, PeftModel, get_peft_model
try:
    from peftkit import fsutil
except ImportError:  # the code before fsutil existed
    fsutil = None

work, n_random, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(seed)
torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
ids = torch.randint(1, 128, (2, 7))

def make(alpha, alpha_other, init_seed):
    # same shapes, other configs: new weights beside an old config load without error but compute neither
    torch.manual_seed(init_seed)
    m = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    m.add_adapter("other", LoraConfig(r=4, lora_alpha=alpha_other, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    return m

model_a, model_b = make(8, 4, 1), make(16, 32, 2)
target = os.path.join(work, "adapter")
USER_FILES = {"README.md": b"my notes\n", os.path.join("extra", "tokenizer.json"): b"{}"}

def outputs(folder):
    m = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    m.load_adapter(os.path.join(folder, "other"), "other")
    with torch.no_grad():
        first = m(ids).logits
        m.set_adapter("other")
        return first, m(ids).logits

def reference(model, name):
    folder = os.path.join(work, "ref-" + name)
    model.save_pretrained(folder)
    return outputs(folder)

ref = {"A": reference(model_a, "a"), "B": reference(model_b, "b")}

def verdict():
    """'A' or 'B' when the folder loads as one of them exactly, else what went wrong."""
    for rel, data in USER_FILES.items():
        path = os.path.join(target, rel)
        if not os.path.isfile(path) or open(path, "rb").read() != data:
            return "missing" if not os.path.isdir(target) else "user file lost: " + rel
    try:
        got = outputs(target)
    except Exception as exc:
        return f"error: {type(exc).__name__}: {str(exc)[:200]}"
    for name, want in ref.items():
        if all(torch.equal(g, w) for g, w in zip(got, want)):
            return name
    return "MIX: loads but computes neither A nor B"

def start_with_a():
    model_a.save_pretrained(target)
    for rel, data in USER_FILES.items():
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        with open(os.path.join(target, rel), "wb") as fh:
            fh.write(data)
    assert verdict() == "A"

HOOKED = [(os, "rename"), (os, "replace"), (os, "link"), (shutil, "rmtree")]
if fsutil is not None:
    HOOKED.append((fsutil, "exchange"))

def die_at(event):
    """In a writer: SIGKILL itself right before or after the event-th call of a hooked function."""
    count = [0]
    def tick():
        if count[0] == event:
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
    for owner, name in HOOKED:
        real = getattr(owner, name)
        def hooked(*args, _real=real, **kwargs):
            tick()
            out = _real(*args, **kwargs)
            tick()
            return out
        setattr(owner, name, hooked)

def leftovers():
    return sorted(e for e in os.listdir(work) if e.startswith(".tmp-"))

def writer(body):
    pid = os.fork()
    if pid == 0:
        try:
            body()
        except BaseException:
            os._exit(3)
        os._exit(0)
    return pid

def run(fallback, n_random):
    if fsutil is not None:
        fsutil._renameat2 = None if fallback else real_renameat2
    result = {"steps": [], "random": [], "max_leftovers": 0}
    for event in range(1000):  # a kill right before / after every hooked call, until a writer finishes
        start_with_a()
        def save_b():
            die_at(event)
            model_b.save_pretrained(target)
        _, status = os.waitpid(writer(save_b), 0)
        result["max_leftovers"] = max(result["max_leftovers"], len(leftovers()))
        seen = verdict()
        if seen == "missing" and fsutil is not None:
            fsutil.clean_leftovers(os.path.abspath(target))  # what the next save does first
            seen = "missing, restored: " + verdict()
        result["steps"].append(seen)
        if os.WIFEXITED(status):
            result["finished_after"] = event
            result["exit"] = os.WEXITSTATUS(status)
            break
    start_with_a()
    for _ in range(n_random):
        def save_forever():
            while True:
                model_b.save_pretrained(target)
                model_a.save_pretrained(target)
        pid = writer(save_forever)
        time.sleep(random.uniform(0.0, 0.12))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        result["max_leftovers"] = max(result["max_leftovers"], len(leftovers()))
        seen = verdict()
        if seen == "missing" and fsutil is not None:
            fsutil.clean_leftovers(os.path.abspath(target))
            seen = "missing, restored: " + verdict()
        result["random"].append(seen if os.WIFSIGNALED(status) else f"writer failed (status {status})")
    model_b.save_pretrained(target)  # a save after all the kills cleans every leftover
    result["final"] = verdict()
    result["leftovers_after_save"] = leftovers()
    return result

real_renameat2 = getattr(fsutil, "_renameat2", None)
import ctypes
report = {"has_exchange": hasattr(ctypes.CDLL(None), "renameat2"), "exchange": run(False, n_random)}
if fsutil is not None:
    report["fallback"] = run(True, n_random // 2)
print("REPORT " + json.dumps(report))
'''


@pytest.fixture(scope="module")
def crash_report(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("crash")
    proc = subprocess.run([sys.executable, "-c", CRASH_SERVER, str(work), "16", "0"],
                          capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line[len("REPORT "):])


def _only_old_or_new(seen: list[str]) -> list[str]:
    return [s for s in seen if s not in ("A", "B")]


def test_save_killed_at_each_rename_leaves_old_or_new_adapters(crash_report) -> None:
    if not crash_report["has_exchange"]:
        pytest.skip("no renameat2(RENAME_EXCHANGE) here; the fallback test covers this system")
    run = crash_report["exchange"]
    assert run["exit"] == 0 and run["finished_after"] >= 6, run  # the hooks saw the save's steps
    assert _only_old_or_new(run["steps"]) == [], run["steps"]
    assert "A" in run["steps"] and "B" in run["steps"]  # kills before and after the swap


def test_save_killed_at_random_moments_leaves_old_or_new_adapters(crash_report) -> None:
    run = crash_report["exchange"]
    assert len(run["random"]) == 16
    assert _only_old_or_new(run["random"]) == [], run["random"]


def test_next_save_removes_what_killed_saves_left(crash_report) -> None:
    run = crash_report["exchange"]
    assert run["max_leftovers"] >= 1  # kills did leave temporary folders ...
    assert run["leftovers_after_save"] == [] and run["final"] == "B"  # ... and the next save removed them


def test_fallback_without_exchange_never_loads_a_mix(crash_report) -> None:
    """Without RENAME_EXCHANGE (two renames) a kill between them leaves no folder for a moment: the load
    fails clearly, and the next save first puts the old folder back. Never a mix, nothing lost."""
    run = crash_report["fallback"]
    assert run["exit"] == 0 and run["finished_after"] >= 6, run
    allowed = {"A", "B", "missing, restored: A"}
    assert [s for s in run["steps"] + run["random"] if s not in allowed] == [], run
    assert "missing, restored: A" in run["steps"]  # the window exists, and is recovered from
    assert run["leftovers_after_save"] == [] and run["final"] == "B"


# ---- FIFOs and other non-regular files where an adapter file should be -------------------------------


def _adapter(seed: int = 0, alpha: int = 8):
    base = tiny_llama()
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False, task_type="CAUSAL_LM"))


FIFO_LOADS = r'''
import os, sys
from transformers import LlamaConfig, LlamaForCausalLM
from peftkit import PeftModel
from peftkit.inspection import describe_one
base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
for folder in sys.argv[1:]:
    for load in (lambda: PeftModel.from_pretrained(base, folder), lambda: describe_one("default", folder)):
        try:
            load()
            print("loaded", flush=True)
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}", flush=True)
'''


def test_fifo_in_place_of_an_adapter_file_is_refused_not_waited_on(tmp_path) -> None:
    """A reader opening a FIFO waits for a writer forever (safetensors holds the GIL meanwhile, so no
    thread can time it out): the loads run in a subprocess that a timeout ends if they block."""
    folders, expected = [], []
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        folder = tmp_path / name.split(".")[0]
        _adapter().save_pretrained(folder)
        (folder / name).unlink()
        os.mkfifo(folder / name)
        folders.append(str(folder))
        line = (f"AdapterFileError: {str(folder / name)!r} is a FIFO (named pipe), not a regular file; "
                "replace it with the saved file")
        expected += [line, line]  # PeftModel.from_pretrained, then peftkit inspect's reader
    try:
        proc = subprocess.run([sys.executable, "-c", FIFO_LOADS, *folders], capture_output=True, text=True,
                              timeout=120)
        out = proc.stdout
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() + "\n(blocked: killed after 120 s)"
    assert out.splitlines() == expected, out


def test_folder_in_place_of_the_weights_file_is_named(tmp_path) -> None:
    folder = tmp_path / "adapter"
    _adapter().save_pretrained(folder)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").mkdir()
    with pytest.raises(AdapterFileError, match=r"adapter_model.safetensors' is a folder, not a regular file"):
        PeftModel.from_pretrained(tiny_llama(), folder)


# ---- modes: the user's umask, like any other tool ---------------------------------------------------


def _modes(root) -> set[tuple[str, str]]:
    out = {("dir", oct(stat.S_IMODE(os.stat(root).st_mode)))}
    for parent, dirs, files in os.walk(root):
        out |= {("dir", oct(stat.S_IMODE(os.stat(os.path.join(parent, d)).st_mode))) for d in dirs}
        out |= {("file", oct(stat.S_IMODE(os.stat(os.path.join(parent, f)).st_mode))) for f in files}
    return out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_everything_written_honours_the_umask(tmp_path, umask) -> None:
    from peftkit.io import atomic_write_bytes
    from peftkit.merge import merge_to_folder
    from peftkit.train.report import Metrics, plot
    from peftkit.train.state import write_checkpoint

    model = _adapter()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "adapter")  # "default" at the root, "other" in a sub-folder
        model.peft_config["default"].save_pretrained(tmp_path / "config")
        write_checkpoint(str(tmp_path / "run"), 3, {"step": 3}, model.save_pretrained)
        merge_to_folder(str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"))
        atomic_write_bytes(tmp_path / "out" / "run_config.yaml", b"lr: 1\n")
        Metrics(str(tmp_path / "out" / "metrics.jsonl")).log({"step": 1, "loss": 1.0})
        plot([{"split": "train", "step": 1, "loss": 1.0}], str(tmp_path / "out" / "loss.png"), "t", "loss")
    finally:
        os.umask(old)
    want = {("dir", oct(0o777 & ~umask)), ("file", oct(0o666 & ~umask))}
    for what in ("adapter", "config", "run", "merged", "out"):
        assert _modes(tmp_path / what) == want, what


def test_a_replaced_folder_keeps_its_mode(tmp_path) -> None:
    folder = tmp_path / "adapter"
    _adapter().save_pretrained(folder)
    os.chmod(folder, 0o750)
    _adapter(1).save_pretrained(folder)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o750


# ---- paths that are not what they should be ---------------------------------------------------------


def test_saving_into_a_file_path_is_refused_and_changes_nothing(tmp_path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    model = _adapter()
    for target, problem in ((a_file, f"{str(a_file)!r} is a regular file, not a folder"),
                            (a_file / "adapter", f"{str(a_file)!r} is a file, not a folder")):
        with pytest.raises(PeftError) as exc:
            model.save_pretrained(target)
        assert str(exc.value) == f"cannot write to {str(target)!r}: {problem}; choose another path"
    with pytest.raises(PeftError, match="is a regular file, not a folder"):
        model.peft_config["default"].save_pretrained(a_file)
    assert a_file.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_loading_a_file_says_it_is_a_file_and_names_the_folder(tmp_path) -> None:
    folder = tmp_path / "adapter"
    _adapter().save_pretrained(folder)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AdapterFileError) as exc:
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "notes.txt")
    assert "is a file, not an adapter folder; pass the folder holding adapter_config.json" in str(exc.value)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with pytest.raises(AdapterFileError) as exc:
            PeftModel.from_pretrained(tiny_llama(), folder / name)
        assert str(exc.value) == f"{str(folder / name)!r} is a file of an adapter; pass its folder {str(folder)!r}"


def test_saving_through_a_symlink_replaces_the_folder_it_points_to(tmp_path, ids) -> None:
    real, link = tmp_path / "store" / "adapter", tmp_path / "adapter"
    _adapter(0).save_pretrained(real)
    (real / "README.md").write_text("mine")
    link.symlink_to(real, target_is_directory=True)
    new = _adapter(1, alpha=16)
    new.save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "README.md").read_text() == "mine"
    loaded = PeftModel.from_pretrained(tiny_llama(), link)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, new(ids).logits)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "store"] and os.listdir(tmp_path / "store") == ["adapter"]


def test_saving_into_a_read_only_folder_is_refused_and_leaves_nothing(tmp_path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    if os.geteuid() == 0:  # root writes through any mode bits, not into an immutable folder
        if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: cannot make a folder read-only")
    else:
        os.chmod(parent, 0o555)
    try:
        model = _adapter()
        for target in (parent / "adapter", parent / "new" / "adapter"):
            with pytest.raises(PeftError) as exc:
                model.save_pretrained(target)
            assert str(exc.value) == (f"cannot write to {str(target)!r}: cannot create anything in {str(parent)!r} "
                                      "(permission denied); choose another path")
        assert os.listdir(parent) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(parent)], check=True)
        os.chmod(parent, 0o755)


# ---- leftovers: removed when their writer died, never while it runs ---------------------------------


def test_leftovers_of_dead_writers_are_removed_running_ones_kept(tmp_path) -> None:
    from peftkit import fsutil

    final = str(tmp_path / "adapter")
    _adapter().save_pretrained(final)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    assert done.wait() == 0  # reaped: its pid runs no more
    try:
        def fake(pid: int) -> str:  # a temporary folder as a writer with this pid would name it
            path = fsutil.temp_path(final).replace(f"-{os.getpid()}-", f"-{pid}-")
            os.makedirs(os.path.join(path, "sub"))
            (open(os.path.join(path, "sub", "big.bin"), "wb")).write(b"x" * 1000)
            return os.path.basename(path)

        running = fake(sleeper.pid)
        fake(done.pid)
        foreign = [".tmp-adapter-abcd1234", ".tmp-other-0000"]  # not ours (or an older peftkit's): kept
        for name in foreign:
            os.mkdir(tmp_path / name)
        _adapter(1).save_pretrained(final)
        assert sorted(os.listdir(tmp_path)) == sorted(["adapter", running, *foreign])
    finally:
        sleeper.kill()
        sleeper.wait()
    _adapter(2).save_pretrained(final)
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter", *foreign])


def test_atomic_folder_cleans_leftovers_and_swaps_whole(tmp_path) -> None:
    from peftkit import fsutil
    from peftkit.io import atomic_folder

    final = str(tmp_path / "checkpoint-5")
    with atomic_folder(final) as tmp:
        open(os.path.join(tmp, "a"), "w").write("1")
    dead = fsutil.temp_path(final).replace(f"-{os.getpid()}-", "-999999-")
    os.mkdir(dead)
    with pytest.raises(FileExistsError):  # replace=False never replaces a folder with content
        with atomic_folder(final) as tmp:
            pass
    with atomic_folder(final, replace=True) as tmp:
        open(os.path.join(tmp, "b"), "w").write("2")
    assert os.listdir(final) == ["b"] and sorted(os.listdir(tmp_path)) == ["checkpoint-5"]
    with pytest.raises(PeftError, match="is a regular file, not a folder"):
        with atomic_folder(os.path.join(final, "b")) as tmp:
            pass


def test_users_files_survive_and_hard_links_to_old_files_keep_the_old_bytes(tmp_path) -> None:
    folder = tmp_path / "adapter"
    _adapter(0).save_pretrained(folder)
    old_bytes = (folder / "adapter_model.safetensors").read_bytes()
    os.link(folder / "adapter_model.safetensors", tmp_path / "backup.safetensors")
    (folder / "notes").mkdir()
    (folder / "notes" / "README.md").write_text("mine")
    os.symlink("notes/README.md", folder / "README.md")
    _adapter(1).save_pretrained(folder)
    assert (tmp_path / "backup.safetensors").read_bytes() == old_bytes  # never rewritten in place
    assert (folder / "adapter_model.safetensors").read_bytes() != old_bytes
    assert (folder / "README.md").is_symlink() and (folder / "README.md").read_text() == "mine"


def test_saving_into_the_current_directory_writes_in_place_and_never_leaves_a_mix(tmp_path, monkeypatch, ids) -> None:
    """Swapping the current directory would leave the process in a deleted one; a mount point cannot be
    renamed at all. Such folders get their files one by one, the config removed first and written last."""
    folder = tmp_path / "adapter"
    _adapter(0).save_pretrained(folder)
    (folder / "README.md").write_text("mine")
    monkeypatch.chdir(folder)
    new = _adapter(1, alpha=16)
    real_replace, calls = os.replace, []

    def killed_after_the_weights(src, dst):
        calls.append(os.path.basename(dst))
        if os.path.basename(dst) == "adapter_config.json":
            raise OSError("killed")  # what a SIGKILL between the weights and the config leaves
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_the_weights)
    with pytest.raises(OSError, match="killed"):
        new.save_pretrained(".")
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls == ["adapter_model.safetensors", "adapter_config.json"]
    with pytest.raises(PeftError, match="no adapter_config.json"):  # loudly no adapter, not new weights on an old config
        PeftModel.from_pretrained(tiny_llama(), ".")
    new.save_pretrained(".")
    assert os.getcwd() == str(folder) and sorted(os.listdir(".")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_llama(), ".")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, new(ids).logits)


def test_a_folder_set_aside_by_a_killed_fallback_swap_is_named_and_put_back(tmp_path, ids) -> None:
    """Without RENAME_EXCHANGE a kill between the two renames leaves the old folder beside a missing one."""
    from peftkit import fsutil

    final = str(tmp_path / "adapter")
    old = _adapter(0)
    old.save_pretrained(final)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    assert dead.wait() == 0
    aside = fsutil.temp_path(final, old=True).replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    os.rename(final, aside)  # what the killed writer did before it died
    with pytest.raises(AdapterFileError) as exc:
        PeftModel.from_pretrained(tiny_llama(), final)
    assert str(exc.value) == (f"adapter folder {final!r} is missing: a save into it was killed; its previous content "
                              f"is in {aside!r}, and the next save there puts it back (or rename it to {final!r})")
    _adapter(1, alpha=16).save_pretrained(tmp_path / "adapter" / "other")  # a save into it (a sub-folder too)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert sorted(os.listdir(final)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    loaded = PeftModel.from_pretrained(tiny_llama(), final)  # the old adapter, back at its place
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, old(ids).logits)
