"""Export: layout, refusals, atomicity and the exactness of value-rotation folding.

Tiny random Llama / Qwen3 / Qwen2 (bias) / Phi3 (fused qkv) checkpoints are built with
``save_pretrained`` in a temporary directory; nothing downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import sawquant.export as export_mod
from sawquant.checkpoint import CONFIG_KEY
from sawquant.checkpoint import KV_CONFIG_FILE as CONFIG_FILE
from sawquant.cli.main import cli
from sawquant.config import KVConfig, LayerConfig, ModelFacts, SideConfig
from sawquant.errors import ConfigError, InputError, UnsupportedModelError
from sawquant.export import (
    export_checkpoint,
    fold_value_rotation,
)
from sawquant.quant.hadamard import block_hadamard
from sawquant.runtime.hf.compat import cache_kwargs, returned_cache

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, HIDDEN = 3, 2, 4, 32, 64
# Layer 0: block 32 with signs; layer 1: block 16; layer 2: no V rotation (nothing to fold).
V_SIDES = (
    SideConfig(rotation_block=32, sign_seed=3),
    SideConfig(rotation_block=16, fallback_heads={0: 8}),
    SideConfig(rotation_block=1),
)
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}"}


def _hf_config(arch: str):
    from transformers import LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=96,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
    )
    if arch == "llama":
        return LlamaConfig(head_dim=HEAD_DIM, **common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=HEAD_DIM, **common)
    common["hidden_size"] = Q_HEADS * HEAD_DIM  # head_dim is hidden_size / heads below
    if arch == "qwen2":  # q/k/v biases: the v bias must rotate too
        return Qwen2Config(**common)
    if arch == "phi3":  # fused qkv_proj: folding must refuse
        return Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    raise ValueError(arch)


def _make_checkpoint(root: Path, arch: str, *, dtype=torch.float32, shard: str | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(arch)).to(dtype)
    if arch == "qwen2":
        with torch.no_grad():  # random init leaves biases at zero; make them matter
            for layer in model.model.layers:
                layer.self_attn.v_proj.bias.normal_(0, 0.5)
    path = root / f"{arch}-{str(dtype)[6:]}-{shard or 'single'}"
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return path


def _kv_config(model_type: str = "llama", **facts) -> KVConfig:
    shape = dict(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM) | facts
    k = SideConfig(rotation_block=16)
    layers = [LayerConfig(k=k, v=V_SIDES[i % len(V_SIDES)]) for i in range(shape["num_layers"])]
    return KVConfig(model=ModelFacts(model_type=model_type, **shape), layers=tuple(layers))


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {
        "llama": _make_checkpoint(root, "llama"),
        "llama_sharded": _make_checkpoint(root, "llama", shard="40KB"),
        "llama_bf16": _make_checkpoint(root, "llama", dtype=torch.bfloat16),
        "qwen3": _make_checkpoint(root, "qwen3"),
        "qwen2": _make_checkpoint(root, "qwen2"),
    }


# -- layout --------------------------------------------------------------------------------------
def test_layout_config_key_and_links(ckpts, tmp_path):
    src = ckpts["llama"]
    before = _hashes(src)
    config = _kv_config()
    result = export_checkpoint(src, config, tmp_path / "out")
    out = tmp_path / "out"

    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", CONFIG_FILE, "generation_config.json", "model.safetensors"]
        + list(TOKENIZER_FILES)
    )
    hf = json.loads((out / "config.json").read_text())
    assert hf[CONFIG_KEY] == {"method": "sawquant", "format_version": 1, "config_file": CONFIG_FILE}
    src_hf = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in hf.items() if k != CONFIG_KEY} == src_hf
    assert KVConfig.from_json((out / CONFIG_FILE).read_text()) == config == result.config
    for name in ["model.safetensors", "generation_config.json", *TOKENIZER_FILES]:
        assert os.path.samefile(out / name, src / name), name  # hard links, nothing copied
    assert set(result.linked) == {"model.safetensors", "generation_config.json", *TOKENIZER_FILES}
    assert result.rewritten == () and result.folded_layers == ()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    assert _hashes(src) == before


def test_quantization_config_untouched_and_fold_refused(ckpts, tmp_path):
    import shutil

    src = tmp_path / "quantized"
    shutil.copytree(ckpts["llama"], src)
    hf = json.loads((src / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(hf, indent=2))
    before = _hashes(src)

    export_checkpoint(src, _kv_config(), tmp_path / "out")
    out_hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_hf["quantization_config"] == hf["quantization_config"]
    with pytest.raises(InputError, match="quantized .*export without --fold-values"):
        export_checkpoint(src, _kv_config(), tmp_path / "out2", fold_values=True)
    assert not (tmp_path / "out2").exists()
    assert _hashes(src) == before


# -- refusals ------------------------------------------------------------------------------------
def test_non_empty_out_needs_force(ckpts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(InputError, match="not empty; choose a new or empty directory"):
        export_checkpoint(ckpts["llama"], _kv_config(), out)
    assert (out / "old.txt").read_text() == "old"

    earlier = tmp_path / "earlier"
    export_checkpoint(ckpts["llama"], _kv_config(), earlier)
    (earlier / "old.txt").write_text("old")
    export_checkpoint(ckpts["llama"], _kv_config(), earlier, force=True)
    assert not (earlier / "old.txt").exists() and (earlier / CONFIG_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "out"]  # old one deleted


def test_force_never_replaces_what_is_not_an_export(ckpts, tmp_path, monkeypatch):
    """`export -o . --force` inside a project once deleted its .git, its sources and the very
    calibration file it was reading. --force replaces only an earlier export."""
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "train.py").write_text("print('hello')\n")
    (project / "calibration.json").write_text(_kv_config().to_json())
    before = _hashes(project)
    monkeypatch.chdir(project)
    for out in (Path("."), project):
        with pytest.raises(InputError, match="not an earlier sawquant export") as err:
            export_checkpoint(
                ckpts["llama"], _kv_config(), out, force=True,
                protect=[project / "calibration.json"],
            )  # fmt: skip
        assert "\n" not in str(err.value)
    assert _hashes(project) == before and (project / ".git" / "HEAD").is_file()

    # An earlier export holding the calibration file the new one is made from: refused too.
    earlier = tmp_path / "earlier"
    export_checkpoint(ckpts["llama"], _kv_config(), earlier)
    (earlier / "calibration.json").write_text(_kv_config().to_json())
    with pytest.raises(InputError, match="inside the output"):
        export_checkpoint(
            ckpts["llama"], _kv_config(), earlier, force=True,
            protect=[earlier / "calibration.json"],
        )  # fmt: skip
    assert (earlier / "calibration.json").is_file()
    # And the current directory is never the one replaced.
    monkeypatch.chdir(earlier)
    with pytest.raises(InputError, match="holds the current directory"):
        export_checkpoint(ckpts["llama"], _kv_config(), Path("."), force=True)


def test_leftovers_of_a_killed_export_are_removed_by_the_next(ckpts, tmp_path):
    """kill -9 during the weight write leaves the hidden work directory (~514 MB for the demo):
    the next export to the same OUT deletes it, once its process is gone."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = export_mod._HOST
    killed = tmp_path / f".out.sawquant-tmp-{host}-{dead.pid}-0123abcd"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"x" * 1000)
    running = tmp_path / f".out.sawquant-tmp-{host}-{os.getpid()}-4567cdef"  # a live export
    running.mkdir()
    export_checkpoint(ckpts["llama"], _kv_config(), tmp_path / "out")
    names = sorted(p.name for p in tmp_path.iterdir())
    print(names)
    assert killed.name not in names and running.name in names and "out" in names


def test_empty_out_is_accepted(ckpts, tmp_path):
    (tmp_path / "out").mkdir()
    export_checkpoint(ckpts["llama"], _kv_config(), tmp_path / "out")
    assert (tmp_path / "out" / CONFIG_FILE).is_file()


@pytest.mark.parametrize(
    "facts", [{"num_layers": 4}, {"num_kv_heads": 1}, {"head_dim": 64}], ids=str
)
def test_mismatched_config_refused(ckpts, tmp_path, facts):
    config = _kv_config(**facts)
    with pytest.raises(ConfigError, match="was made for .* but the model has .*calibrate"):
        export_checkpoint(ckpts["llama"], config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_inside_or_containing_source_refused(ckpts, tmp_path):
    src = ckpts["llama"]
    before = _hashes(src)
    for out in (src, src / "sub", src / "sub" / "deeper"):
        with pytest.raises(InputError, match="inside the source"):
            export_checkpoint(src, _kv_config(), out, force=True)
    with pytest.raises(InputError, match="contains the source"):
        export_checkpoint(src, _kv_config(), src.parent, force=True)
    assert _hashes(src) == before and not (src / "sub").exists()


def test_bad_inputs_refused(ckpts, tmp_path):
    with pytest.raises(InputError, match="not a checkpoint directory"):
        export_checkpoint(tmp_path / "missing", _kv_config(), tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        export_checkpoint(ckpts["llama"], _kv_config(), tmp_path / "file", force=True)
    folded = _kv_config().with_layers(_kv_config().layers)
    folded = KVConfig(model=folded.model, layers=folded.layers, values_folded=True)
    with pytest.raises(ConfigError, match="values_folded=true"):
        export_checkpoint(ckpts["llama"], folded, tmp_path / "out")
    from transformers import BertConfig

    bert = BertConfig(num_hidden_layers=LAYERS, architectures=["BertForMaskedLM"])
    bert.save_pretrained(tmp_path / "bert")  # config.json only
    with pytest.raises(UnsupportedModelError, match="not a decoder-only causal language model"):
        export_checkpoint(tmp_path / "bert", _kv_config(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fold_refused_for_fused_qkv(tmp_path):
    src = _make_checkpoint(tmp_path, "phi3")
    with pytest.raises(UnsupportedModelError, match="phi3.*export without --fold-values"):
        export_checkpoint(src, _kv_config("phi3"), tmp_path / "out", fold_values=True)
    assert not (tmp_path / "out").exists()
    export_checkpoint(src, _kv_config("phi3"), tmp_path / "out")  # without folding it works


def test_default_source_is_the_demo_checkpoint(ckpts, tmp_path, monkeypatch):
    import sawquant.demo

    monkeypatch.setattr(sawquant.demo, "demo_checkpoint_dir", lambda: ckpts["llama"])
    result = export_checkpoint(None, _kv_config(), tmp_path / "out")
    assert result.source == ckpts["llama"].resolve()


def _hub_snapshot(ckpt: Path, root: Path) -> Path:
    """The Hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<sha>."""
    repo = root / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        blob = blobs / hashlib.sha256(f.name.encode()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snap


def test_hf_cache_symlinks_are_followed(ckpts, tmp_path):
    # A hub cache snapshot holds symlinks to blobs; OUT must hold the files, not dangling links.
    snap = _hub_snapshot(ckpts["llama"], tmp_path)
    export_checkpoint(snap, _kv_config(), tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    assert not weights.is_symlink()
    assert os.path.samefile(weights, os.path.realpath(snap / "model.safetensors"))


def test_symlinks_out_of_the_checkpoint_and_loops_are_refused(ckpts, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ckpts["llama"], src)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any checkpoint")
    (src / "tokenizer.model").symlink_to(secret)
    with pytest.raises(InputError, match="outside the checkpoint"):
        export_checkpoint(src, _kv_config(), tmp_path / "out")
    (src / "tokenizer.model").unlink()
    (src / "sub").mkdir()
    (src / "sub" / "loop").symlink_to(src / "sub")
    with pytest.raises(InputError, match="symlink loop"):
        export_checkpoint(src, _kv_config(), tmp_path / "out")
    (src / "sub" / "loop").unlink()
    (src / "self.json").symlink_to(src / "self.json")
    with pytest.raises(InputError, match="broken or looping symlink"):
        export_checkpoint(src, _kv_config(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["nan", "truncated"])
def test_unreadable_or_non_finite_weights_are_refused_before_writing(ckpts, tmp_path, damage):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(ckpts["llama"], src)
    weights = src / "model.safetensors"
    if damage == "nan":
        tensors = load_file(weights)
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
        match = "model.layers.1.mlp.up_proj.weight .* 1 NaN/Inf"
    else:
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 100)
        match = "cannot read the weights"
    with pytest.raises(InputError, match=match):
        export_checkpoint(src, _kv_config(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_read_only_or_full_output_filesystem_is_one_line(ckpts, tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod, "_link_or_copy", full)
    with pytest.raises(InputError, match="no space left on the device") as err:
        export_checkpoint(ckpts["llama"], _kv_config(), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_re_export_replaces_the_kv_config(ckpts, tmp_path):
    first, second = _kv_config(), KVConfig.uniform(_kv_config().model, k=SideConfig(bits=8))
    export_checkpoint(ckpts["llama"], first, tmp_path / "a", fold_values=True)
    export_checkpoint(tmp_path / "a", second, tmp_path / "b")
    assert KVConfig.from_json((tmp_path / "b" / CONFIG_FILE).read_text()) == second
    assert json.loads((tmp_path / "b" / "config.json").read_text())[CONFIG_KEY]["config_file"] == (
        CONFIG_FILE
    )


def test_unindexed_weight_files_warn_when_folding(ckpts, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ckpts["llama_sharded"], src)
    shutil.copy(sorted(src.glob("model-*.safetensors"))[0], src / "consolidated.safetensors")
    result = export_checkpoint(src, _kv_config(), tmp_path / "out", fold_values=True)
    assert len(result.warnings) == 1 and "consolidated.safetensors" in result.warnings[0]
    assert not export_checkpoint(src, _kv_config(), tmp_path / "out2").warnings


def test_cli_reads_calibration_results_and_bare_configs(ckpts, tmp_path):
    from sawquant.calibration import CalibrationResult

    config = _kv_config()
    (tmp_path / "bare.json").write_text(config.to_json())
    CalibrationResult(config=config, model="tiny").save(tmp_path / "calibration.json")
    for name in ("bare.json", "calibration.json"):
        out = tmp_path / f"out-{name}"
        args = ["export", str(ckpts["llama"]), "-c", str(tmp_path / name), "-o", str(out)]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        assert KVConfig.from_json((out / CONFIG_FILE).read_text()) == config
        assert f"vllm serve {out}" in res.output  # how to serve it, with the path


# -- atomicity -----------------------------------------------------------------------------------
def _boom(*args, **kwargs):
    raise OSError("simulated disk failure")


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "force-over-existing"])
@pytest.mark.parametrize("step", ["config", "shard"])
def test_failure_mid_write_leaves_nothing(ckpts, tmp_path, monkeypatch, existing, step):
    src = ckpts["llama_sharded"]
    before = _hashes(src)
    out = tmp_path / "out"
    if existing:
        export_checkpoint(ckpts["llama"], _kv_config(), out)  # an earlier export
    previous = _hashes(out) if existing else None
    if step == "config":  # every weight is linked/written, then config.json fails
        monkeypatch.setattr(export_mod, "_write_text", _boom)
    else:  # a folded shard fails after a partial file was written

        def partial_save(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")
            raise OSError("simulated disk failure")

        monkeypatch.setattr("safetensors.torch.save_file", partial_save)
    with pytest.raises(InputError, match="cannot write the export .*simulated"):
        export_checkpoint(src, _kv_config(), out, fold_values=True, force=True)

    if existing:
        assert _hashes(out) == previous
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])
    assert _hashes(src) == before


def test_failed_rename_restores_old_out(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_checkpoint(ckpts["llama"], _kv_config(), out)
    previous = _hashes(out)
    real_rename = os.rename

    def rename(a, b):
        if ".sawquant-tmp-" in str(a):
            raise OSError("simulated rename failure")
        return real_rename(a, b)

    monkeypatch.setattr(export_mod.os, "rename", rename)
    with pytest.raises(InputError, match="simulated rename"):
        export_checkpoint(ckpts["llama"], _kv_config(), out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert _hashes(out) == previous


def test_sigterm_during_the_weight_write_leaves_nothing(ckpts, tmp_path, monkeypatch):
    """The CLI treats SIGTERM like Ctrl-C, so the export's cleanup runs."""
    import signal

    calib = tmp_path / "calibration.json"
    calib.write_text(_kv_config().to_json())
    real = export_mod._link_or_copy

    def terminated(src, dst):
        if Path(src).name == "model.safetensors":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(src, dst)

    monkeypatch.setattr(export_mod, "_link_or_copy", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        res = CliRunner().invoke(
            cli, ["export", str(ckpts["llama"]), "-c", str(calib), "-o", str(tmp_path / "out")]
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(res.output)
    assert res.exit_code == 143 and "interrupted" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json"]


# -- folding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("block,seed", [(16, None), (32, 5), (1, 9)])
def test_fold_value_rotation_on_mock_gqa_attention(block, seed):
    # One GQA attention layer in float64: softmax(q k^T) @ (x W_v^T + b) -> o_proj.
    gen = torch.Generator().manual_seed(0)
    t, hidden, h_q, h_kv, d = 7, 48, 4, 2, HEAD_DIM
    x = torch.randn(t, hidden, generator=gen, dtype=torch.float64)
    w_v = torch.randn(h_kv * d, hidden, generator=gen, dtype=torch.float64)
    b_v = torch.randn(h_kv * d, generator=gen, dtype=torch.float64)
    w_o = torch.randn(hidden, h_q * d, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(h_q, t, t, generator=gen, dtype=torch.float64), -1)
    r = block_hadamard(d, block, seed=seed, dtype=torch.float64)

    def attention(w_v, b_v, w_o):
        v = (x @ w_v.T + b_v).reshape(t, h_kv, d).transpose(0, 1)  # [H_kv, T, D]
        v = v.repeat_interleave(h_q // h_kv, dim=0)  # [H_q, T, D]
        o = (probs @ v).transpose(0, 1).reshape(t, h_q * d)  # [T, H_q * D]
        return o @ w_o.T, v

    y, v = attention(w_v, b_v, w_o)
    y_f, v_f = attention(*fold_value_rotation(w_v, b_v, w_o, r))
    err_y, err_v = (y_f - y).abs().max().item(), (v_f - v @ r).abs().max().item()
    print(f"block {block} seed {seed}: max |dy| = {err_y:.2e}, max |V' - V R| = {err_v:.2e}")
    assert err_y < 1e-10 * y.abs().max().item() and err_v < 1e-10 * v.abs().max().item()


def _forward(path: Path, dtype: torch.dtype, ids: torch.Tensor):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        out = model(ids, use_cache=True)
    values = [layer.values for layer in returned_cache(out).layers]  # [B, H_kv, S, D] each
    return out.logits, values


def _rotation(side: SideConfig) -> torch.Tensor:
    return block_hadamard(HEAD_DIM, side.rotation_block, seed=side.sign_seed)


@pytest.mark.parametrize("name", ["llama_sharded", "qwen3", "qwen2"])
def test_fold_is_exact_fp32(ckpts, tmp_path, name):
    src = ckpts[name]
    before = _hashes(src)
    model_type = name.split("_")[0]
    config = _kv_config(model_type)
    result = export_checkpoint(src, config, tmp_path / "out", fold_values=True)
    out = tmp_path / "out"

    written = KVConfig.from_json((out / CONFIG_FILE).read_text())
    assert written.values_folded and written == result.config
    assert all(
        layer.v.rotation_block == 1 and layer.v.sign_seed is None for layer in written.layers
    )
    assert [layer.v.fallback_heads for layer in written.layers] == [
        side.fallback_heads for side in V_SIDES
    ]
    assert [layer.k for layer in written.layers] == [layer.k for layer in config.layers]
    assert result.folded_layers == (0, 1)

    # Only the shards holding layer 0/1 v_proj/o_proj are rewritten; everything else is a link.
    index = src / "model.safetensors.index.json"
    if index.exists():
        wmap = json.loads(index.read_text())["weight_map"]
        want = {
            wmap[f"model.layers.{i}.self_attn.{p}_proj.weight"] for i in (0, 1) for p in ("v", "o")
        }
    else:
        want = {"model.safetensors"}
    assert set(result.rewritten) == want
    for rel in result.linked:
        assert os.path.samefile(out / rel, src / rel), rel
    for rel in result.rewritten:
        assert not os.path.samefile(out / rel, src / rel)

    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_v = _forward(src, torch.float32, ids)
    logits, v = _forward(out, torch.float32, ids)
    err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    print(f"{name} fp32 folded-vs-original max |dlogit| / max |logit| = {err:.3e}")
    assert err < 1e-5
    for i, side in enumerate(V_SIDES):
        v_err = (v[i] - ref_v[i] @ _rotation(side)).abs().max().item()
        print(f"{name} layer {i} max |V_folded - V @ R| = {v_err:.3e}")
        assert v_err < 1e-5 * ref_v[i].abs().max().item()
    # Layer 2 has no V rotation: its weights are carried bit for bit.
    from transformers import AutoModelForCausalLM

    a, b = (AutoModelForCausalLM.from_pretrained(p).model.layers[2].self_attn for p in (src, out))
    assert torch.equal(a.v_proj.weight, b.v_proj.weight)
    assert torch.equal(a.o_proj.weight, b.o_proj.weight)
    assert _hashes(src) == before


def test_fold_is_close_in_bf16(ckpts, tmp_path):
    src = ckpts["llama_bf16"]
    export_checkpoint(src, _kv_config(), tmp_path / "out", fold_values=True)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    # The fp32 run of the bf16 weights is the reference both bf16 runs are measured against.
    ref, _ = _forward(src, torch.float32, ids)
    orig, _ = _forward(src, torch.bfloat16, ids)
    folded, _ = _forward(tmp_path / "out", torch.bfloat16, ids)
    scale = ref.abs().max().item()
    err_orig = (orig.float() - ref).abs().max().item() / scale
    err_fold = (folded.float() - ref).abs().max().item() / scale
    err_pair = (folded.float() - orig.float()).abs().max().item() / scale
    print(
        f"bf16 rel err vs fp32: original {err_orig:.3e}, folded {err_fold:.3e}, "
        f"folded-vs-original {err_pair:.3e}"
    )
    # Folding rounds v_proj/o_proj once more to bf16: about as much error as bf16 itself.
    assert err_fold <= 2 * err_orig + 1e-2
    assert err_pair < 3e-2


def test_runtime_serves_a_folded_export_like_the_unfolded_model(ckpts, tmp_path):
    # Signs-only V rotations fold exactly (sign flips), so the INT4 runtime must give the very
    # same logits with values_folded (no V rotation at run time) as with the rotation unfolded.
    from transformers import AutoModelForCausalLM

    import sawquant

    k = SideConfig(rotation_block=16)
    layers = [LayerConfig(k=k, v=SideConfig(sign_seed=i)) for i in range(LAYERS)]
    config = KVConfig(model=ModelFacts(LAYERS, KV_HEADS, HEAD_DIM, "llama"), layers=layers)
    export_checkpoint(ckpts["llama"], config, tmp_path / "out", fold_values=True)
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(2))

    def decode(model):  # 12-token prefill, then 8 single-token steps through the INT4 cache
        with torch.no_grad():
            out = model(ids[:, :12], use_cache=True)
            cache, logits = returned_cache(out), []
            for t in range(12, 20):
                out = model(ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
                cache = returned_cache(out)
                logits.append(out.logits[:, -1])
        return torch.stack(logits, 1)

    plain = AutoModelForCausalLM.from_pretrained(ckpts["llama"], dtype=torch.float32).eval()
    unfolded = decode(sawquant.patch(plain, config))
    folded = decode(sawquant.from_pretrained(tmp_path / "out", dtype=torch.float32))
    print(f"runtime folded vs unfolded: max |dlogit| = {(folded - unfolded).abs().max():.3e}")
    assert torch.equal(folded, unfolded)


# -- CLI -----------------------------------------------------------------------------------------
def test_cli(ckpts, tmp_path):
    runner = CliRunner()
    calib = tmp_path / "calibration.json"
    calib.write_text(_kv_config().to_json())
    args = ["export", str(ckpts["llama"]), "-c", str(calib), "-o", str(tmp_path / "out")]

    ok = runner.invoke(cli, [*args, "--fold-values"])
    assert ok.exit_code == 0, ok.output
    assert "1 rewritten" in ok.output and "values folded" in ok.output

    again = runner.invoke(cli, args)
    assert again.exit_code == 2 and "not empty; choose a new" in again.output
    assert runner.invoke(cli, [*args, "--force"]).exit_code == 0

    bad = tmp_path / "bad.json"
    bad.write_text(_kv_config(num_layers=5).to_json())
    res = runner.invoke(cli, ["export", str(ckpts["llama"]), "-c", str(bad), "-o", "x"])
    assert res.exit_code == 2 and "calibrate this model" in res.output
    res = runner.invoke(cli, [*args[:2], "-c", str(tmp_path / "nope.json"), "-o", "x", "--force"])
    assert res.exit_code == 2 and "does not exist" in res.output
    missing = runner.invoke(cli, ["export", str(ckpts["llama"]), "-o", "x"])
    assert missing.exit_code == 2 and "--calibration" in missing.output  # click usage error


def test_fold_refuses_value_centering_and_smoothing(ckpts, tmp_path):
    cfg = _kv_config()
    v = SideConfig(rotation_block=16, center=[[0.1] * HEAD_DIM] * KV_HEADS)
    layers = (LayerConfig(k=cfg.layers[0].k, v=v), *cfg.layers[1:])
    shaped = KVConfig(model=cfg.model, layers=layers)
    before = _hashes(ckpts["llama"])
    with pytest.raises(InputError, match=r"layers \[0\] center or smooth .*without --fold-values"):
        export_checkpoint(ckpts["llama"], shaped, tmp_path / "out", fold_values=True)
    assert not (tmp_path / "out").exists()
    assert _hashes(ckpts["llama"]) == before
    export_checkpoint(ckpts["llama"], shaped, tmp_path / "out")  # without folding: fine
