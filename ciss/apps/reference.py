"""The trained step a model version was exported from, rebuilt with PyTorch, as a backend: what
`ciss live --backend torch` serves to debug an exported graph against the model it came from.

It lives with the command line because it needs the trainer, which the runtime never imports (robots
have no torch); the runtime takes it as a BackendFactory (ciss/runtime/backends.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ciss.classmap import mask_dtype
from ciss.errors import CissError
from ciss.manifest import InputSpec, ModelManifest
from ciss.runtime.backends import Backend


class TorchBackend(Backend):
    """The trained step the version was exported from, rebuilt with PyTorch: a reference for
    debugging the exported graph, never a deployment path (robots have no torch).

    A BackendFactory: the step is found through the manifest's source, not in `version_dir`."""

    def __init__(self, version_dir: Path, manifest: ModelManifest, threads: int):
        try:
            import torch
        except ImportError:
            raise CissError("the torch backend needs PyTorch, which is not installed here") from None
        from ciss.trainer.store import RunStore

        source = manifest.source or {}
        if "run" not in source or "step" not in source:
            raise CissError("the torch backend rebuilds the step a version came from, and this manifest names none")
        model, step_manifest = RunStore(Path(source["run"])).load(int(source["step"]))
        if step_manifest.weights.sha256 != source.get("weights_sha256"):
            raise CissError(f"step {source['step']} of {source['run']} has changed since this version was exported; "
                            "the torch backend would not run the same weights")
        if threads > 0:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = model.fused().eval()
        self.name, self.precision = "torch", "fp32"
        self.input_name = (manifest.input or InputSpec()).name
        self.output_names = [o["name"] for o in manifest.outputs]
        self._mask_dtype = mask_dtype(len(manifest.classes))

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self._torch.no_grad():
            logits = self.model(self._torch.from_numpy(x))
        out = {"logits": logits.numpy(), "mask": logits.argmax(1).numpy().astype(self._mask_dtype),
               "confidence": logits.softmax(1).amax(1).numpy()}
        return {name: out[name] for name in self.output_names}
