import pytest
import torch

from vitq.errors import InputError, ModelError, UnsupportedError
from vitq.exporter import create_model, load_model, read_state_dict


def test_wrong_model_name_suggests():
    with pytest.raises(ModelError) as ei:
        create_model("deit_tiny_patch16_244")
    msg = str(ei.value)
    assert "deit_tiny_patch16_244" in msg and "deit_tiny_patch16_224" in msg


def test_unsupported_family():
    with pytest.raises(UnsupportedError, match="ResNet"):
        create_model("resnet18")


def test_missing_and_unreadable_weights(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model("deit_tiny_patch16_224", tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pth"):
        load_model("deit_tiny_patch16_224", bad)
    weird = tmp_path / "w.npz"
    weird.write_bytes(b"x")
    with pytest.raises(InputError, match="extension"):
        load_model("deit_tiny_patch16_224", weird)


@pytest.fixture(scope="module")
def deit_sd():
    torch.manual_seed(1)
    m, _ = create_model("deit_tiny_patch16_224")
    return m.state_dict()


def test_state_dict_mismatch_readable_diff(tmp_path, deit_sd):
    sd = dict(deit_sd)
    sd.pop("blocks.3.mlp.fc1.bias")
    sd["extra.weight"] = torch.zeros(2)
    sd["head.weight"] = torch.zeros(10, 192)
    p = tmp_path / "mismatch.pth"
    torch.save(sd, p)
    with pytest.raises(ModelError) as ei:
        load_model("deit_tiny_patch16_224", p)
    msg = str(ei.value)
    assert "missing in file (1)" in msg and "blocks.3.mlp.fc1.bias" in msg
    assert "unexpected in file (1)" in msg and "extra.weight" in msg
    assert "head.weight: model [1000, 192] vs file [10, 192]" in msg


def test_loads_pth_wrapped_and_safetensors(tmp_path, deit_sd):
    from safetensors.torch import save_file

    p = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.{k}": v for k, v in deit_sd.items()}, "epoch": 3}, p)
    lm = load_model("deit_tiny_patch16_224", p)
    assert not lm.weights["random_init"] and len(lm.weights["sha256"]) == 64
    assert any("unwrapped" in n for n in lm.weights["notes"]) and any("module." in n for n in lm.weights["notes"])
    assert torch.equal(lm.model.state_dict()["blocks.0.attn.qkv.weight"], deit_sd["blocks.0.attn.qkv.weight"])
    s = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in deit_sd.items()}, str(s))
    sd2, notes = read_state_dict(s)
    assert set(sd2) == set(deit_sd) and notes == []


def test_random_init_is_flagged():
    lm = load_model("deit_tiny_patch16_224")
    assert lm.weights["random_init"] is True and lm.family == "vit" and lm.num_classes == 1000
