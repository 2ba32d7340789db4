"""The command line as a new user meets it: every case an outside review found, one by one.

Each bad input must end with exit code 2 and one line ``moejax: error: ...`` (no
traceback), before any model work where the argument alone is wrong; Ctrl-C ends
with exit code 130 and one line; dumps cannot mislead; ``inspect`` names stages and
signatures; ``generate`` can run an optimized pipeline.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

import moejax
from moejax import cli, models

SMALL = ["--batch", "1", "--seq-len", "16", "--decode-tokens", "2", "--quiet"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moejax: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny Mixtral-architecture checkpoint with a 64-token vocabulary (not byte-level)."""
    path = tmp_path_factory.mktemp("tiny_hf")
    models.save_pretrained_hf(models.MoEDecoder(models.tiny_mixtral(), rngs=nnx.Rngs(0)), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_byte_checkpoint(tmp_path_factory) -> Path:
    """A tiny Mixtral-architecture checkpoint with a byte vocabulary (256 tokens, no tokenizer files)."""
    path = tmp_path_factory.mktemp("tiny_byte_hf")
    models.save_pretrained_hf(models.MoEDecoder(models.tiny_mixtral(vocab_size=256), rngs=nnx.Rngs(0)), str(path))
    return path


# --------------------------------------------------------------------------
# "Tracebacks instead of one-line errors": each argument checked before any model work.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["optimize", "--batch", "0"], "--batch"),
    (["optimize", "--batch", "-1"], "--batch"),
    (["optimize", "--seq-len", "0"], "--seq-len"),
    (["optimize", "--decode-tokens", "0"], "--decode-tokens"),
    (["optimize", "--eval-bytes", "1"], "--eval-bytes"),
    (["optimize", "--eval-bytes", "-5"], "--eval-bytes"),
    (["optimize", "--batch", "four"], "not an integer"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "100000000"], "too large"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", "hi", "--top-p", "nan"], "--top-p"),
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate"], "--prompt"),
    (["optimize", "--overwrite"], "--overwrite only applies to --dump"),
    (["optimize", "--report", "/no/such/folder/r.html"], "does not exist"),
    (["inspect", "/tmp", "--text"], "--text only applies to --diff"),
    (["nonsense"], "invalid choice"),
    (["optimize", "--passes", "merge(num_experts=0)"], "pass merge: num_experts"),
    (["optimize", "--mesh", "foo=8"], "unknown axis 'foo'"),
    (["optimize", "--mesh", "expert8"], "is not axis=size"),
])
def test_bad_argument_is_one_line_and_exit_2(capsys, monkeypatch, argv, needle):
    # Nothing may load a model for these: make loading fail loudly if it were tried.
    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("a model was loaded for a bad argument"))
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_error_line(err, needle)


def test_error_prefix_is_not_doubled(capsys):
    _, _, err = run_cli(capsys, "optimize", "--passes", "merge(num_experts=0)")
    assert "merge: merge:" not in err


def test_dump_onto_an_existing_file(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    code, _, err = run_cli(capsys, "optimize", "--dump", str(target))
    assert code == 2
    assert_one_error_line(err, "is an existing file")


def test_random_bytes_safetensors_is_one_line(capsys, tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").write_bytes(os.urandom(4096))
    code, _, err = run_cli(capsys, "optimize", "--model", str(bad), *SMALL)
    assert code == 2
    assert_one_error_line(err, "model.safetensors")


def test_string_hidden_size_in_config_is_one_line(capsys, tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["hidden_size"] = "128"
    (bad / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "optimize", "--model", str(bad), *SMALL)
    assert code == 2
    assert_one_error_line(err, "hidden_size")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("moejax ")


def test_a_bug_says_it_is_one(capsys, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "cmd_passes", broken)
    code, _, err = run_cli(capsys, "passes")
    assert code == 70
    assert "Traceback" in err and "This is a bug in moejax" in err.strip().splitlines()[-1]


def test_broken_pipe_is_quiet(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["passes"]) == 0


def test_broken_pipe_in_a_real_pipe():
    proc = subprocess.Popen([sys.executable, "-m", "moejax.cli", "passes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write, as with `| head -0`
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    # pytest-xdist workers ignore SIGINT and children inherit that; a user's terminal does not.
    proc = subprocess.Popen([sys.executable, "-m", "moejax.cli", "optimize"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the pipeline has started (past imports)
        line = proc.stderr.readline()
        lines.append(line)
        if "forward:" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)  # measured: the process ends within 0.2 s of the signal
    assert proc.returncode == 130, "".join(lines) + rest
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "moejax: interrupted"


# --------------------------------------------------------------------------
# Dumps that cannot mislead; inspect by index, name and signature.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dumped(tmp_path_factory, tiny_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("dump") / "d"
    assert cli.main(["optimize", "--model", str(tiny_checkpoint), "--passes",
                     "profile,quantize(bits=4,group_size=16)", "--dump", str(folder),
                     "--report", str(folder.parent / "report.html"), *SMALL]) == 0
    return folder


def test_dump_refuses_a_non_empty_folder_unless_overwrite(capsys, dumped, tmp_path, tiny_checkpoint):
    code, _, err = run_cli(capsys, "optimize", "--model", str(tiny_checkpoint), "--dump", str(dumped), *SMALL)
    assert code == 2
    assert_one_error_line(err, "is not empty", "--overwrite")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "optimize", "--model", str(tiny_checkpoint), "--dump", str(other), "--overwrite",
                           *SMALL)
    assert code == 2 and (other / "notes.txt").exists()
    assert_one_error_line(err, "holds no moejax dump")


def test_overwrite_replaces_the_earlier_dump_whole(capsys, tmp_path, tiny_checkpoint):
    folder = tmp_path / "d"
    assert cli.main(["optimize", "--model", str(tiny_checkpoint), "--passes", "profile",
                     "--dump", str(folder), *SMALL]) == 0
    assert cli.main(["optimize", "--model", str(tiny_checkpoint), "--passes", "", "--dump", str(folder),
                     "--overwrite", *SMALL]) == 0
    capsys.readouterr()
    stems = sorted(p.stem for p in (folder / "forward").glob("*.json"))
    assert stems == ["00_input"]  # no stale "profile" stage from the first run


def test_interrupted_dump_is_shown_as_incomplete(capsys, tmp_path, tiny_checkpoint):
    model = models.from_pretrained(str(tiny_checkpoint))
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(moejax.PassError):
        moejax.optimize(model, (tokens,), "select-impl,prune(num_experts=2)", dump_dir=tmp_path / "d")
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "d"))
    assert code == 0 and "INCOMPLETE" in out and "INCOMPLETE dump" in err


def test_inspect_lists_stages_and_names_signatures(capsys, dumped):
    code, out, _ = run_cli(capsys, "inspect", str(dumped))
    assert code == 0 and "complete dump; signature forward" in out
    assert "other traced signatures (same pipeline): decode, prefill" in out or \
        "other traced signatures (same pipeline): prefill, decode" in out
    assert out.count("quantize(bits=4,group_size=16)") == 1  # each stage once, not once per signature


@pytest.mark.parametrize("key", ["2", "quantize", "quantize(bits=4,group_size=16)",
                                 "02_quantize_bits_4_group_size_16"])
def test_inspect_stage_by_index_or_name(capsys, dumped, key):
    code, out, _ = run_cli(capsys, "inspect", str(dumped), "--stage", key)
    assert code == 0 and "int4-g16" in out and "int32[1,16])" in out.splitlines()[0]


def test_inspect_stage_of_another_signature(capsys, dumped):
    code, out, _ = run_cli(capsys, "inspect", str(dumped), "--stage", "2", "--signature", "decode")
    assert code == 0 and "int32[1,1]" in out.splitlines()[0]
    code, _, err = run_cli(capsys, "inspect", str(dumped), "--signature", "sig2")
    assert code == 2
    assert_one_error_line(err, "no signature 'sig2'", "forward")


def test_inspect_unknown_stage_lists_the_stages(capsys, dumped):
    code, _, err = run_cli(capsys, "inspect", str(dumped), "--stage", "9")
    assert code == 2
    assert_one_error_line(err, "no stage '9'", "0 (input)", "2 (quantize(bits=4,group_size=16))")


def test_inspect_semantic_diff_by_default_text_on_request(capsys, dumped):
    code, out, _ = run_cli(capsys, "inspect", str(dumped), "--diff", "1", "quantize")
    assert code == 0
    assert "2 layers (" in out and "weight format float -> int4-g16" in out and "expert bytes" in out
    assert len(out.splitlines()) < 10  # per layer facts, not renamed variables
    code, out, _ = run_cli(capsys, "inspect", str(dumped), "--diff", "0", "1")
    assert code == 0 and "no structural change" in out
    code, out, _ = run_cli(capsys, "inspect", str(dumped), "--diff", "1", "2", "--text")
    assert code == 0 and out.startswith("---") and "+++" in out


# --------------------------------------------------------------------------
# Models, generate, passes.
# --------------------------------------------------------------------------
def test_copy_of_the_bundled_model_folder_loads(capsys, tmp_path):
    copy = tmp_path / "default_copy"
    shutil.copytree(models.DEFAULT_MODEL_DIR, copy)
    code, out, err = run_cli(capsys, "optimize", "--model", str(copy), "--passes", "",
                             "--eval-bytes", "256", "--json", *SMALL)
    assert code == 0, err
    rows = json.loads(out)
    assert rows[0]["bits_per_byte"] is not None  # the copy is byte-level too


def test_byte_level_hf_checkpoint_gets_bits_per_byte(capsys, tiny_byte_checkpoint):
    code, out, err = run_cli(capsys, "optimize", "--model", str(tiny_byte_checkpoint), "--passes", "",
                             "--eval-bytes", "256", "--json", *SMALL)
    assert code == 0, err
    assert all(r["bits_per_byte"] is not None for r in json.loads(out))


def test_generate_runs_an_optimized_pipeline(capsys, monkeypatch, tiny_byte_checkpoint):
    model = ["--model", str(tiny_byte_checkpoint)]
    code, plain, _ = run_cli(capsys, "generate", *model, "--prompt", "def f(", "--max-new-tokens", "8", "--quiet")
    assert code == 0
    optimized_models = []

    def optimize(*args, **kwargs):
        optimized_models.append(real_optimize(*args, **kwargs))
        return optimized_models[-1]

    real_optimize = moejax.optimize
    monkeypatch.setattr(moejax, "optimize", optimize)
    code, optimized, _ = run_cli(capsys, "generate", *model, "--prompt", "def f(", "--max-new-tokens", "8",
                                 "--quiet", "--passes", "profile(calibration_bytes=512)")
    assert code == 0 and optimized == plain  # an exact pipeline: the same greedy text
    assert optimized_models[0].signatures == ["forward", "decode", "prefill"]
    assert [s.name for s in optimized_models[0].stages] == ["input", "profile(calibration_bytes=512)"]


def test_report_of_a_pipeline_through_the_cli(dumped):
    page = (dumped.parent / "report.html").read_text()  # written by the same run as the dump
    assert page.count("<tr") >= 4 and "expert load after stage 0 (input)" in page
    assert "weight format float -&gt; int4-g16" in page  # the semantic diff of the quantize stage
    assert page.count('class="structure"') == 2  # stage 0 and the quantized last stage
    assert "No stage has a bits/byte measurement" in page  # a 64-token vocabulary: quality is not scored


def test_stream_matches_generate():
    model = models.load_default_model()
    prompt = jnp.asarray([list(b"import os\n")], jnp.int32)
    want = models.generate(model, prompt, 6)[0, prompt.shape[1]:]
    got = [int(t[0]) for t in models.stream(model, prompt, 6)]
    assert got == [int(t) for t in want]


def test_passes_lists_types_defaults_and_ranges(capsys):
    code, out, _ = run_cli(capsys, "passes", "quantize")
    assert code == 0 and "default 8" in out and "allowed:" in out and "= None" not in out
    code, _, err = run_cli(capsys, "passes", "prunee")
    assert code == 2
    assert_one_error_line(err, "no pass 'prunee'")


def test_mesh_larger_than_the_visible_devices_is_one_line(capsys):
    code, _, err = run_cli(capsys, "optimize", "--mesh", "expert=512", "--quiet")
    assert code == 2
    assert_one_error_line(err, "needs 512 devices but")


def test_optimize_onto_a_mesh_is_exact(tmp_path):
    """--mesh expert=4,model=2 on 8 simulated devices: the loaded model and its ep stage score the same."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "moejax.cli", "optimize", "--mesh", "expert=4,model=2", "--passes",
                           "ep", "--eval-bytes", "1024", "--batch", "1", "--seq-len", "16", "--decode-tokens", "2",
                           "--json", "--quiet"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [r["pass"] for r in rows] == ["input", "ep"]
    assert abs(rows[1]["bits_per_byte"] - rows[0]["bits_per_byte"]) < 1e-5


def test_eval_text_scores_the_users_file(capsys, tmp_path):
    """--eval-text FILE: bits per byte of that file (not the bundled held-out text), as evaluation computes it."""
    from moejax import evaluation
    from moejax.models import load_default_model

    text = tmp_path / "mine.txt"
    text.write_bytes(b"SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;\n" * 4)
    code, out, _ = run_cli(capsys, "optimize", "--eval-text", str(text), "--passes", "", "--json", *SMALL)
    assert code == 0
    rows = json.loads(out)
    expected = evaluation.bits_per_byte(load_default_model(), text.read_bytes(), seq_len=16, batch=1)
    assert abs(rows[0]["bits_per_byte"] - expected) < 1e-5
    code, _, err = run_cli(capsys, "optimize", "--calib-text", str(text), "--passes", "profile", "--seq-len", "4096",
                           "--quiet")
    assert code == 2
    assert_one_error_line(err, "--calib-text", "fewer than one batch")
